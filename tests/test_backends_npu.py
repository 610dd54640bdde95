"""The npu backend (Huawei Ascend): torch_npu imported lazily, its own scaler, hccl, and
reasons that tell 'not installed' from 'broken' from 'no device'."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from hwoptim import AmpOptimWrapper, get_backend
from hwoptim.backends.npu import NpuBackend
from hwoptim.testing import VendorMock, mock_backend
from hwoptim.testing import mock as mock_module
from hwoptim.testing.stand_ins import MOCK_VERSION

TORCH_NPU_INSTALLED = importlib.util.find_spec("torch_npu") is not None


def test_class_facts() -> None:
    assert (NpuBackend.name, NpuBackend.device_type) == ("npu", "npu")
    assert NpuBackend.dist_backend == "hccl"
    assert NpuBackend.default_dtype == torch.float16


@pytest.mark.skipif(TORCH_NPU_INSTALLED, reason="torch_npu is installed here")
def test_without_torch_npu_it_is_unavailable_and_says_what_to_install() -> None:
    backend = NpuBackend()
    assert backend.is_available() is False
    assert backend.device_count() == 0
    reason = backend.unavailable_reason()
    assert reason.startswith("torch_npu is not installed")
    assert 'pip install "hwoptim[npu]"' in reason and "CANN" in reason


def test_fp16_by_default_scaled_by_torch_npus_grad_scaler() -> None:
    with mock_backend("npu") as mock:
        optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
        wrapper = AmpOptimWrapper(optimizer, device="auto", loss_scale={"init_scale": 128.0})
    assert isinstance(wrapper.backend, NpuBackend)
    assert wrapper.cast_dtype == torch.float16
    built = [c for c in mock.calls if c.name == "torch_npu.npu.amp.GradScaler"]
    assert len(built) == 1 and built[0].kwargs["init_scale"] == 128.0


def test_the_sharded_scaler_is_torchs() -> None:
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    with mock_backend("npu") as mock:
        scaler = get_backend("npu").grad_scaler(sharded=True)
    assert isinstance(scaler, ShardedGradScaler)
    assert "torch_npu.npu.amp.GradScaler" not in mock.call_names()


def test_bf16_is_offered_only_where_torch_npu_reports_it(monkeypatch: pytest.MonkeyPatch) -> None:
    with mock_backend("npu"):
        backend = get_backend("npu")
        assert torch.bfloat16 in backend.amp_dtypes
        monkeypatch.setattr(torch.npu, "is_bf16_supported", lambda: False)  # Atlas 910A
        assert backend.amp_dtypes == (torch.float16, torch.float32)
        with pytest.raises(ValueError, match=r"'npu' backend cannot autocast to bfloat16"):
            backend.resolve_dtype("bfloat16")


def test_versions_report_torch_npu_and_cann() -> None:
    with mock_backend("npu"):
        facts = get_backend("npu").describe()
    assert facts["versions"] == {"torch_npu": MOCK_VERSION, "cann": MOCK_VERSION}
    assert facts["dist_backend"] == "hccl"


def test_a_torch_npu_that_fails_to_import_is_reported_as_broken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(mock: VendorMock) -> None:
        def fail(module: object) -> None:
            raise OSError("libascendcl.so: cannot open shared object file")

        mock.vendor_module("torch_npu", on_import=fail)

    monkeypatch.setitem(mock_module._stand_ins, "npu-broken", (broken, "npu"))
    with mock_backend("npu-broken", select=False):
        backend = NpuBackend()
        assert backend.is_available() is False
        assert backend.unavailable_reason().startswith(
            "torch_npu is installed but failed to import: OSError: libascendcl.so"
        )


def test_torch_npu_without_a_device_says_to_check_the_driver(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_device(mock: VendorMock) -> None:
        device = mock.device_module("torch.npu", is_available=lambda: False)
        mock.vendor_module("torch_npu", on_import=lambda m: mock.patch(torch, "npu", device))

    monkeypatch.setitem(mock_module._stand_ins, "npu-empty", (no_device, "npu"))
    message = r"torch_npu is installed but no npu device is visible to this process \(check npu-smi"
    with mock_backend("npu-empty", select=False), pytest.raises(RuntimeError, match=message):
        get_backend("npu")


@pytest.mark.npu
def test_on_a_real_npu_auto_picks_it_and_a_step_runs_there() -> None:
    wrapper = AmpOptimWrapper(
        torch.optim.SGD(torch.nn.Linear(4, 1).npu().parameters(), lr=0.1), device="auto"
    )
    assert wrapper.device.type == "npu"
    assert type(wrapper.loss_scaler).__module__.startswith("torch_npu")
