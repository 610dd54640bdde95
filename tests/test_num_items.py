"""Item-weighted accumulation: ``update_params(loss, num_items=n)`` (hwoptim/num_items.py and
its glue in wrapper.py / amp.py).

The reference is plain torch doing, per window, what the feature promises: the sum of the
item losses of every micro-batch of the window, divided by the window's item count, one
backward, clip, step. Micro-batches differ in size and padding (a toy causal LM with
``ignore_index``), and the last window is a remainder. hwoptim accumulates per-micro-batch
backward passes and scales the gradients at the leaves instead of the loss at the root, so
the two agree to float rounding, not bit for bit: float64 runs are compared to 1e-12,
float32 to 1e-5, bfloat16 loosely. The 2-process DDP/FSDP2 cases are in
tests/test_distributed.py (num_items scenarios).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import hwoptim
from hwoptim import AmpOptimWrapper, OptimWrapper, OptimWrapperDict
from hwoptim.num_items import (
    LOCAL,
    ItemsReduction,
    check_num_items,
    fsdp2_reduction,
    items_reduction,
)

VOCAB, DIM, PAD = 11, 6, -100


class TinyLM(nn.Module):
    """Embedding -> Linear: next-token logits, enough to make per-token losses differ.

    Its weights come from ``seed``, not from the global generator: what earlier tests drew
    from that (test order, hypothesis, a -k selection) must not pick the weights. Some
    draws make the float32 comparisons fail their tolerance (AdamW's first steps divide by
    the root of tiny second moments, and rounding differences grow); seed 0 is far inside.
    """

    def __init__(self, dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Embedding(VOCAB, DIM, dtype=dtype)
            self.head = nn.Linear(DIM, VOCAB, dtype=dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens)))


Batch = tuple[torch.Tensor, torch.Tensor]


def lm_batches(sizes: Sequence[int], seed: int = 0, max_len: int = 7) -> list[Batch]:
    """Micro-batches of ``sizes[i]`` sequences of random length, right-padded to one length;
    labels are the next tokens with PAD where there is none (every sequence has at least
    one label: windows without items have tests of their own)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for size in sizes:
        length = int(torch.randint(2, max_len + 1, (), generator=g))
        tokens = torch.randint(0, VOCAB, (size, length), generator=g)
        lengths = torch.randint(2, length + 1, (size,), generator=g)
        labels = tokens.roll(-1, dims=1)
        positions = torch.arange(length)
        labels[positions >= lengths[:, None] - 1] = PAD  # past each sequence's end
        out.append((tokens, labels))
    return out


def summed_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    tokens, labels = batch
    logits = model(tokens)
    return F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=PAD, reduction="sum"
    )


def count(batch: Batch) -> torch.Tensor:
    return (batch[1] != PAD).sum()


def windows(n: int, k: int) -> list[range]:
    return [range(start, min(start + k, n)) for start in range(0, n, k)]


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=0.05)


def reference(
    model: nn.Module,
    batches: Sequence[Batch],
    k: int,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] = sgd,
    clip_grad: dict[str, Any] | None = None,
) -> tuple[nn.Module, list[torch.Tensor]]:
    """Plain torch: per window, sum of item losses / item count; returns the window losses."""
    optimizer = make_optimizer(model)
    losses = []
    for window in windows(len(batches), k):
        total = sum(summed_loss(model, batches[i]) for i in window)
        items = sum(count(batches[i]) for i in window)
        loss = total / items
        loss.backward()
        if clip_grad is not None and clip_grad.get("type") == "value":
            nn.utils.clip_grad_value_(model.parameters(), clip_grad["clip_value"])
        elif clip_grad is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad["max_norm"])
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return model, losses


def with_items(
    wrapper: OptimWrapper, model: nn.Module, batches: Sequence[Batch], as_int: bool = False
) -> list[torch.Tensor | None]:
    """mmengine's loop with num_items; returns last_loss after each update."""
    wrapper.initialize_count_status(model, 0, len(batches))
    losses = []
    for batch in batches:
        with wrapper.optim_context(model):
            loss = summed_loss(model, batch)
        n = count(batch)
        wrapper.update_params(loss, num_items=int(n) if as_int else n)
        if wrapper.should_update():
            losses.append(wrapper.last_loss)
    return losses


def assert_params_close(a: nn.Module, b: nn.Module, **tol: float) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, **tol)


#: sizes with a last window of 1 (7 = 3 + 3 + 1) and very different micro-batches
SIZES = [1, 6, 2, 5, 1, 4, 3]
K = 3


# -- the reference, single process --------------------------------------------------------


@pytest.mark.parametrize("as_int", [False, True], ids=["tensor", "int"])
@pytest.mark.parametrize(
    "clip_grad", [None, dict(max_norm=0.3), dict(type="value", clip_value=0.02)],
    ids=["no-clip", "norm", "value"],
)
@pytest.mark.parametrize("make_optimizer", [sgd, adamw], ids=["sgd-momentum", "adamw"])
def test_num_items_equals_the_per_item_mean_of_each_window_in_float64(
    as_int: bool, clip_grad: dict[str, Any] | None, make_optimizer: Any
) -> None:
    batches = lm_batches(SIZES)
    model = TinyLM(torch.float64)
    want, want_losses = reference(copy.deepcopy(model), batches, K, make_optimizer, clip_grad)
    wrapper = OptimWrapper(make_optimizer(model), accumulative_counts=K, clip_grad=clip_grad)
    got_losses = with_items(wrapper, model, batches, as_int)
    assert len(got_losses) == 3  # 3 + 3 + the remainder window of 1
    assert_params_close(model, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.stack(got_losses), torch.stack(want_losses).float())


def test_clipping_sees_the_norm_of_the_per_item_mean_gradient() -> None:
    batches = lm_batches(SIZES)
    model = TinyLM(torch.float64)
    ref = copy.deepcopy(model)
    wrapper = OptimWrapper(sgd(model), accumulative_counts=K, clip_grad=dict(max_norm=1e9))
    with_items(wrapper, model, batches[:K])
    loss = sum(summed_loss(ref, b) for b in batches[:K]) / sum(count(b) for b in batches[:K])
    loss.backward()
    want = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters()]))
    assert wrapper.last_grad_norm is not None
    torch.testing.assert_close(wrapper.last_grad_norm, want)


def test_float32_equals_the_reference_to_float_rounding() -> None:
    batches = lm_batches(SIZES, seed=1)
    model = TinyLM()
    want, _ = reference(copy.deepcopy(model), batches, K, adamw, dict(max_norm=0.5))
    with_items(OptimWrapper(adamw(model), K, dict(max_norm=0.5)), model, batches)
    assert_params_close(model, want, rtol=1e-5, atol=1e-6)


def test_bfloat16_autocast_is_close_to_the_float32_reference() -> None:
    batches = lm_batches(SIZES, seed=2)
    model = TinyLM()
    want, want_losses = reference(copy.deepcopy(model), batches, K, sgd)
    wrapper = AmpOptimWrapper(sgd(model), device="cpu", dtype="bfloat16", accumulative_counts=K)
    got_losses = with_items(wrapper, model, batches)
    assert wrapper.loss_scaler is None
    assert_params_close(model, want, rtol=0.05, atol=0.02)
    torch.testing.assert_close(
        torch.stack(got_losses), torch.stack(want_losses), rtol=0.03, atol=0.03
    )


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_float16_with_a_loss_scaler_equals_the_reference(fused: bool) -> None:
    """The model stays fp32 (autocast off by loss_scale with dtype float32 would drop the
    scaler), so the scaler's arithmetic is the only difference: scale, divide, unscale."""
    batches = lm_batches(SIZES, seed=3)
    model = TinyLM()

    def make(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(m.parameters(), lr=0.05, fused=fused)

    want, _ = reference(copy.deepcopy(model), batches, K, make, dict(max_norm=0.5))
    wrapper = AmpOptimWrapper(
        make(model), device="cpu", dtype="float32", loss_scale=1024.0,
        accumulative_counts=K, clip_grad=dict(max_norm=0.5),
    )
    assert wrapper.loss_scaler is not None
    with_items(wrapper, model, batches)
    assert_params_close(model, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["cuda", "npu", "xpu", "mps"])
def test_each_backend_s_loss_scaler_divides_and_skips_empty_windows(backend: str) -> None:
    """Through hwoptim.testing's mocks: the backend's own scaler (torch_npu's for npu) is
    the one the division and the empty-window skip go through."""
    from hwoptim.testing import mock_backend

    batches = lm_batches(SIZES, seed=5)
    model = TinyLM()
    want, _ = reference(copy.deepcopy(model), batches, K, sgd, dict(max_norm=0.5))
    with mock_backend(backend):
        wrapper = AmpOptimWrapper(
            sgd(model), device="auto", dtype="float32", loss_scale=1024.0,
            accumulative_counts=K, clip_grad=dict(max_norm=0.5),
        )
        assert wrapper.backend.name == backend and wrapper.loss_scaler is not None
        with_items(wrapper, model, batches)
        assert_params_close(model, want, rtol=1e-5, atol=1e-6)
        after = copy.deepcopy(model)
        _empty_window(wrapper, model, K)
        assert_params_close(model, after, rtol=0, atol=0)
        with pytest.warns(UserWarning, match="no items"):
            assert float(wrapper.skipped_steps) == 1.0


def test_an_overflow_under_the_loss_scaler_still_skips_and_backs_off() -> None:
    model = TinyLM()
    before = copy.deepcopy(model)
    wrapper = AmpOptimWrapper(
        sgd(model), device="cpu", dtype="float16", loss_scale=dict(init_scale=256.0),
        accumulative_counts=2,
    )
    batch = lm_batches([3])[0]
    wrapper.initialize_count_status(model, 0, 2)
    for _ in range(2):
        with wrapper.optim_context(model):
            loss = summed_loss(model, batch) * float("inf")
        wrapper.update_params(loss, num_items=count(batch))
    assert_params_close(model, before, rtol=0, atol=0)
    assert float(wrapper.skipped_steps) == 1.0
    assert float(wrapper.loss_scale) == 128.0


def test_equal_sizes_equal_mmengine_rule() -> None:
    """With the same item count in every micro-batch, the per-item mean is the mean of the
    micro-batch means divided by the window: what the wrapper does without num_items."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(5)]
    ys = [torch.randn(4, 2, generator=g, dtype=torch.float64) for _ in range(5)]
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    mm_model = copy.deepcopy(model)
    items = OptimWrapper(sgd(model), accumulative_counts=2)
    mmengine_rule = OptimWrapper(sgd(mm_model), accumulative_counts=2)
    for w, m in ((items, model), (mmengine_rule, mm_model)):
        w.initialize_count_status(m, 0, 5)
    for x, y in zip(xs, ys):
        items.update_params(F.mse_loss(model(x), y, reduction="sum"), num_items=x.numel() // 3 * 2)
        mmengine_rule.update_params(F.mse_loss(mm_model(x), y))
    assert_params_close(model, mm_model, rtol=1e-12, atol=1e-12)


def test_unequal_sizes_differ_from_mmengine_rule() -> None:
    """Not vacuous: mmengine's rule gives short micro-batches too much weight."""
    batches = lm_batches(SIZES)
    model = TinyLM(torch.float64)
    mm_model = copy.deepcopy(model)
    with_items(OptimWrapper(sgd(model), K), model, batches)
    mmengine_rule = OptimWrapper(sgd(mm_model), K)
    mmengine_rule.initialize_count_status(mm_model, 0, len(batches))
    for batch in batches:
        mmengine_rule.update_params(summed_loss(mm_model, batch) / count(batch))
    assert any(not torch.allclose(p, q) for p, q in zip(model.parameters(), mm_model.parameters()))


def test_backward_and_step_called_by_hand() -> None:
    batches = lm_batches(SIZES[:3])
    model = TinyLM(torch.float64)
    want, _ = reference(copy.deepcopy(model), batches, 3)
    wrapper = OptimWrapper(sgd(model))
    for batch in batches:
        wrapper.backward(summed_loss(model, batch), num_items=count(batch))
    wrapper.step()
    wrapper.zero_grad()
    assert_params_close(model, want, rtol=1e-12, atol=1e-12)


def test_int_and_tensor_counts_may_share_a_window() -> None:
    batches = lm_batches(SIZES[:3], seed=4)
    model = TinyLM(torch.float64)
    want, _ = reference(copy.deepcopy(model), batches, 3)
    wrapper = OptimWrapper(sgd(model), 3)
    wrapper.initialize_count_status(model, 0, 3)
    for i, batch in enumerate(batches):
        n = count(batch)
        wrapper.update_params(summed_loss(model, batch), num_items=int(n) if i % 2 else n)
    assert_params_close(model, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("loss_shape", "count_shape"),
    [((), (1,)), ((1,), None), ((1,), ()), ((1, 1), (1, 1))],
    ids=["count-(1,)", "loss-(1,)-int-count", "loss-(1,)", "both-(1,1)"],
)
def test_one_element_losses_and_counts_are_taken_as_their_scalar(
    loss_shape: tuple[int, ...], count_shape: tuple[int, ...] | None
) -> None:
    """As torch's backward takes a loss of shape (1,): same update, last_loss a 0-dim tensor."""
    batches = lm_batches(SIZES[:4], seed=6)
    model = TinyLM(torch.float64)
    want, want_losses = reference(copy.deepcopy(model), batches, 2)
    wrapper = OptimWrapper(sgd(model), 2)
    wrapper.initialize_count_status(model, 0, len(batches))
    losses = []
    for batch in batches:
        n = count(batch)
        given = int(n) if count_shape is None else n.reshape(count_shape)
        wrapper.update_params(summed_loss(model, batch).reshape(loss_shape), num_items=given)
        if wrapper.should_update():
            losses.append(wrapper.last_loss)
    assert_params_close(model, want, rtol=1e-12, atol=1e-12)
    assert [loss.shape for loss in losses] == [torch.Size([])] * 2
    torch.testing.assert_close(losses, [w.float() for w in want_losses], rtol=1e-6, atol=1e-6)


def test_a_loss_of_several_numbers_is_refused_with_num_items_before_its_backward() -> None:
    model = nn.Linear(2, 1)
    wrapper = OptimWrapper(sgd(model), 2)
    with pytest.raises(ValueError, match=r"loss must be one number.*shape \(3, 1\)"):
        wrapper.backward(model(torch.ones(3, 2)), num_items=3, gradient=torch.ones(3, 1))
    assert wrapper.inner_count == 0
    assert all(p.grad is None for p in model.parameters())


def test_counts_of_any_integer_type_are_taken() -> None:
    assert check_num_items(np.int64(3)) == 3
    assert check_num_items(torch.tensor([5], dtype=torch.int32)).shape == (1,)


# -- the loss to log ----------------------------------------------------------------------


def test_last_loss_is_none_without_num_items() -> None:
    model = nn.Linear(2, 1)
    wrapper = OptimWrapper(sgd(model))
    assert wrapper.last_loss is None
    wrapper.update_params(model(torch.ones(1, 2)).sum())
    assert wrapper.last_loss is None


def test_last_loss_stays_on_the_device_and_is_not_part_of_the_graph() -> None:
    model = TinyLM()
    wrapper = OptimWrapper(sgd(model))
    with_items(wrapper, model, lm_batches([2]))
    assert isinstance(wrapper.last_loss, torch.Tensor)
    assert not wrapper.last_loss.requires_grad


# -- windows without items ---------------------------------------------------------------


def _empty_window(wrapper: OptimWrapper, model: nn.Module, k: int) -> None:
    """k micro-batches whose items all count zero (a Linear(2, .) model, or a TinyLM)."""
    wrapper.initialize_count_status(model, 0, None)  # a new run of windows; no end to warn of
    for _ in range(k):
        with wrapper.optim_context(model):
            if isinstance(model, TinyLM):
                tokens = torch.zeros(2, 3, dtype=torch.long)
                loss = summed_loss(model, (tokens, torch.full_like(tokens, PAD)))
            else:
                loss = model(torch.zeros(1, 2)).sum() * 0.0
        wrapper.update_params(loss, num_items=torch.tensor(0))


def test_a_window_without_items_is_skipped_counted_and_warned_about_once() -> None:
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    before = copy.deepcopy(model)
    wrapper = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=0.1, fused=True), 2)
    _empty_window(wrapper, model, 2)
    assert_params_close(model, before, rtol=0, atol=0)  # a real skip: Adam did not move
    with pytest.warns(UserWarning, match=r"1 update\(s\) had no items"):
        assert float(wrapper.skipped_steps) == 1.0
    assert torch.isnan(wrapper.last_loss)
    _empty_window(wrapper, model, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: no second warning
        assert float(wrapper.skipped_steps) == 2.0


@pytest.mark.parametrize("clip_grad", [None, dict(max_norm=1.0)], ids=["no-clip", "clip"])
def test_a_window_without_items_never_divides_by_zero(clip_grad: dict[str, Any] | None) -> None:
    model = nn.Linear(2, 2)
    before = copy.deepcopy(model)
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), 2, clip_grad)
    _empty_window(wrapper, model, 2)
    # a non-fused optimizer takes a step with zero gradients: SGD without momentum stays;
    # counted as such (zeroed_steps), not as a real skip
    assert_params_close(model, before, rtol=0, atol=0)
    with pytest.warns(UserWarning, match="no items"):
        assert (float(wrapper.skipped_steps), float(wrapper.zeroed_steps)) == (0.0, 1.0)


def test_a_window_without_items_under_a_loss_scaler_is_skipped() -> None:
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    before = copy.deepcopy(model)
    wrapper = AmpOptimWrapper(
        torch.optim.AdamW(model.parameters(), lr=0.1), device="cpu", dtype="float16",
        accumulative_counts=2,
    )
    _empty_window(wrapper, model, 2)
    assert_params_close(model, before, rtol=0, atol=0)
    with pytest.warns(UserWarning, match="no items"):
        assert float(wrapper.skipped_steps) == 1.0


def test_the_next_window_after_an_empty_one_trains_normally() -> None:
    batches = lm_batches([2, 3])
    model = TinyLM(torch.float64)
    want, _ = reference(copy.deepcopy(model), batches, 2, sgd)
    wrapper = OptimWrapper(sgd(model), 2)
    wrapper.initialize_count_status(model, 0, 2)
    for _ in range(2):  # all padding: skipped, and SGD's momentum buffer never made
        with wrapper.optim_context(model):
            loss = summed_loss(model, (batches[0][0], torch.full_like(batches[0][1], PAD)))
        wrapper.update_params(loss, num_items=0)
    with pytest.warns(UserWarning, match="no items"):
        with_items(wrapper, model, batches)  # reads last_loss: the warning comes then
    assert_params_close(model, want, rtol=1e-12, atol=1e-12)


def test_without_initialize_count_status_the_end_warning_comes_with_num_items_too() -> None:
    model = nn.Linear(2, 1)
    wrapper = OptimWrapper(sgd(model), 2)
    with pytest.warns(UserWarning, match="partial window of training will not step") as record:
        wrapper.update_params(model(torch.ones(1, 2)).sum(), num_items=1)
    assert record[0].filename == __file__  # points at the caller's line


# -- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (-1, ValueError, r"must be >= 0.*got -1"),
        (2.0, TypeError, r"int or an integer tensor.*float"),
        (True, TypeError, r"int or an integer tensor.*bool"),
        ("3", TypeError, r"int or an integer tensor.*str"),
        (torch.tensor(3.0), TypeError, r"integer count.*torch.float32.*\.long\(\)"),
        (torch.tensor(True), TypeError, r"integer count.*torch.bool"),
        (torch.tensor([1, 2]), ValueError, r"one count.*shape \(2,\)"),
    ],
)
def test_a_bad_count_is_refused_before_anything_runs(bad: Any, error: type, match: str) -> None:
    model = nn.Linear(2, 1)
    wrapper = OptimWrapper(sgd(model), 2)
    with pytest.raises(error, match=match):
        wrapper.update_params(model(torch.ones(1, 2)).sum(), num_items=bad)
    assert wrapper.inner_count == 0
    assert all(p.grad is None for p in model.parameters())


def test_mixing_micro_batches_with_and_without_num_items_in_a_window_is_refused() -> None:
    model = nn.Linear(2, 1)
    wrapper = OptimWrapper(sgd(model), 2)
    wrapper.initialize_count_status(model, 0, 4)
    wrapper.update_params(model(torch.ones(1, 2)).sum(), num_items=1)
    with pytest.raises(ValueError, match="without num_items in an accumulation window"):
        wrapper.update_params(model(torch.ones(1, 2)).sum())
    assert wrapper.inner_count == 1
    other = OptimWrapper(sgd(model), 2)
    other.initialize_count_status(model, 0, 4)
    other.update_params(model(torch.ones(1, 2)).sum())
    with pytest.raises(ValueError, match="with num_items in an accumulation window"):
        other.update_params(model(torch.ones(1, 2)).sum(), num_items=1)
    assert other.inner_count == 1


def test_a_failed_backward_adds_nothing_to_the_window() -> None:
    batches = lm_batches([2, 3])
    model = TinyLM(torch.float64)
    want, _ = reference(copy.deepcopy(model), batches, 2, sgd)
    wrapper = OptimWrapper(sgd(model), 2)
    wrapper.initialize_count_status(model, 0, 2)
    with pytest.raises(RuntimeError, match="does not require grad"):
        wrapper.update_params(torch.ones((), dtype=torch.float64), num_items=5)
    assert wrapper.inner_count == 0
    with_items(wrapper, model, batches)
    assert_params_close(model, want, rtol=1e-12, atol=1e-12)


def test_windows_may_differ_in_kind() -> None:
    model = nn.Linear(2, 1)
    wrapper = OptimWrapper(sgd(model), 1)
    wrapper.update_params(model(torch.ones(1, 2)).sum(), num_items=1)
    assert wrapper.last_loss is not None
    wrapper.update_params(model(torch.ones(1, 2)).sum())
    assert wrapper.last_loss is None


def test_zero_grad_drops_the_count_of_the_gradients_it_drops() -> None:
    batches = lm_batches([2, 3])
    model = TinyLM(torch.float64)
    want, _ = reference(copy.deepcopy(model), batches[1:], 1, sgd)
    wrapper = OptimWrapper(sgd(model))
    wrapper.backward(summed_loss(model, batches[0]), num_items=count(batches[0]))
    wrapper.zero_grad()  # the first micro-batch is discarded, its count too
    wrapper.backward(summed_loss(model, batches[1]), num_items=count(batches[1]))
    wrapper.step()
    assert_params_close(model, want, rtol=1e-12, atol=1e-12)


def test_num_items_group_is_checked_when_the_wrapper_is_made() -> None:
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="'auto', 'local' or a ProcessGroup; got 'world'"):
        OptimWrapper(sgd(model), num_items_group="world")
    with pytest.raises(ValueError, match="got 'world'"):
        AmpOptimWrapper(sgd(model), device="cpu", num_items_group="world")


def test_the_build_config_takes_num_items_group() -> None:
    model = nn.Linear(2, 1)
    wrapper = hwoptim.build_optim_wrapper(
        model, dict(optimizer=dict(type="SGD", lr=0.1), num_items_group="local")
    )
    assert wrapper._items.group == "local"


def test_optim_wrapper_dict_points_to_the_named_wrapper() -> None:
    model = nn.Linear(2, 1)
    wrappers = OptimWrapperDict(a=OptimWrapper(sgd(model)))
    with pytest.raises(NotImplementedError, match=r"wrappers\[name\].update_params"):
        wrappers.update_params(model(torch.ones(1, 2)).sum(), num_items=1)
    with pytest.raises(NotImplementedError, match=r"wrappers\[name\].backward"):
        wrappers.backward(model(torch.ones(1, 2)).sum(), num_items=1)
    wrappers["a"].update_params(model(torch.ones(1, 2)).sum(), num_items=1)
    assert set(wrappers.last_loss) == {"a"} and wrappers.last_loss["a"] is not None


# -- where counts are summed -------------------------------------------------------------


def test_without_torch_distributed_counts_stay_local() -> None:
    assert items_reduction(nn.Linear(2, 1)) is LOCAL
    assert items_reduction(None, "local") is LOCAL
    with pytest.raises(RuntimeError, match="not initialized"):
        items_reduction(None, object())


def test_an_unknown_group_name_is_refused() -> None:
    with pytest.raises(ValueError, match="got 'world'"):
        items_reduction(None, "world")


def test_in_a_one_process_group_ddp_needs_no_collective_and_a_group_is_taken(
    tmp_path: Any,
) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        assert items_reduction(nn.Linear(2, 1)) is LOCAL  # world size 1: nothing to sum
        group = dist.new_group([0])
        explicit = items_reduction(None, group)
        assert explicit.groups == (group,) and explicit.divisor == 1.0
        batches = lm_batches(SIZES[:4])
        model = TinyLM(torch.float64)
        want, _ = reference(copy.deepcopy(model), batches, 2)
        ddp = DistributedDataParallel(model)
        wrapper = OptimWrapper(sgd(ddp), 2)
        with_items(wrapper, ddp, batches)
        reduction = wrapper._items.reduction
        assert reduction is not None and reduction is not LOCAL  # found through DDP
        assert reduction.groups == () and reduction.divisor == 1.0  # a group of one
        assert_params_close(model, want, rtol=1e-12, atol=1e-12)
    finally:
        dist.destroy_process_group()


class _Group:
    def __init__(self, size: int) -> None:
        self.size = size


class _MeshInfo:
    def __init__(self, shard: _Group | None, replicate: _Group | None) -> None:
        self.shard_process_group = shard
        self.replicate_process_group = replicate


class _ParamGroup:
    def __init__(self, mesh_info: _MeshInfo, factor: float | None = None) -> None:
        self.mesh_info = mesh_info
        self.gradient_divide_factor = factor


@pytest.fixture
def world_of_8(monkeypatch: pytest.MonkeyPatch) -> None:
    def sizes(group: Any = None) -> int:
        return 8 if group is None else int(group.size)

    monkeypatch.setattr(torch.distributed, "get_world_size", sizes)


@pytest.mark.usefixtures("world_of_8")
def test_fsdp2_sums_over_its_shard_group_and_divides_by_its_size() -> None:
    shard = _Group(4)
    reduction = fsdp2_reduction(_ParamGroup(_MeshInfo(shard, None)))
    assert reduction.groups == (shard,) and reduction.divisor == 4.0


@pytest.mark.usefixtures("world_of_8")
def test_hsdp_over_every_process_is_one_collective_in_the_default_group() -> None:
    reduction = fsdp2_reduction(_ParamGroup(_MeshInfo(_Group(4), _Group(2))))
    assert reduction.groups == (None,) and reduction.divisor == 8.0


@pytest.mark.usefixtures("world_of_8")
def test_hsdp_beside_tensor_parallel_sums_over_both_data_parallel_groups() -> None:
    shard, replicate = _Group(2), _Group(2)  # (replicate 2, shard 2, tp 2)
    reduction = fsdp2_reduction(_ParamGroup(_MeshInfo(shard, replicate)))
    assert reduction.groups == (shard, replicate) and reduction.divisor == 4.0


@pytest.mark.usefixtures("world_of_8")
def test_fsdp2_gradient_divide_factor_is_what_the_gradients_were_divided_by() -> None:
    reduction = fsdp2_reduction(_ParamGroup(_MeshInfo(_Group(8), None), factor=1.0))
    assert reduction.divisor == 1.0


def test_the_reduction_is_readable() -> None:
    assert repr(ItemsReduction((None,), 2.0)) == "ItemsReduction(groups=(None,), divisor=2.0)"


# -- properties -------------------------------------------------------------------------

SETTINGS = settings(max_examples=25, deadline=None)


@SETTINGS
@given(
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=7),
    k=st.integers(1, 4),
    seed=st.integers(0, 10_000),
    make_optimizer=st.sampled_from([sgd, adamw]),
)
def test_any_sizes_equal_the_reference(
    sizes: list[int], k: int, seed: int, make_optimizer: Any
) -> None:
    batches = lm_batches(sizes, seed)
    torch.manual_seed(seed)
    model = TinyLM(torch.float64)
    want, _ = reference(copy.deepcopy(model), batches, k, make_optimizer)
    with_items(OptimWrapper(make_optimizer(model), k), model, batches)
    assert_params_close(model, want, rtol=1e-10, atol=1e-12)


@SETTINGS
@given(
    n=st.integers(1, 7), k=st.integers(1, 4), batch=st.integers(1, 4), seed=st.integers(0, 10_000)
)
def test_equal_sizes_equal_mmengine_rule_for_any_window(n: int, k: int, batch: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, batch, 3, generator=g, dtype=torch.float64)
    ys = torch.randn(n, batch, 2, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = nn.Linear(3, 2).double()
    mm_model = copy.deepcopy(model)
    items, mm = OptimWrapper(adamw(model), k), OptimWrapper(adamw(mm_model), k)
    items.initialize_count_status(model, 0, n)
    mm.initialize_count_status(mm_model, 0, n)
    for x, y in zip(xs, ys):
        items.update_params(F.mse_loss(model(x), y, reduction="sum"), num_items=y.numel())
        mm.update_params(F.mse_loss(mm_model(x), y))
    # the remainder window too: mmengine divides by its length, as the item count does
    assert_params_close(model, mm_model, rtol=1e-10, atol=1e-12)
