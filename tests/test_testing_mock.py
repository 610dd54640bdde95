"""hwoptim.testing.mock_backend: stand-ins that run a backend's own code on the CPU,
record every vendor call, and leave nothing behind."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import types
from collections.abc import Iterator
from typing import Any, Callable

import pytest
import torch

from hwoptim import AmpOptimWrapper, Backend, get_backend, register_backend
from hwoptim.backends import registry
from hwoptim.testing import (
    VendorCall,
    VendorMock,
    active_mocks,
    mock_backend,
    register_stand_in,
    stand_in_names,
)
from hwoptim.testing import mock as mock_module
from hwoptim.testing.stand_ins import MOCK_VERSION

BUILT_IN_STAND_INS = ["cpu", "cuda", "generic", "mps", "npu", "xpu"]


def torch_state() -> dict[str, Any]:
    """Everything a stand-in may touch, to compare before and after a mock."""
    return {
        "torch": {k: torch.__dict__.get(k) for k in ("cuda", "xpu", "mps", "npu", "accelerator")},
        "torch.backends.mps": torch.backends.__dict__.get("mps"),
        "torch.version": {k: torch.version.__dict__.get(k) for k in ("cann", "xpu")},
        "vendor modules": sorted(m for m in sys.modules if m.split(".")[0] == "torch_npu"),
        "meta_path": list(sys.meta_path),
        "active mocks": active_mocks(),
        "auto": get_backend("auto").name,
    }


def train_one_window(device: str = "auto") -> AmpOptimWrapper:
    model = torch.nn.Linear(4, 1)
    wrapper = AmpOptimWrapper(
        torch.optim.SGD(model.parameters(), lr=0.1), device=device, accumulative_counts=2,
        clip_grad=dict(max_norm=1.0),
    )
    wrapper.initialize_count_status(model, 0, 2)
    for _ in range(2):
        with wrapper.optim_context(model):
            loss = model(torch.randn(3, 4, device=wrapper.device)).float().pow(2).mean()
        wrapper.update_params(loss)
    return wrapper


def test_the_built_in_stand_ins_are_listed() -> None:
    assert set(BUILT_IN_STAND_INS) <= set(stand_in_names())


@pytest.mark.parametrize("name", BUILT_IN_STAND_INS)
def test_auto_picks_the_mocked_backend_and_tensors_stay_on_the_cpu(name: str) -> None:
    with mock_backend(name) as mock:
        wrapper = train_one_window()
        assert wrapper.backend.name == mock.backend_name
        assert type(wrapper.backend) is type(mock.backend)
        assert wrapper.device == torch.device("cpu")
        assert wrapper.backend.device_type != "cpu" or name == "cpu"


def test_calls_are_recorded_with_their_arguments() -> None:
    with mock_backend("npu", device_count=2) as mock:
        backend = get_backend("npu")
        backend.set_device(1)
        assert backend.current_device() == 1
        backend.synchronize()
    assert VendorCall("torch.npu.set_device", (1,), {}) in mock.calls
    names = mock.call_names()
    assert names[0] == "import torch_npu"
    assert names.index("torch.npu.set_device") < names.index("torch.npu.current_device")
    assert "torch.npu.synchronize" in names


def test_the_npu_backend_builds_torch_npus_own_scaler_and_steps_through_it() -> None:
    with mock_backend("npu") as mock:
        wrapper = train_one_window()
    assert type(wrapper.loss_scaler).__name__ == "GradScaler"
    assert type(wrapper.loss_scaler).__module__ == mock_module.__name__
    names = mock.call_names()
    assert "torch_npu.npu.amp.GradScaler" in names
    for method in ("scale", "unscale_", "step", "update"):
        assert f"torch_npu.npu.amp.GradScaler.{method}" in names


@pytest.mark.parametrize("name", BUILT_IN_STAND_INS)
def test_everything_is_restored_on_exit(name: str) -> None:
    before = torch_state()
    with mock_backend(name):
        train_one_window()
        assert torch_state() != before or name == "cpu"
    assert torch_state() == before
    assert active_mocks() == []


@pytest.mark.parametrize("name", BUILT_IN_STAND_INS)
def test_everything_is_restored_after_an_exception(name: str) -> None:
    before = torch_state()
    with pytest.raises(KeyError, match="boom"), mock_backend(name):
        get_backend("auto")
        raise KeyError("boom")
    assert torch_state() == before


def test_a_real_vendor_module_is_hidden_and_comes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    real = types.ModuleType("torch_npu")
    monkeypatch.setitem(sys.modules, "torch_npu", real)
    with mock_backend("npu"):
        import torch_npu

        assert torch_npu is not real
        assert torch_npu.__version__ == MOCK_VERSION
    assert sys.modules["torch_npu"] is real


def test_the_vendor_module_is_imported_only_when_the_backend_is_asked_for() -> None:
    with mock_backend("npu", select=False) as mock:
        train_one_window(device="cpu")
        assert "torch_npu" not in sys.modules and not hasattr(torch, "npu")
        assert "import torch_npu" not in mock.call_names()
        get_backend("npu")
        assert mock.call_names()[0] == "import torch_npu"
        assert hasattr(torch, "npu")


def test_torch_imports_its_compiler_stack_against_the_real_device_modules() -> None:
    # torch imports torch._dynamo lazily, with the first optimizer, and probes
    # torch.xpu._is_compiled() while doing so; a fake answer broke that import once.
    script = textwrap.dedent("""
        import sys, torch
        from hwoptim.testing import mock_backend

        assert "torch._dynamo" not in sys.modules
        with mock_backend("xpu"):
            assert torch.xpu._is_compiled() is torch._C._has_xpu  # a build fact: never faked
            torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()).step()
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_a_vendor_api_the_stand_in_lacks_fails_naming_it() -> None:
    with mock_backend("npu"):
        get_backend("npu")
        with pytest.raises(AttributeError, match=r"stand-in for torch\.npu has no 'mem_get_info'"):
            torch.npu.mem_get_info()


def test_mocks_of_different_backends_nest_and_the_innermost_selecting_one_wins() -> None:
    with mock_backend("xpu") as outer:
        assert get_backend("auto").name == "xpu"
        with mock_backend("npu") as inner:
            assert get_backend("auto").name == "npu"
            assert get_backend("xpu").device() == torch.device("cpu")  # both still mocked
            assert active_mocks() == [outer, inner]
            with mock_backend("mps", select=False):
                assert get_backend("auto").name == "npu"
        assert get_backend("auto").name == "xpu"
    assert get_backend("auto").name == "cpu"


def test_mocking_a_backend_inside_its_own_mock_is_refused() -> None:
    with mock_backend("npu") as outer:
        with pytest.raises(RuntimeError, match=r"mock_backend\('npu'\) is already active"):
            with mock_backend("npu"):
                pass  # pragma: no cover
        assert active_mocks() == [outer]
        assert get_backend("auto").name == "npu"
    assert active_mocks() == []


def test_leaving_mocks_out_of_order_is_refused() -> None:
    outer, inner = mock_backend("xpu"), mock_backend("npu")
    outer.__enter__()
    inner.__enter__()
    try:
        with pytest.raises(RuntimeError, match="must end before the mocks started after it"):
            outer.__exit__(None, None, None)
    finally:
        inner.__exit__(None, None, None)
        outer.__exit__(None, None, None)
    assert active_mocks() == [] and not hasattr(torch, "npu")


def test_a_mock_cannot_start_while_another_thread_holds_one() -> None:
    # Two threads each in a mock could end them out of order: the first one then stayed
    # active for the rest of the process (import torch_npu worked, auto picked npu).
    entered, release = threading.Event(), threading.Event()
    seen: list[str] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with mock_backend("npu"):
                entered.set()
                release.wait(timeout=30)
                seen.append(get_backend("auto").name)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
            entered.set()

    thread = threading.Thread(target=worker, name="trainer")
    thread.start()
    try:
        assert entered.wait(timeout=30)
        assert get_backend("auto").name == "npu"  # the mock is process-wide: visible here too
        message = (r"mock_backend\('cuda'\) cannot start on thread 'MainThread' "
                   r"while mock_backend\('npu'\) is active on thread 'trainer'")
        with pytest.raises(RuntimeError, match=message), mock_backend("cuda"):
            pass  # pragma: no cover
    finally:
        release.set()
        thread.join(timeout=30)
    assert errors == [] and seen == ["npu"]
    assert active_mocks() == []
    assert get_backend("auto").name == "cpu" and not hasattr(torch, "npu")
    assert getattr(sys.modules.get("torch_npu"), "__version__", None) != MOCK_VERSION
    with mock_backend("cuda"):  # and the next mock, on any thread, starts normally
        assert get_backend("auto").name == "cuda"


def test_a_mock_is_used_once() -> None:
    mock = mock_backend("cpu")
    with mock:
        pass
    with pytest.raises(RuntimeError, match="already used"), mock:
        pass  # pragma: no cover
    with pytest.raises(RuntimeError, match="not active"):
        mock.backend  # noqa: B018


def test_unknown_stand_in_names_the_known_ones() -> None:
    message = r"no stand-in for backend 'tpu'.*'npu'.*register_stand_in"
    with pytest.raises(ValueError, match=message):
        mock_backend("tpu")


@pytest.mark.parametrize("count", [0, -1, 1.5, True])
def test_device_count_must_be_a_positive_int(count: Any) -> None:
    with pytest.raises(ValueError, match="device_count must be an int >= 1"):
        mock_backend("npu", device_count=count)


def test_device_count_may_be_any_integer_type() -> None:
    np = pytest.importorskip("numpy")
    with mock_backend("npu", device_count=np.int64(2)) as mock:
        assert mock.device_count == 2 and type(mock.device_count) is int
        assert mock.backend.device_count() == 2


def test_a_failing_stand_in_undoes_what_it_did(monkeypatch: pytest.MonkeyPatch) -> None:
    def half_done(mock: VendorMock) -> None:
        mock.patch(torch, "half_done", object())
        raise OSError("vendor library missing")

    monkeypatch.setitem(mock_module._stand_ins, "half", (half_done, "half"))
    with pytest.raises(OSError, match="vendor library missing"), mock_backend("half"):
        pass  # pragma: no cover
    assert not hasattr(torch, "half_done")
    assert active_mocks() == [] and get_backend("auto").name == "cpu"


class ToyBackend(Backend):
    """A backend for a device module 'toy' that only exists under its stand-in."""

    name = "toy"
    device_type = "toy"
    priority = 5


@pytest.fixture
def toy_registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """ToyBackend registered, and stand-ins registered by the test forgotten afterwards."""
    monkeypatch.setattr(mock_module, "_stand_ins", dict(mock_module._stand_ins))
    register_backend(ToyBackend)
    yield
    registry.unregister_backend("toy")


def test_register_stand_in_teaches_mock_backend_a_new_device(toy_registered: None) -> None:
    @register_stand_in("toy")
    def toy(mock: VendorMock) -> None:
        mock.patch(torch, "toy", mock.device_module("torch.toy"))

    with mock_backend("toy", device_count=3) as mock:
        backend = get_backend("auto")
        assert isinstance(backend, ToyBackend)
        assert backend.device_count() == 3
    assert "torch.toy.device_count" in mock.call_names()
    assert not hasattr(torch, "toy")
    with pytest.raises(ValueError, match="already registered"):
        register_stand_in("toy", lambda mock: None)
    register_stand_in("toy", lambda mock: None, override=True)


def test_stand_ins_load_from_the_entry_point_group(
    make_plugin_dist: Callable[[str, dict[str, str]], None],
    monkeypatch: pytest.MonkeyPatch,
    toy_registered: None,
) -> None:
    make_plugin_dist(
        "[hwoptim.stand_ins]\ntoy = toy_stand_in:install\n",
        {
            "toy_stand_in": """
                import torch

                def install(mock):
                    mock.patch(torch, "toy", mock.device_module("torch.toy"))
            """
        },
    )
    monkeypatch.setattr(mock_module, "_entry_points_loaded", False)
    with mock_backend("toy") as mock:
        assert isinstance(get_backend("auto"), ToyBackend)
    assert "torch.toy.is_available" in mock.call_names()


def test_a_built_in_stand_in_is_replaced_only_on_purpose(monkeypatch: pytest.MonkeyPatch) -> None:
    from hwoptim.testing import stand_ins

    monkeypatch.setattr(mock_module, "_stand_ins", dict(mock_module._stand_ins))
    with pytest.raises(ValueError, match="a stand-in for 'npu' is already registered"):
        register_stand_in("npu", lambda mock: None)
    installed: list[str] = []

    @register_stand_in("npu", override=True)
    def npu_with_note(mock: VendorMock) -> None:
        stand_ins.npu(mock)
        installed.append(mock.name)

    with mock_backend("npu"):
        assert get_backend("auto").name == "npu"
    assert installed == ["npu"]


def test_a_stand_in_name_get_backend_could_not_find_is_refused() -> None:
    with pytest.raises(ValueError, match=r"'MyDev' has capitals.*use 'mydev'"):
        register_stand_in("MyDev", lambda mock: None)
    with pytest.raises(ValueError, match="has capitals"):
        register_stand_in("mydev", lambda mock: None, backend="MyDev")
    assert "mydev" not in stand_in_names()


def test_a_name_that_is_no_str_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="mock_backend takes a backend name such as 'npu'; got int"):
        mock_backend(3)  # type: ignore[arg-type]
    assert active_mocks() == []
