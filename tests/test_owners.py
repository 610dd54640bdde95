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
from hwoptim.clip import GroupLayout


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


def _finishing_guard(clip: bool, **kwargs: object) -> tuple[hwoptim.OptimWrapper, object]:
    """A wrapper whose guard is about to finish a compiled first call that failed after
    its step (``Guard._finish_after_step``), with an inf norm from that call."""
    model = nn.Linear(2, 1)
    fused = kwargs.pop("fused", False)
    params = model.parameters()
    opt = torch.optim.AdamW(params, lr=0.1, fused=True) if fused else torch.optim.SGD(params, lr=0.1)
    wrapper = hwoptim.OptimWrapper(opt, clip_grad=dict(max_norm=1.0) if clip else None, **kwargs)  # type: ignore[arg-type]
    guard = wrapper._guard
    wrapper._skips.materialize(torch.device("cpu"), 1 if clip else None)
    if clip:
        guard.layout_of(wrapper._binding.params())
        guard.last_grad_norm = torch.tensor(float("inf"))
        guard.last_group_norms = torch.tensor([float("inf")])
    return wrapper, guard


def _counts(wrapper: hwoptim.OptimWrapper) -> tuple[float, float]:
    wrapper._skips.fold()
    return float(wrapper._skips.skipped), float(wrapper._skips.zeroed)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "want"), [({}, (0.0, 1.0)), ({"exact_skip": True}, (0.0, 1.0)),
                                              ({"fused": True}, (1.0, 0.0))])
def test_a_compiled_update_finished_after_its_step_is_counted_once_by_its_policy(
    kwargs: dict[str, object], want: tuple[float, float]
) -> None:
    """The compiled first call failed after the step: the update is counted -- skipped for
    a fused optimizer (found_inf skipped it), zeroed otherwise (exact_skip's copies were
    lost with the call) -- with its norms and non-finite groups, and never twice."""
    wrapper, guard = _finishing_guard(True, **kwargs)
    norm, groups = guard.last_grad_norm, guard.last_group_norms
    before = wrapper._skips.snapshot()
    out = guard._finish_after_step(before, None, None)
    assert out is not None and out[0] is norm and out[1] is groups
    assert _counts(wrapper) == want
    assert {k: bool(v) for k, v in wrapper.nonfinite_groups.items()} == {0: True}
    again = guard._finish_after_step(before, None, None)  # the counts moved since ``before``
    assert again is not None and again[0] is norm
    assert _counts(wrapper) == want


def test_a_compiled_update_finished_after_its_step_counts_a_scalers_skip_as_skipped() -> None:
    wrapper, guard = _finishing_guard(True)
    guard._finish_after_step(wrapper._skips.snapshot(), torch.tensor(1.0), None)
    assert _counts(wrapper) == (1.0, 0.0)
    assert {k: bool(v) for k, v in wrapper.nonfinite_groups.items()} == {0: True}


def test_the_non_finite_groups_are_unknown_while_the_flags_describe_other_groups() -> None:
    """Flags of one group, a layout of two (the groups changed before any update with them
    was counted): no answer rather than a stale one."""
    wrapper, guard = _finishing_guard(True)
    guard._finish_after_step(wrapper._skips.snapshot(), None, None)
    assert len(wrapper.nonfinite_groups) == 1
    params = wrapper._binding.params()
    guard.layout = GroupLayout([{"params": params[:1]}, {"params": params[1:]}], params)
    assert wrapper.nonfinite_groups == {}


def test_a_compiled_update_finished_after_its_step_without_clipping_counts_only_an_empty_window() -> None:
    wrapper, guard = _finishing_guard(False)
    assert guard._finish_after_step(wrapper._skips.snapshot(), None, None) is None
    assert _counts(wrapper) == (0.0, 0.0)
    assert guard._finish_after_step(wrapper._skips.snapshot(), None, torch.tensor(1.0)) is None
    assert _counts(wrapper) == (0.0, 1.0)
    assert guard._finish_after_step(wrapper._skips.snapshot(), None, torch.tensor(0.0)) is None
    assert _counts(wrapper) == (0.0, 1.0)
