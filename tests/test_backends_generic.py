"""The generic backend: any accelerator torch reports that no backend claims works
through torch.accelerator, torch.autocast and torch.amp.GradScaler."""

from __future__ import annotations

import types
from collections.abc import Iterator

import pytest
import torch

from hwoptim import AmpOptimWrapper, get_backend
from hwoptim.backends import generic
from hwoptim.backends.generic import GenericBackend, generic_backend_for
from hwoptim.testing import mock_backend
from hwoptim.testing.stand_ins import GENERIC_DEVICE_TYPE


@pytest.fixture
def fresh_generic_classes() -> Iterator[None]:
    generic._generic_class.cache_clear()
    yield
    generic._generic_class.cache_clear()


@pytest.mark.parametrize("device_type", ["cpu", "cuda", "xpu", "npu", "mps"])
def test_a_claimed_device_type_gets_no_generic_backend(device_type: str) -> None:
    assert generic_backend_for(device_type) is None


@pytest.mark.parametrize("device_type", ["meta", "distributed", "nonsense", ""])
def test_what_torch_does_not_know_as_an_accelerator_gets_none(device_type: str) -> None:
    assert generic_backend_for(device_type) is None


@pytest.mark.parametrize("device_type", ["privateuseone", "mtia"])
def test_the_privateuse1_name_and_device_modules_get_one_class_each(device_type: str) -> None:
    cls = generic_backend_for(device_type)
    assert cls is not None and issubclass(cls, GenericBackend)
    assert (cls.name, cls.device_type) == (device_type, device_type)
    assert generic_backend_for(device_type) is cls
    assert cls().is_available() is False  # not torch's current accelerator here


def test_auto_picks_the_current_accelerator_and_trains_on_it() -> None:
    with mock_backend("generic", device_count=2) as mock:
        model = torch.nn.Linear(4, 1)
        wrapper = AmpOptimWrapper(
            torch.optim.SGD(model.parameters(), lr=0.1), device="auto", accumulative_counts=2
        )
        wrapper.initialize_count_status(model, 0, 2)
        for _ in range(2):
            with wrapper.optim_context(model):
                loss = model(torch.randn(3, 4)).float().pow(2).mean()
            wrapper.update_params(loss)
        backend = wrapper.backend
        assert isinstance(backend, GenericBackend) and backend.name == GENERIC_DEVICE_TYPE
        assert wrapper.cast_dtype == torch.get_autocast_dtype(GENERIC_DEVICE_TYPE)
        assert type(wrapper.loss_scaler) is torch.amp.GradScaler
        assert backend.device_count() == 2
        backend.set_device(1)
        assert backend.current_device() == 1
    assert "torch.accelerator.set_device_index" in mock.call_names()
    assert "torch.accelerator.current_device_index" in mock.call_names()


def test_the_mock_brings_torch_accelerator_where_torch_has_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch older than 2.6 has no torch.accelerator: mock_backend("generic") still works,
    and takes its stand-in away again."""
    monkeypatch.delattr(torch, "accelerator", raising=False)
    with mock_backend("generic"):
        backend = get_backend("auto")
        assert isinstance(backend, GenericBackend) and backend.device_count() == 1
    assert not hasattr(torch, "accelerator")


def test_amp_dtypes_come_from_the_device_module(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.SimpleNamespace(get_amp_supported_dtype=lambda: [torch.bfloat16])
    monkeypatch.setattr(torch, GENERIC_DEVICE_TYPE, module, raising=False)
    with mock_backend("generic"):
        backend = get_backend("auto")
        assert backend.amp_dtypes == (torch.bfloat16, torch.float32)
        # torch's default for the type (float16) is not offered: the first one is
        assert backend.default_amp_dtype == torch.bfloat16


def test_the_dist_backend_comes_from_torch_distributed(
    monkeypatch: pytest.MonkeyPatch, fresh_generic_classes: None
) -> None:
    import torch.distributed as dist

    monkeypatch.setitem(dist.Backend.default_device_backend_map, GENERIC_DEVICE_TYPE, "vendorccl")
    cls = generic_backend_for(GENERIC_DEVICE_TYPE)
    assert cls is not None and cls.dist_backend == "vendorccl"
    assert generic_backend_for("mtia").dist_backend == "gloo"  # type: ignore[union-attr]


def test_an_absent_accelerator_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match=r"no usable 'mtia' accelerator.*current accelerator is"):
        get_backend("mtia")


def test_synchronize_falls_back_to_the_device_module_where_torch_accelerator_cannot(monkeypatch):
    """A device registered from Python (hwoptim.testing.emulated) has no C++ guard that
    synchronizes: torch.accelerator.synchronize raises, its device module does not."""

    def refuse() -> None:
        raise RuntimeError("Backend doesn't support synchronizing all streams on device.")

    synchronized = []
    with mock_backend("generic"):
        backend = get_backend("auto")
        monkeypatch.setattr(torch.accelerator, "synchronize", refuse)  # the mock's module
        monkeypatch.setattr(torch, GENERIC_DEVICE_TYPE,
                            types.SimpleNamespace(synchronize=lambda: synchronized.append(True)), raising=False)
        backend.synchronize()
        assert synchronized == [True]
        monkeypatch.delattr(torch, GENERIC_DEVICE_TYPE)
        with pytest.raises(RuntimeError, match="synchronizing all streams"):
            backend.synchronize()  # no module to fall back on: torch's own error
