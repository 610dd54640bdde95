"""The xpu backend (Intel GPUs): native torch.xpu, bf16 by default, xccl, no IPEX needed."""

from __future__ import annotations

import sys

import pytest
import torch

from hwoptim import AmpOptimWrapper, get_backend
from hwoptim.backends.xpu import XpuBackend
from hwoptim.testing import mock_backend
from hwoptim.testing.stand_ins import MOCK_VERSION


def model_optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)


def test_bf16_by_default_without_a_scaler_and_xccl() -> None:
    with mock_backend("xpu"):
        wrapper = AmpOptimWrapper(model_optimizer(), device="auto")
    assert isinstance(wrapper.backend, XpuBackend)
    assert wrapper.cast_dtype == torch.bfloat16
    assert wrapper.loss_scaler is None
    assert wrapper.backend.dist_backend == "xccl"


def test_fp16_is_allowed_and_gets_a_torch_grad_scaler() -> None:
    with mock_backend("xpu"):
        wrapper = AmpOptimWrapper(model_optimizer(), device="xpu", dtype="float16")
    assert wrapper.cast_dtype == torch.float16
    assert type(wrapper.loss_scaler) is torch.amp.GradScaler


def test_no_intel_extension_is_imported() -> None:
    with mock_backend("xpu"):
        AmpOptimWrapper(model_optimizer(), device="xpu").backend.describe()
    assert "intel_extension_for_pytorch" not in sys.modules


def test_versions_report_torchs_xpu_build() -> None:
    with mock_backend("xpu"):
        versions = get_backend("xpu").describe()["versions"]
    assert versions["torch xpu"] == MOCK_VERSION


def test_devices_come_from_torch_xpu() -> None:
    with mock_backend("xpu", device_count=3) as mock:
        backend = get_backend("xpu:2")
        assert backend.device_count() == 3 and backend.index == 2
        backend.set_device(2)
        backend.manual_seed(7)
    assert "torch.xpu.set_device" in mock.call_names()
    assert "torch.xpu.manual_seed_all" in mock.call_names()


def test_without_xpu_support_it_says_which_torch_to_install() -> None:
    if XpuBackend().is_available():
        pytest.skip("an XPU is available here")
    if torch.xpu._is_compiled():
        assert "no Intel GPU is visible" in XpuBackend().unavailable_reason()
    else:
        assert "download.pytorch.org/whl/xpu" in XpuBackend().unavailable_reason()


@pytest.mark.xpu
def test_on_a_real_xpu_auto_picks_it() -> None:
    wrapper = AmpOptimWrapper(model_optimizer(), device="auto")
    assert wrapper.device.type == "xpu" and wrapper.cast_dtype == torch.bfloat16
