"""optim_context's per-micro-batch decisions, made once per model (issue 5's lean hot path)."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch
from helpers import WithNoSync
from torch import nn

import hwoptim


def _train(wrapper: hwoptim.OptimWrapper, model: nn.Module, steps: int) -> None:
    for _ in range(steps):
        with wrapper.optim_context(model):
            loss = model(torch.ones(1, 2)).sum()
        wrapper.update_params(loss)


def _wrapper(model: nn.Module, accumulative_counts: int = 2) -> hwoptim.OptimWrapper:
    wrapper = hwoptim.OptimWrapper(
        torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=accumulative_counts
    )
    wrapper.initialize_count_status(model, 0, 4)
    return wrapper


def test_a_plain_module_enters_no_sync_context() -> None:
    model = nn.Linear(2, 2)
    wrapper = _wrapper(model)
    entered: list[Any] = []
    wrapper._binding._no_sync = lambda m: entered.append(m) or contextlib.nullcontext()
    _train(wrapper, model, 4)
    assert entered == []
    assert wrapper.inner_count == 4


def test_a_module_with_no_sync_skips_it_on_each_accumulating_micro_batch() -> None:
    model = WithNoSync()
    _train(_wrapper(model), model, 4)
    assert model.log == ["off", "on", "off", "on"]


def test_without_accumulation_the_sync_is_never_skipped() -> None:
    model = WithNoSync()
    _train(_wrapper(model, accumulative_counts=1), model, 3)
    assert model.log == []


def test_a_class_changed_in_place_after_binding_is_seen() -> None:
    """fully_shard (FSDP2) turns a module into an FSDP module by changing its class."""
    model = nn.Linear(2, 2)
    wrapper = _wrapper(model)  # bound while plain
    calls: list[bool] = []

    class Sharded(nn.Linear):
        def set_requires_gradient_sync(self, flag: bool) -> None:
            calls.append(flag)

    model.__class__ = Sharded
    _train(wrapper, model, 4)
    assert calls == [False, True, False, True]


def test_an_exception_in_the_forward_releases_the_sync_skip_and_autocast() -> None:
    model = WithNoSync()
    wrapper = hwoptim.AmpOptimWrapper(
        torch.optim.SGD(model.parameters(), lr=0.1), device="cpu", dtype="bfloat16",
        accumulative_counts=2,
    )
    wrapper.initialize_count_status(model, 0, 4)
    with pytest.raises(KeyError), wrapper.optim_context(model):
        assert torch.is_autocast_enabled("cpu")
        raise KeyError("forward failed")
    assert model.log == ["off", "on"]
    assert not torch.is_autocast_enabled("cpu")


def test_amp_optim_context_autocasts_inside_only() -> None:
    model = nn.Linear(2, 2)
    wrapper = hwoptim.AmpOptimWrapper(
        torch.optim.SGD(model.parameters(), lr=0.1), device="cpu", dtype="bfloat16"
    )
    with wrapper.optim_context(model):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert model(torch.ones(1, 2)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
