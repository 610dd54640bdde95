"""The cuda backend: what it says about its build (ROCm builds call AMD GPUs 'cuda')."""

from __future__ import annotations

import pytest
import torch

from hwoptim import AmpOptimWrapper, get_backend
from hwoptim.backends.cuda import CudaBackend
from hwoptim.testing import mock_backend


def test_a_rocm_build_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    monkeypatch.setattr(torch.version, "cuda", None)
    with mock_backend("cuda"):
        facts = get_backend("cuda").describe()
    assert facts["build"] == "ROCm 6.2.41133: AMD GPUs appear as device type 'cuda'"
    assert facts["versions"]["rocm (hip)"] == "6.2.41133"


def test_a_cuda_build_says_its_cuda_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert CudaBackend().describe()["build"] == "CUDA 12.8"


def test_a_cpu_only_build_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.version, "cuda", None)
    facts = CudaBackend().describe()
    assert facts["build"] == "CPU-only torch build"
    if not facts["available"]:
        assert "CPU-only build" in facts["reason"]


def test_bf16_only_where_the_gpu_supports_it(monkeypatch: pytest.MonkeyPatch) -> None:
    with mock_backend("cuda"):
        backend = get_backend("cuda")
        assert torch.bfloat16 in backend.amp_dtypes
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # pre-Ampere
        assert backend.amp_dtypes == (torch.float16, torch.float32, torch.float64)


@pytest.mark.gpu
def test_on_a_real_gpu_auto_picks_cuda_and_trains_there() -> None:
    model = torch.nn.Linear(8, 1).cuda()
    wrapper = AmpOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), device="auto")
    assert wrapper.backend.name == "cuda" and wrapper.device.type == "cuda"
    x = torch.randn(16, 8, device="cuda")
    with wrapper.optim_context(model):
        loss = model(x).float().pow(2).mean()
    assert loss.dtype == torch.float32
    wrapper.update_params(loss)
    assert wrapper.loss_scale is not None and wrapper.loss_scale.device.type == "cuda"
