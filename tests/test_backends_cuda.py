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


def test_a_cuda_build_without_a_gpu_says_none_is_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    expected = "'cuda' backend is not available: torch was built with CUDA but no GPU is visible"
    with pytest.raises(RuntimeError, match=expected):
        get_backend("cuda")


def test_the_mock_steps_torchs_optimizers_on_a_cuda_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's Adam asks whether a CUDA graph is being captured where CUDA is built and
    available (the question differs between torch versions): under the mock the stand-in
    answers, not the driver, so a CUDA build of torch without a GPU runs it too."""
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:  # torch's accelerator is then cuda, as on a CUDA build
        monkeypatch.setattr(accelerator, "current_accelerator", lambda check_available=False: torch.device("cuda"))
    original_stream = getattr(accelerator, "current_stream", None)
    model = torch.nn.Linear(4, 1)
    before = model.weight.detach().clone()
    with mock_backend("cuda") as mock:
        assert torch.cuda.is_current_stream_capturing() is False
        if accelerator is not None and hasattr(accelerator, "current_stream"):
            assert torch.accelerator.current_stream().is_capturing() is False
        wrapper = AmpOptimWrapper(torch.optim.AdamW(model.parameters()), device="cuda", dtype="bfloat16")
        with wrapper.optim_context(model):
            loss = model(torch.randn(2, 4)).float().pow(2).mean()
        wrapper.update_params(loss)
    assert not torch.equal(model.weight, before)
    assert "torch.cuda.is_current_stream_capturing" in mock.call_names()
    assert getattr(accelerator, "current_stream", None) is original_stream  # restored


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
