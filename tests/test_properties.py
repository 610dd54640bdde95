"""Properties of accumulation, checked over many shapes with hypothesis.

- accumulating k micro-batches equals one step on the k-times larger batch;
- the remainder rule: with max_counts % k != 0 the last, shorter window equals one step on
  its own concatenated micro-batches;
- a run resumed from state_dict() at any window boundary ends exactly where the
  uninterrupted run ends;
- the counters: should_sync() before a backward agrees with should_update() after it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hwoptim import OptimWrapper

SETTINGS = settings(max_examples=25, deadline=None)


def model_and_data(n: int, batch: int, seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(n, batch, 3, dtype=torch.float64)
    y = torch.randn(n, batch, 2, dtype=torch.float64)
    return model, x, y


def make_optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=0.01)


def windows(n: int, k: int) -> list[range]:
    return [range(start, min(start + k, n)) for start in range(0, n, k)]


def reference(model: nn.Module, kind: str, x: torch.Tensor, y: torch.Tensor, k: int) -> nn.Module:
    """Each window is one step on its concatenated micro-batches (mean loss)."""
    optimizer = make_optimizer(kind, model)
    for window in windows(len(x), k):
        idx = list(window)
        loss = nn.functional.mse_loss(model(x[idx].flatten(0, 1)), y[idx].flatten(0, 1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def with_wrapper(model: nn.Module, kind: str, x: torch.Tensor, y: torch.Tensor, k: int) -> nn.Module:
    wrapper = OptimWrapper(make_optimizer(kind, model), accumulative_counts=k)
    wrapper.initialize_count_status(model, 0, len(x))
    for i in range(len(x)):
        with wrapper.optim_context(model):
            loss = nn.functional.mse_loss(model(x[i]), y[i])
        wrapper.update_params(loss)
    return model


def assert_params_close(a: nn.Module, b: nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)


@SETTINGS
@given(k=st.integers(1, 5), batch=st.integers(1, 4), kind=st.sampled_from(["sgd", "adamw"]),
       seed=st.integers(0, 10_000))
def test_k_micro_batches_equal_one_step_on_the_k_times_larger_batch(k, batch, kind, seed):
    model, x, y = model_and_data(2 * k, batch, seed)
    assert_params_close(with_wrapper(copy.deepcopy(model), kind, x, y, k), reference(model, kind, x, y, k))


@SETTINGS
@given(k=st.integers(2, 5), n=st.integers(1, 13), batch=st.integers(1, 3), kind=st.sampled_from(["sgd", "adamw"]),
       seed=st.integers(0, 10_000))
def test_the_last_shorter_window_is_one_step_on_its_own_micro_batches(k, n, batch, kind, seed):
    model, x, y = model_and_data(n, batch, seed)
    assert_params_close(with_wrapper(copy.deepcopy(model), kind, x, y, k), reference(model, kind, x, y, k))


@SETTINGS
@given(k=st.integers(1, 4), n_windows=st.integers(2, 5), tail=st.integers(0, 3), split=st.integers(1, 4),
       seed=st.integers(0, 10_000))
def test_resume_at_a_window_boundary_continues_exactly(k, n_windows, tail, split, seed):
    n = k * n_windows + tail % k if k > 1 else k * n_windows
    split_at = min(split, n_windows - 1) * k
    model, x, y = model_and_data(n, 2, seed)

    def run(model: nn.Module, wrapper: OptimWrapper, steps: range) -> None:
        for i in steps:
            with wrapper.optim_context(model):
                loss = nn.functional.mse_loss(model(x[i]), y[i])
            wrapper.update_params(loss)

    straight = copy.deepcopy(model)
    wrapper = OptimWrapper(make_optimizer("adamw", straight), accumulative_counts=k, clip_grad=dict(max_norm=0.5))
    wrapper.initialize_count_status(straight, 0, n)
    run(straight, wrapper, range(n))

    first = copy.deepcopy(model)
    first_wrapper = OptimWrapper(make_optimizer("adamw", first), accumulative_counts=k, clip_grad=dict(max_norm=0.5))
    first_wrapper.initialize_count_status(first, 0, n)
    run(first, first_wrapper, range(split_at))
    checkpoint = copy.deepcopy((first.state_dict(), first_wrapper.state_dict()))

    resumed = copy.deepcopy(model)
    resumed.load_state_dict(checkpoint[0])
    resumed_wrapper = OptimWrapper(make_optimizer("adamw", resumed), accumulative_counts=k,
                                   clip_grad=dict(max_norm=0.5))
    resumed_wrapper.load_state_dict(checkpoint[1])
    run(resumed, resumed_wrapper, range(split_at, n))
    for p, q in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(p, q)


@pytest.mark.filterwarnings("ignore:Resumed iteration number")
@settings(max_examples=200, deadline=None)
@given(k=st.integers(1, 6), max_counts=st.integers(1, 40), init=st.integers(0, 40), extra=st.integers(0, 8))
def test_should_sync_before_backward_agrees_with_should_update_after(k, max_counts, init, extra):
    init = min(init, max_counts)
    wrapper = OptimWrapper(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), accumulative_counts=k)
    wrapper.initialize_count_status(None, init, max_counts)
    window = 0
    for _ in range(max_counts - init + extra):  # past max_counts too
        sync = wrapper.should_sync()
        factor = float(1 / wrapper.scale_loss(torch.tensor(1.0, dtype=torch.float64)))
        assert factor > 0
        wrapper._window.inner += 1
        window += 1
        assert wrapper.should_update() == sync
        if sync:
            before_max = wrapper.inner_count <= max_counts
            aligned_start = wrapper.inner_count - window >= 0 and (wrapper.inner_count - window) % k == 0
            if before_max and aligned_start and (wrapper.inner_count - window) >= init:
                # a whole window inside the run: divided by exactly its length
                assert factor == window
            window = 0
