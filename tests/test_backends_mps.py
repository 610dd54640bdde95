"""The mps backend (Apple GPUs): fp16, bf16 only from macOS 14, no float64, one device."""

from __future__ import annotations

import pytest
import torch

from hwoptim import AmpOptimWrapper, get_backend
from hwoptim.backends.mps import MpsBackend
from hwoptim.testing import mock_backend


def test_fp16_by_default_with_a_scaler_and_gloo() -> None:
    with mock_backend("mps"):
        optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
        wrapper = AmpOptimWrapper(optimizer, device="auto")
    assert isinstance(wrapper.backend, MpsBackend)
    assert wrapper.cast_dtype == torch.float16
    assert isinstance(wrapper.loss_scaler, torch.amp.GradScaler)
    assert wrapper.backend.dist_backend == "gloo"


@pytest.mark.parametrize("dtype", ["float64", "fp64", torch.float64])
def test_float64_is_refused_saying_metal_has_none(dtype: object) -> None:
    message = r"cannot autocast to float64; it supports .*Metal has no float64"
    with mock_backend("mps"), pytest.raises(ValueError, match=message):
        get_backend("mps").resolve_dtype(dtype)  # type: ignore[arg-type]


def test_bf16_only_where_torch_reports_macos_14(monkeypatch: pytest.MonkeyPatch) -> None:
    with mock_backend("mps"):
        backend = get_backend("mps")
        assert backend.amp_dtypes == (torch.float16, torch.bfloat16, torch.float32)
        monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: False)
        assert backend.amp_dtypes == (torch.float16, torch.float32)
        with pytest.raises(ValueError, match="cannot autocast to bfloat16"):
            backend.resolve_dtype("bfloat16")


def test_there_is_exactly_one_device() -> None:
    with mock_backend("mps", device_count=4):
        backend = get_backend("mps")
        assert backend.device_count() == 1 and backend.current_device() == 0
        with pytest.raises(ValueError, match="one device, index 0; got 1"):
            backend.set_device(1)
        with pytest.raises(ValueError, match="device mps:1 does not exist"):
            get_backend("mps:1")


def test_memory_and_name_come_from_torch_mps() -> None:
    with mock_backend("mps") as mock:
        backend = get_backend("mps")
        assert backend.memory_stats() == {"current_allocated_bytes": 0, "driver_allocated_bytes": 0}
        assert backend.describe()["devices"] == ["hwoptim mock of an Apple GPU"]
    assert "torch.mps.current_allocated_memory" in mock.call_names()


def test_unavailable_never_raises_and_explains() -> None:
    backend = MpsBackend()
    if backend.is_available():
        pytest.skip("MPS is available here")
    assert backend.device_count() == 0
    assert backend.amp_dtypes == (torch.float16, torch.float32)  # no macOS version to ask
    assert "macOS 12.3+" in backend.unavailable_reason()


@pytest.mark.mps
def test_on_a_real_mac_auto_picks_mps() -> None:
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).to("mps").parameters(), lr=0.1)
    assert AmpOptimWrapper(optimizer, device="auto").device.type == "mps"
