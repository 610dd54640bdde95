"""The owners OptimWrapper composes, each on its own (docs/architecture.md)."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
from torch import nn

import hwoptim
from hwoptim import _extensions
from hwoptim._checkpoint import LoadPlan
from hwoptim._skips import FOLD_EVERY, NONFINITE, SKIPPED, ZEROED, SkipCounter
from hwoptim._window import AccumulationWindow


def test_the_skip_counter_counts_each_kind_in_one_fold() -> None:
    counter = SkipCounter()
    assert counter.skipped is None and counter.zeroed is None
    counter.add(SKIPPED, torch.tensor(1.0))
    counter.add(SKIPPED, torch.tensor(0.0))
    counter.add(ZEROED, torch.tensor(2.0))  # a summed found_inf: > 0 counts once
    counter.add(NONFINITE, torch.tensor(float("nan")))
    counter.add(NONFINITE, torch.tensor(3.0))
    assert counter.pending == 5
    counter.fold()
    assert counter.pending == 0
    assert (float(counter.skipped), float(counter.zeroed)) == (1.0, 2.0)


def test_the_skip_counter_folds_by_itself_every_so_many_records() -> None:
    counter = SkipCounter()
    for _ in range(FOLD_EVERY):
        counter.add(SKIPPED, torch.tensor(1.0))
    assert counter.pending == 0 and float(counter.skipped) == FOLD_EVERY


def test_the_window_divides_the_remainder_window_by_its_length() -> None:
    window = AccumulationWindow(4)
    window.resume(*window.start(0, 10))  # windows 0-3, 4-7, then 8-9 (two micro-batches)
    factors = []
    for _ in range(10):
        factors.append(window.loss_factor())
        window.inner += 1
    assert factors == [4] * 8 + [2] * 2


def test_a_load_plan_cannot_be_changed_after_the_checks() -> None:
    plan = LoadPlan(optimizer_state={"state": {}, "param_groups": []})
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.counters = (1, 2, False)  # type: ignore[misc]


def test_a_subscriber_gets_every_new_wrapper_and_adds_its_placement_advice() -> None:
    seen: list[object] = []
    _extensions.subscribe("test-owner", on_new_wrapper=seen.append, placement_advice=lambda: "; ask the test")
    try:
        model = nn.Linear(2, 1)
        wrapper = hwoptim.OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
        assert seen == [wrapper]
        model.weight = nn.Parameter(torch.empty_like(model.weight, device="meta"))
        model.bias = nn.Parameter(torch.empty_like(model.bias, device="meta"))
        with pytest.raises(RuntimeError, match="ask the test"):
            wrapper.initialize_count_status(model, 0, 10)
    finally:
        _extensions.unsubscribe("test-owner")
    hwoptim.OptimWrapper(torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1))
    assert len(seen) == 1  # unsubscribed: nothing more


def test_under_mmengines_runner_the_placement_error_names_the_constructor() -> None:
    pytest.importorskip("mmengine.runner")
    import hwoptim.mmengine

    assert "mmengine.runner" in sys.modules
    model = nn.Linear(2, 1)
    wrapper = hwoptim.OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    model.weight = nn.Parameter(torch.empty_like(model.weight, device="meta"))
    model.bias = nn.Parameter(torch.empty_like(model.bias, device="meta"))
    with pytest.raises(RuntimeError, match=r"under mmengine's Runner.*hwoptim.OptimWrapperConstructor"):
        wrapper.initialize_count_status(model, 0, 10)
