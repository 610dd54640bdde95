"""The Backend base class, the cpu and cuda backends, and get_backend's spec forms."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

from hwoptim import AmpOptimWrapper, Backend, get_backend, register_backend
from hwoptim.backends import registry
from hwoptim.backends.cpu import CpuBackend
from hwoptim.backends.cuda import CudaBackend
from hwoptim.testing import mock_backend


@pytest.fixture
def clean_registry():
    """Registrations made in a test are undone afterwards."""
    saved = (dict(registry._registry), dict(registry._origins))
    yield
    registry._registry.clear()
    registry._registry.update(saved[0])
    registry._origins.clear()
    registry._origins.update(saved[1])


def test_cpu_backend_facts():
    cpu = get_backend("cpu")
    assert isinstance(cpu, CpuBackend)
    assert cpu.is_available() and cpu.device() == torch.device("cpu")
    assert (cpu.device_count(), cpu.current_device(), cpu.dist_backend) == (1, 0, "gloo")
    assert cpu.default_amp_dtype is torch.bfloat16
    assert cpu.amp_dtypes == (torch.bfloat16, torch.float16, torch.float32)
    cpu.synchronize()
    assert cpu.memory_stats() == {}
    with pytest.raises(ValueError, match="one device, index 0"):
        cpu.set_device(1)


def test_cpu_manual_seed_seeds_torch():
    cpu = get_backend("cpu")
    cpu.manual_seed(123)
    a = torch.rand(3)
    cpu.manual_seed(123)
    assert torch.equal(a, torch.rand(3))


def test_cpu_autocast_and_scaler():
    cpu = get_backend("cpu")
    with cpu.autocast(torch.float16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype is torch.float16
    with cpu.autocast(torch.float32):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype is torch.float32
    scaler = cpu.grad_scaler(init_scale=4.0)
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    assert scaler.state_dict()["scale"] == 4.0


@pytest.mark.parametrize("name", ["cpu", "cuda", "npu", "xpu", "mps"])
def test_float32_switches_autocast_off_by_the_backends_own_decision(name, monkeypatch):
    """float32 means full precision, so the backend itself asks torch for a disabled
    autocast. Torch would switch float32 off on its own on the CPU and where a device lacks
    the dtype, with a warning at every forward, but on CUDA it would autocast to float32
    (a float64 input then computes in float32). Each backend runs its own code (mocked
    hardware, tensors on the CPU); torch.autocast is watched to see what it is asked."""
    asked = []
    real = torch.autocast

    def watched(device_type, dtype=None, enabled=True, cache_enabled=None):
        asked.append((dtype, enabled))
        return real(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)

    model = torch.nn.Linear(4, 2)
    mock = contextlib.nullcontext() if name == "cpu" else mock_backend(name)
    with mock, warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "Disabling autocast" warning included
        backend = get_backend(name)
        wrapper = AmpOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), device=name, dtype="float32")
        monkeypatch.setattr(torch, "autocast", watched)
        with backend.autocast(torch.float32):
            assert not torch.is_autocast_enabled("cpu")
        with wrapper.optim_context(model):
            assert not torch.is_autocast_enabled("cpu")
            assert model(torch.randn(2, 4)).dtype is torch.float32
        with backend.autocast(torch.float16):  # the other dtypes are left on
            assert torch.is_autocast_enabled("cpu")
    assert asked == [(torch.float32, False), (torch.float32, False), (torch.float16, True)]


def test_describe_is_plain_data():
    facts = get_backend("cpu").describe()
    assert facts["name"] == "cpu" and facts["available"] is True and facts["reason"] is None
    assert facts["amp_dtypes"] == ["bfloat16", "float16", "float32"] and facts["device_count"] == 1


@pytest.mark.parametrize("spec", ["cpu", "CPU", " cpu ", torch.device("cpu"), "cpu:0", None])
def test_spec_forms(spec, monkeypatch):
    monkeypatch.setenv("HWOPTIM_DEVICE", "cpu")
    assert get_backend(spec).name == "cpu"


def test_a_backend_instance_is_returned_as_is():
    backend = CpuBackend()
    assert get_backend(backend) is backend


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        ("tpu", ValueError, "unknown device 'tpu'; registered backends: .*'cpu'.*'cuda'"),
        ("cpu:x", ValueError, "index after ':' must be a non-negative integer"),
        (":0", ValueError, "no backend name"),
        ("cpu:1", ValueError, "does not exist; this process sees 1 cpu device"),
        (3, TypeError, "device must be 'auto'"),
    ],
)
def test_bad_specs(spec, error, match):
    with pytest.raises(error, match=match):
        get_backend(spec)


def test_hwoptim_device_env_var_wins_and_bad_values_name_it(monkeypatch):
    monkeypatch.setenv("HWOPTIM_DEVICE", "cpu")
    assert get_backend("auto").name == "cpu"
    monkeypatch.setenv("HWOPTIM_DEVICE", "tpu")
    with pytest.raises(ValueError, match="HWOPTIM_DEVICE='tpu': unknown device"):
        get_backend("auto")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_unavailable_on_a_cpu_build(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU-only build, also on a CUDA one
    monkeypatch.setattr(torch.version, "hip", None)
    cuda = CudaBackend()
    assert not cuda.is_available() and cuda.device_count() == 0
    assert "CPU-only build" in cuda.unavailable_reason()
    with pytest.raises(RuntimeError, match="'cuda' backend is not available"):
        get_backend("cuda")


def test_cuda_backend_through_torch_cuda(monkeypatch):
    """The cuda backend's own code, with torch.cuda answering as a 2-GPU machine would."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append(("synchronize",)))
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda s: calls.append(("manual_seed_all", s)))
    cuda = get_backend("cuda:1")
    assert cuda.device() == torch.device("cuda", 1)
    assert get_backend("cuda").device() == torch.device("cuda", 1)  # the current device
    assert cuda.dist_backend == "nccl" and cuda.default_amp_dtype is torch.float16
    assert cuda.amp_dtypes == (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    cuda.set_device(0)
    cuda.synchronize()
    cuda.manual_seed(7)
    assert calls == [("set_device", 0), ("synchronize",), ("manual_seed_all", 7)]
    with pytest.raises(ValueError, match="cuda:2 does not exist; this process sees 2"):
        get_backend("cuda:2")


def test_cuda_without_bf16_support_refuses_bfloat16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(ValueError, match="cannot autocast to bfloat16; it supports 'float16', 'float32', 'float64'"):
        CudaBackend().resolve_dtype("bfloat16")


def test_register_a_backend_and_refuse_a_clash(clean_registry):
    class Fake(Backend):
        name = "fake"
        device_type = "cpu"

        def is_available(self) -> bool:
            return True

    assert register_backend(Fake) is Fake
    assert get_backend("fake").name == "fake"
    assert registry.backend_origin("fake") == "user"

    class OtherCpu(CpuBackend):
        pass

    with pytest.raises(ValueError, match=r"'cpu' is already registered .*override=True"):
        register_backend(OtherCpu)
    register_backend(OtherCpu, override=True)
    assert type(get_backend("cpu")) is OtherCpu


def test_register_refuses_non_backends(clean_registry):
    with pytest.raises(TypeError, match="takes a Backend subclass"):
        register_backend(object)  # type: ignore[arg-type]

    class Nameless(Backend):
        pass

    with pytest.raises(ValueError, match="must set both 'name' and 'device_type'"):
        register_backend(Nameless)


def test_a_custom_backend_drives_the_wrapper(clean_registry):
    from hwoptim import AmpOptimWrapper

    events = []

    @register_backend
    class Tracing(CpuBackend):
        name = "tracing"

        def autocast(self, dtype=None, enabled=True, cache_enabled=None):
            events.append(("autocast", dtype))
            return super().autocast(dtype, enabled, cache_enabled)

        def grad_scaler(self, sharded=False, **kwargs):
            events.append(("grad_scaler", sharded))
            return super().grad_scaler(sharded, **kwargs)

    model = torch.nn.Linear(2, 1)
    wrapper = AmpOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), device="tracing", dtype="float16")
    with wrapper.optim_context(model):
        loss = model(torch.ones(1, 2)).float().sum()
    wrapper.update_params(loss)
    assert events == [("grad_scaler", False), ("autocast", torch.float16)]


def test_a_backend_with_its_own_no_sync_is_asked_even_for_a_plain_looking_model(clean_registry):
    from contextlib import contextmanager

    from hwoptim import AmpOptimWrapper

    entered = []

    @register_backend
    class VendorDP(CpuBackend):  # e.g. a vendor data-parallel wrapper with its own switch
        name = "vendordp"

        @contextmanager
        def no_sync(self, model):
            entered.append(model)
            yield

    model = torch.nn.Linear(2, 1)  # no no_sync(), no FSDP2: the generic check says "nothing"
    wrapper = AmpOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), device="vendordp",
                              accumulative_counts=2)
    wrapper.initialize_count_status(model, 0, 4)
    for _ in range(4):
        with wrapper.optim_context(model):
            loss = model(torch.ones(1, 2)).float().sum()
        wrapper.update_params(loss)
    assert entered == [model, model]  # the two micro-batches that do not update


# -- what mutation testing found unchecked (docs/contributing.md) --------------------------------


class _Probe(Backend):
    """A backend over a stand-in device module (never registered)."""

    name = "probe"
    device_type = "cuda"  # a type torch knows, for torch.device()
    install_hint = "pip install probe"
    no_device_hint = ""

    def __init__(self, index=None, module=None):
        super().__init__(index)
        self.module = module

    def _module(self):
        return self.module


class _Devices:
    """A device module with 3 devices, device 2 current."""

    def __init__(self, names=True):
        if names:
            self.get_device_name = lambda i: f"card {i}"

    def is_available(self):
        return True

    def device_count(self):
        return 3

    def current_device(self):
        return 2


def test_device_takes_the_index_asked_for_then_the_backends_then_the_current_one():
    assert _Probe(None, _Devices()).device() == torch.device("cuda", 2)
    assert _Probe(1, _Devices()).device() == torch.device("cuda", 1)
    assert _Probe(1, _Devices()).device(0) == torch.device("cuda", 0)
    assert _Probe(None, _Devices()).device(1) == torch.device("cuda", 1)


def test_a_mocked_backend_places_on_the_cpu_without_an_index():
    with mock_backend("npu", device_count=2):
        assert get_backend("npu:1").device() == torch.device("cpu")


def test_device_name_by_index_and_without_a_name_the_device_type():
    assert _Probe(None, _Devices()).device_name() == "card 0"
    assert _Probe(None, _Devices()).device_name(2) == "card 2"
    assert _Probe(None, _Devices(names=False)).device_name(1) == "cuda"


def test_describe_of_an_available_backend_in_full():
    assert _Probe(None, _Devices()).describe() == {
        "name": "probe", "device_type": "cuda", "available": True, "reason": None,
        "device_count": 3, "devices": ["card 0", "card 1", "card 2"],
        "amp_dtypes": ["float16", "bfloat16", "float32"], "default_dtype": "float16",
        "dist_backend": "gloo", "priority": 0, "versions": {},
    }


def test_describe_reports_a_raising_check_and_a_raising_version_lookup():
    class Raising(_Probe):
        def is_available(self):
            raise RuntimeError("driver gone")

    facts = Raising(None, _Devices()).describe()
    assert facts["available"] is False and facts["device_count"] == 0 and facts["devices"] == []
    assert facts["reason"] == "is_available() raised RuntimeError: driver gone"

    class Versionless(_Probe):
        def vendor_versions(self):
            raise OSError("no version file")

    facts = Versionless(None, _Devices()).describe()
    assert facts["versions"] == {"error": "OSError('no version file')"}


def test_unavailable_reason_says_what_to_install_or_check():
    assert _Probe(None, None).unavailable_reason() == (
        "no probe device is visible to this process; pip install probe"
    )

    class Hinted(_Probe):
        install_hint = ""
        no_device_hint = "check probe-smi"

    assert Hinted(None, None).unavailable_reason() == (
        "no probe device is visible to this process (check probe-smi)"
    )

    class Bare(_Probe):
        install_hint = ""

    assert Bare(None, None).unavailable_reason() == "no probe device is visible to this process"


def test_manual_seed_seeds_all_devices_or_the_one_module_seed():
    seeded = []

    class One:
        def manual_seed(self, seed):
            seeded.append(("one", seed))

    class All(One):
        def manual_seed_all(self, seed):
            seeded.append(("all", seed))

    _Probe(None, One()).manual_seed(3)
    _Probe(None, All()).manual_seed(4)
    assert seeded == [("one", 3), ("all", 4)]
