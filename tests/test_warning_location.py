"""Every public warning points at the user's line: the file that called the public entry.

However deep inside hwoptim a warning is decided, and through whichever public entry
(a subclass's, an OptimWrapperDict's, mmengine's pattern of calling scale_loss directly),
``warnings`` reports this file.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import pytest
import torch
from torch import nn

import hwoptim._checkpoint
from hwoptim import AmpOptimWrapper, OptimWrapper, OptimWrapperDict


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 1))


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1)


def _loss(model: nn.Module) -> torch.Tensor:
    return model(torch.ones(2, 3)).sum()


def _reported_files(action: Callable[[], Any], match: str) -> list[str]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        action()
    files = [w.filename for w in record if match in str(w.message)]
    assert files, f"no warning matching {match!r}: {[str(w.message) for w in record]}"
    return files


def test_the_unknown_end_warning_of_update_params_points_here() -> None:
    model = _model()
    wrapper = OptimWrapper(_sgd(model), accumulative_counts=2)
    assert _reported_files(lambda: wrapper.update_params(_loss(model)), "initialize_count_status") == [__file__]


def test_the_unknown_end_warning_of_scale_loss_called_directly_points_here() -> None:
    """mmengine's own pattern: loss = wrapper.scale_loss(loss); wrapper.backward(loss)."""
    model = _model()
    wrapper = OptimWrapper(_sgd(model), accumulative_counts=2)
    assert _reported_files(lambda: wrapper.scale_loss(_loss(model)), "initialize_count_status") == [__file__]


def test_the_unknown_end_warning_with_num_items_points_here() -> None:
    model = _model()
    wrapper = OptimWrapper(_sgd(model), accumulative_counts=2)
    files = _reported_files(lambda: wrapper.update_params(_loss(model), num_items=2), "initialize_count_status")
    assert files == [__file__]


def test_the_resume_and_batch_norm_warnings_point_here() -> None:
    model = _model()
    wrapper = OptimWrapper(_sgd(model), accumulative_counts=2)
    assert _reported_files(lambda: wrapper.initialize_count_status(model, 3, 10), "Resumed") == [__file__]
    assert _reported_files(lambda: wrapper.initialize_count_status(model, 0, 10), "BatchNorm") == [__file__]


@pytest.mark.parametrize("kind", ["plain", "amp", "dict"])
def test_the_window_length_mismatch_warning_of_load_state_dict_points_here(kind: str) -> None:
    model = _model()

    def make(acc: int) -> Any:
        if kind == "plain":
            return OptimWrapper(_sgd(model), accumulative_counts=acc)
        if kind == "amp":
            return AmpOptimWrapper(_sgd(model), device="cpu", dtype="bfloat16", accumulative_counts=acc)
        return OptimWrapperDict(a=OptimWrapper(_sgd(model), accumulative_counts=acc))

    saved = make(4).state_dict()
    loader = make(2)
    assert _reported_files(lambda: loader.load_state_dict(saved), "accumulative_counts=4") == [__file__]


@pytest.mark.filterwarnings("ignore:Gradient accumulative")
def test_another_ranks_partial_grads_warning_points_here(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    wrapper = OptimWrapper(_sgd(model), accumulative_counts=2, save_partial_grads=True)
    wrapper.initialize_count_status(model, 0, 10)
    wrapper.update_params(_loss(model))
    saved = wrapper.state_dict()
    monkeypatch.setattr(hwoptim._checkpoint, "_rank", lambda: 1)
    assert _reported_files(lambda: wrapper.load_state_dict(saved), "data-parallel rank 0") == [__file__]


def test_the_ignored_scaler_state_warning_points_here() -> None:
    model = _model()
    fp16 = AmpOptimWrapper(_sgd(model), device="cpu", dtype="float16")
    bf16 = AmpOptimWrapper(_sgd(model), device="cpu", dtype="bfloat16")
    assert _reported_files(lambda: bf16.load_state_dict(fp16.state_dict()), "loss scaler state") == [__file__]


def test_the_empty_window_warning_points_here() -> None:
    model = _model()
    wrapper = OptimWrapper(_sgd(model), clip_grad=dict(max_norm=1.0))
    wrapper.update_params(_loss(model) * 0, num_items=0)
    assert _reported_files(lambda: wrapper.skipped_steps, "had no items") == [__file__]
