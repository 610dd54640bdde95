"""The update path under abuse (issue 12): exceptions mid-step, parameters added to a group
after the first step, and what a "skipped" step really is for each kind of optimizer."""

from __future__ import annotations

import copy
import io
import warnings
from typing import Any, Callable

import pytest
import torch
from helpers import WithNoSync, total_norm
from torch import nn

import hwoptim._checkpoint
import hwoptim._guard
from hwoptim import AmpOptimWrapper, OptimWrapper, build_optim_wrapper
from hwoptim._guard import EXACT, FUSED


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 1))


def loss_of(model: nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 8, generator=g)
    return nn.functional.mse_loss(model(x).float(), x[:, :1] * 2 - x[:, 1:2])


def inf_loss(model: nn.Module) -> torch.Tensor:
    return model(torch.ones(1, 8)).float().sum() * float("inf")


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_params_equal(model: nn.Module, reference: nn.Module) -> None:
    for got, want in zip(model.parameters(), reference.parameters()):
        assert torch.equal(got, want)


def train(wrapper: OptimWrapper, model: nn.Module, seeds: range) -> None:
    for seed in seeds:
        with wrapper.optim_context(model):
            loss = loss_of(model, seed)
        wrapper.update_params(loss)


# -- item 1: an exception in the step leaves the wrapper usable and the next update right ---------

CLIPS = {"no-clip": None, "clip": dict(max_norm=1.0)}


def fp16(model: nn.Module, fused: bool, clip: dict[str, Any] | None, acc: int = 2) -> AmpOptimWrapper:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    return AmpOptimWrapper(optimizer, device="cpu", dtype="float16", accumulative_counts=acc,
                           clip_grad=clip, loss_scale={"init_scale": 1024.0, "growth_interval": 3})


def fp32(model: nn.Module, fused: bool, clip: dict[str, Any] | None, acc: int = 2) -> OptimWrapper:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    return OptimWrapper(optimizer, accumulative_counts=acc, clip_grad=clip)


def run_with_failed_window(make: Callable[[nn.Module], OptimWrapper], failing: Callable[[OptimWrapper], Any]) -> None:
    """Train windows 0-1, fail the update of window 2 with ``failing``, train windows 3-5;
    the parameters equal those of a run that never saw window 2."""
    model, reference = make_model(), make_model()
    wrapper, ref_wrapper = make(model), make(reference)
    for wrapped in (wrapper, ref_wrapper):
        wrapped.initialize_count_status(None, 0, None)
    train(wrapper, model, range(4))
    train(ref_wrapper, reference, range(4))
    with wrapper.optim_context(model):
        loss = loss_of(model, 4)
    wrapper.update_params(loss)
    with pytest.raises(TypeError):
        with wrapper.optim_context(model):
            loss = loss_of(model, 5)
        failing(wrapper)(loss)
    train(wrapper, model, range(6, 12))
    train(ref_wrapper, reference, range(6, 12))
    assert_params_equal(model, reference)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if wrapper.loss_scaler is not None:
        assert torch.equal(wrapper.loss_scale, ref_wrapper.loss_scale)
    skipped, ref_skipped = wrapper.skipped_steps, ref_wrapper.skipped_steps
    assert (skipped is None) == (ref_skipped is None)
    if skipped is not None:
        assert torch.equal(skipped, ref_skipped)


def bad_step_kwargs(wrapper: OptimWrapper) -> Callable[[torch.Tensor], None]:
    return lambda loss: wrapper.update_params(loss, step_kwargs={"junk": 1})


@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_fp16_after_a_step_that_raised_the_next_updates_are_right(clip, fused):
    """The scaler was left mid-step: with clipping every later unscale_ raised "already
    called"; without, the next step took scaled gradients for unscaled ones."""
    run_with_failed_window(lambda m: fp16(m, fused, CLIPS[clip]), bad_step_kwargs)


@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_fp32_after_a_step_that_raised_the_next_updates_are_right(clip, fused):
    """The failed window's (clipped) gradients are dropped, not added to the next window."""
    run_with_failed_window(lambda m: fp32(m, fused, CLIPS[clip]), bad_step_kwargs)


@pytest.mark.parametrize("make", [fp16, fp32])
def test_after_zero_grad_raised_the_next_window_starts_from_zero(make):
    def bad_zero_kwargs(wrapper: OptimWrapper) -> Callable[[torch.Tensor], None]:
        return lambda loss: wrapper.update_params(loss, zero_kwargs={"junk": 1})

    def stepped_then_raised(wrapper: OptimWrapper) -> Callable[[torch.Tensor], None]:
        def call(loss: torch.Tensor) -> None:
            try:
                bad_zero_kwargs(wrapper)(loss)
            finally:
                assert all(p.grad is None for p in wrapper.optimizer.param_groups[0]["params"])
        return call

    # the step of window 2 happened here, unlike in the reference: compare the gradients
    # state only (None), then that training goes on without raising and stays finite
    model = make_model()
    wrapper = make(model, False, dict(max_norm=1.0))
    wrapper.initialize_count_status(None, 0, None)
    train(wrapper, model, range(3))
    with pytest.raises(TypeError):
        with wrapper.optim_context(model):
            loss = loss_of(model, 3)
        stepped_then_raised(wrapper)(loss)
    train(wrapper, model, range(4, 8))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_failed_step_is_not_counted_as_skipped():
    model = make_model()
    wrapper = fp16(model, True, dict(max_norm=1.0), acc=1)
    wrapper.update_params(loss_of(model, 0))
    scale = wrapper.loss_scale.clone()
    with pytest.raises(TypeError):
        wrapper.update_params(inf_loss(model), step_kwargs={"junk": 1})
    assert float(wrapper.skipped_steps) == 0
    assert torch.equal(wrapper.loss_scale, scale)  # no update(): the scale did not back off
    assert not hasattr(wrapper.optimizer, "found_inf") and not hasattr(wrapper.optimizer, "grad_scale")
    wrapper.update_params(inf_loss(model))  # a real overflow afterwards is skipped and counted
    assert float(wrapper.skipped_steps) == 1
    assert float(wrapper.loss_scale) == float(scale) / 2


def test_error_if_nonfinite_raises_once_and_training_goes_on():
    """Before, the inf gradients stayed and every later update raised again."""
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1),
                           clip_grad=dict(max_norm=1.0, error_if_nonfinite=True))
    with pytest.raises(RuntimeError, match="non-finite"):
        wrapper.update_params(inf_loss(model))
    before = params_of(model)
    wrapper.update_params(loss_of(model, 0))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


class Boom(torch.autograd.Function):
    """Identity forward; the backward raises."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("backward failed")


@pytest.mark.parametrize("pattern", ["mmengine", "inside"])
def test_a_backward_that_raises_ends_the_sync_skip_and_is_not_counted(pattern):
    model = WithNoSync(8, 1)
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=2)
    wrapper.initialize_count_status(model, 0, 10)
    with pytest.raises(RuntimeError, match="backward failed"):
        if pattern == "mmengine":
            with wrapper.optim_context(model):
                loss = Boom.apply(model(torch.ones(1, 8))).sum()
            wrapper.update_params(loss)
        else:
            with wrapper.optim_context(model):
                wrapper.update_params(Boom.apply(model(torch.ones(1, 8))).sum())
    assert model.log == ["off", "on"]  # released right away, not at the next forward
    assert wrapper.inner_count == 0
    assert not wrapper.should_sync()  # the window starts again at its first micro-batch


# -- item 2: parameters added to an existing group after the first step ----------------------------


def partly_frozen(fused: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = make_model()
    optimizer = torch.optim.SGD(model[0].parameters(), lr=0.1, fused=fused)
    return model, optimizer


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_parameters_appended_to_a_group_are_clipped(fused):
    model, optimizer = partly_frozen(fused)
    wrapper = OptimWrapper(optimizer, clip_grad=dict(max_norm=1e-3))
    wrapper.update_params(loss_of(model, 0))
    optimizer.param_groups[0]["params"].extend(model[2].parameters())  # unfreeze the head
    before = params_of(model)[2:]
    wrapper.update_params(loss_of(model, 1) * 1e6)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(list(model.parameters())[2:], before)])
    assert 0 < float(moved.norm()) <= 0.1 * 1e-3 * (1 + 1e-4)  # lr * max_norm


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_parameters_appended_to_a_group_are_guarded(fused):
    model, optimizer = partly_frozen(fused)
    wrapper = OptimWrapper(optimizer, clip_grad=dict(max_norm=1.0))
    wrapper.update_params(loss_of(model, 0))
    optimizer.param_groups[0]["params"].extend(model[2].parameters())
    model[0].requires_grad_(False)  # only the appended parameters get the inf gradient
    wrapper.update_params(inf_loss(model))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    counted = wrapper.skipped_steps if fused else wrapper.zeroed_steps
    assert float(counted) == 1


def test_parameters_removed_from_a_group_are_dropped_from_clipping():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapper = OptimWrapper(optimizer, clip_grad=dict(max_norm=float("inf")))
    wrapper.update_params(loss_of(model, 0))
    del optimizer.param_groups[0]["params"][2:]
    twin = make_model()
    twin.load_state_dict(model.state_dict())
    loss_of(twin, 1).backward()
    wrapper.update_params(loss_of(model, 1))
    expected = total_norm([p.grad for p in list(twin.parameters())[:2]])
    torch.testing.assert_close(wrapper.last_grad_norm, expected)


# -- item 13: a real skip, and a zeroed step counted apart ------------------------------------------


def test_a_fused_optimizer_skips_for_real_and_counts_it_as_skipped():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=0.1, fused=True), clip_grad=dict(max_norm=1.0))
    wrapper.update_params(loss_of(model, 0))
    before = params_of(model)
    wrapper.update_params(inf_loss(model))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert (float(wrapper.skipped_steps), float(wrapper.zeroed_steps)) == (1, 0)


def test_a_non_fused_optimizer_steps_with_zero_gradients_and_counts_it_apart():
    """What a zeroed step is: AdamW's step count advances and its momentum moves the
    weights (issue 12: 0.067 of a real step's 0.100); nothing non-finite gets in."""
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    wrapper = OptimWrapper(optimizer, clip_grad=dict(max_norm=1.0))
    wrapper.update_params(loss_of(model, 0))
    before = params_of(model)
    wrapper.update_params(inf_loss(model))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert float(next(iter(optimizer.state.values()))["step"]) == 2
    assert (float(wrapper.skipped_steps), float(wrapper.zeroed_steps)) == (0, 1)


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_a_scaler_skips_for_real_with_any_optimizer(fused):
    model = make_model()
    wrapper = fp16(model, fused, dict(max_norm=1.0), acc=1)
    wrapper.update_params(loss_of(model, 0))
    before = params_of(model)
    wrapper.update_params(inf_loss(model))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert (float(wrapper.skipped_steps), float(wrapper.zeroed_steps)) == (1, 0)


def test_counts_are_none_until_a_step_is_checked():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    wrapper.update_params(loss_of(model, 0))
    assert wrapper.skipped_steps is None and wrapper.zeroed_steps is None


# -- item 12: a checkpoint inside a window resumes exactly (save_partial_grads=True) -----------------

N_MICRO = 10  # windows of 3, then the remainder window of 1
WRAPPERS = {
    "fp32-clip": lambda m, save: OptimWrapper(
        torch.optim.AdamW(m.parameters(), lr=1e-2), accumulative_counts=3,
        clip_grad=dict(max_norm=0.5), save_partial_grads=save,
    ),
    "fp16-scaled": lambda m, save: AmpOptimWrapper(
        torch.optim.AdamW(m.parameters(), lr=1e-2), device="cpu", dtype="float16",
        accumulative_counts=3, clip_grad=dict(max_norm=0.5), save_partial_grads=save,
        loss_scale={"init_scale": 2.0**15, "growth_interval": 1},  # 2 of 4 updates overflow
    ),
}


def checkpoint_at(kind: str, k: int, save: bool) -> dict[str, Any]:
    """Train k micro-batches, then save model and wrapper as mmengine's CheckpointHook does
    (state_dict() without arguments) through torch.save."""
    model = make_model()
    wrapper = WRAPPERS[kind](model, save)
    wrapper.initialize_count_status(model, 0, N_MICRO)
    train(wrapper, model, range(k))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": wrapper.state_dict()}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def resume(kind: str, checkpoint: dict[str, Any], k: int) -> nn.Module:
    """mmengine's resume: load the model, then the wrapper, then initialize_count_status."""
    model = make_model(seed=1)  # other weights and no gradients: everything comes from the file
    wrapper = WRAPPERS[kind](model, True)
    model.load_state_dict(checkpoint["model"])
    wrapper.load_state_dict(checkpoint["optimizer"])
    wrapper.initialize_count_status(model, k, N_MICRO)
    train(wrapper, model, range(k, N_MICRO))
    return model


@pytest.mark.parametrize("kind", list(WRAPPERS))
def test_a_checkpoint_anywhere_resumes_bit_identically(kind):
    reference = make_model()
    ref_wrapper = WRAPPERS[kind](reference, False)
    ref_wrapper.initialize_count_status(reference, 0, N_MICRO)
    train(ref_wrapper, reference, range(N_MICRO))
    for k in range(N_MICRO + 1):  # a CheckpointHook every N iterations, for every N
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "micro-batches were not saved" warning
            resumed = resume(kind, checkpoint_at(kind, k, save=True), k)
        for got, want in zip(resumed.parameters(), reference.parameters()):
            assert torch.equal(got, want), f"checkpoint after micro-batch {k}"


def test_without_save_partial_grads_a_mid_window_resume_warns_and_differs():
    reference = make_model()
    ref_wrapper = WRAPPERS["fp32-clip"](reference, False)
    ref_wrapper.initialize_count_status(reference, 0, N_MICRO)
    train(ref_wrapper, reference, range(N_MICRO))
    checkpoint = checkpoint_at("fp32-clip", 4, save=False)
    assert "grads" not in checkpoint["optimizer"]["hwoptim"]
    with pytest.warns(UserWarning, match="save_partial_grads=True"):
        resumed = resume("fp32-clip", checkpoint, 4)
    assert any(not torch.equal(a, b) for a, b in zip(resumed.parameters(), reference.parameters()))


def test_partial_grads_are_saved_only_inside_a_window():
    model = make_model()
    wrapper = WRAPPERS["fp32-clip"](model, True)
    wrapper.initialize_count_status(model, 0, N_MICRO)
    train(wrapper, model, range(3))
    assert "grads" not in wrapper.state_dict()["hwoptim"]  # a window just ended
    train(wrapper, model, range(3, 4))
    saved = wrapper.state_dict()["hwoptim"]
    assert sorted(saved["grads"]) == [0, 1, 2, 3] and saved["grads_rank"] == 0
    for param, index in zip(model.parameters(), range(4)):
        assert torch.equal(saved["grads"][index], param.grad)


def test_save_partial_grads_must_be_a_bool():
    with pytest.raises(TypeError, match="save_partial_grads must be True or False; got 1"):
        OptimWrapper(torch.optim.SGD(make_model().parameters(), lr=0.1), save_partial_grads=1)  # type: ignore[arg-type]


BAD_GRADS = {
    "not a dict": ([torch.zeros(16, 8)], "must be a dict"),
    "index out of range": ({7: torch.zeros(1)}, "not a parameter index"),
    "index not an int": ({"0": torch.zeros(16, 8)}, "not a parameter index"),
    "not a tensor": ({0: [0.0]}, "floating-point tensor"),
    "integer tensor": ({0: torch.zeros(16, 8, dtype=torch.long)}, "floating-point tensor"),
    "wrong shape": ({0: torch.zeros(8, 16)}, r"shape \(8, 16\)"),
}


@pytest.mark.parametrize("case", list(BAD_GRADS))
def test_bad_saved_grads_raise_before_anything_changes(case):
    grads, match = BAD_GRADS[case]
    model = make_model()
    wrapper = WRAPPERS["fp32-clip"](model, True)
    wrapper.initialize_count_status(model, 0, N_MICRO)
    train(wrapper, model, range(4))
    state = copy.deepcopy(wrapper.state_dict())
    state["param_groups"][0]["lr"] = 0.5
    state["hwoptim"]["inner_count"] = 7
    state["hwoptim"]["grads"] = grads
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        wrapper.load_state_dict(state)
    assert wrapper.get_lr() == {"lr": [1e-2]} and wrapper.inner_count == 4
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))


def test_loaded_grads_are_copies_on_the_parameters_device_and_dtype():
    checkpoint = checkpoint_at("fp32-clip", 4, save=True)
    saved = checkpoint["optimizer"]["hwoptim"]["grads"]
    saved[0] = saved[0].double()
    model = make_model()
    wrapper = WRAPPERS["fp32-clip"](model, True)
    wrapper.load_state_dict(checkpoint["optimizer"])
    grad = next(model.parameters()).grad
    assert grad.dtype == torch.float32 and torch.equal(grad, saved[0].float())
    grad.add_(1.0)
    assert not torch.equal(grad.double(), saved[0])  # the checkpoint is not aliased


def test_another_ranks_partial_grads_are_not_loaded(monkeypatch):
    """DDP: each rank accumulates its own micro-batches; mmengine's CheckpointHook saves
    rank 0's. Loading them on rank 1 would count rank 0's micro-batches twice."""
    checkpoint = checkpoint_at("fp32-clip", 4, save=True)
    monkeypatch.setattr(hwoptim._checkpoint, "_rank", lambda: 1)
    model = make_model()
    wrapper = WRAPPERS["fp32-clip"](model, True)
    with pytest.warns(UserWarning, match="saved by data-parallel rank 0, this is rank 1"):
        wrapper.load_state_dict(checkpoint["optimizer"])
    assert all(p.grad is None for p in model.parameters())
    assert wrapper.inner_count == 4
    with pytest.warns(UserWarning, match="not divisible"):
        wrapper.initialize_count_status(model, 4, N_MICRO)


def test_a_checkpoint_with_partial_grads_loads_into_mmengines_wrapper():
    from mmengine.optim import OptimWrapper as MMOptimWrapper

    checkpoint = checkpoint_at("fp32-clip", 4, save=True)
    assert checkpoint["optimizer"]["hwoptim"]["grads"]
    theirs = MMOptimWrapper(torch.optim.AdamW(make_model().parameters(), lr=1e-2), accumulative_counts=3)
    theirs.load_state_dict(checkpoint["optimizer"])
    assert theirs.optimizer.state_dict()["state"].keys() == {0, 1, 2, 3}


# -- item 13, opt-in: exact_skip undoes a non-finite step of a non-fused optimizer -------------------

OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.1),
    "adam-amsgrad": lambda ps: torch.optim.Adam(ps, lr=0.1, amsgrad=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1, initial_accumulator_value=0.1),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
    # no per-parameter state at all: the parameters are the whole state (issue 17 item 15)
    "sgd-weight-decay": lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.1),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.5),
}


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[Any, Any]:
    return copy.deepcopy(optimizer.state_dict()["state"])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("clip", [dict(max_norm=1.0), dict(type="value", clip_value=0.1)], ids=["norm", "value"])
def test_exact_skip_leaves_parameters_and_state_untouched(name, clip):
    model = make_model()
    optimizer = OPTIMIZERS[name](model.parameters())
    wrapper = OptimWrapper(optimizer, clip_grad=clip, exact_skip=True)
    wrapper.update_params(loss_of(model, 0))
    params, state = params_of(model), optimizer_state(optimizer)
    wrapper.update_params(inf_loss(model))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), params))
    after = optimizer_state(optimizer)
    for index, entry in state.items():
        for key, value in entry.items():
            assert torch.equal(after[index][key], value), (index, key)
    assert (float(wrapper.skipped_steps), float(wrapper.zeroed_steps)) == (1, 0)
    wrapper.update_params(loss_of(model, 1))  # a finite step still steps
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), params))
    assert (float(wrapper.skipped_steps), float(wrapper.zeroed_steps)) == (1, 0)


class GroupCounting(torch.optim.SGD):
    """Keeps state in its parameter groups, as Prodigy, D-Adaptation and schedule-free
    optimizers do: a Python counter ``k`` or a device tensor ``d``, changed by each step."""

    def __init__(self, params: Any, on_device: bool) -> None:
        super().__init__(params, lr=0.1, momentum=0.9)
        for group in self.param_groups:
            group["k"] = torch.ones(()) if on_device else 1

    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:
            if isinstance(group["k"], torch.Tensor):
                group["k"].add_(1)
            else:
                group["k"] += 1
        return super().step(closure)


@pytest.mark.parametrize("on_device", [True, False], ids=["tensor", "python"])
def test_exact_skip_restores_group_state_on_the_device_or_counts_the_step_as_zeroed(on_device):
    """A tensor kept in a parameter group is restored like the per-parameter state. A
    Python value cannot be put back without reading the flag on the host (a sync): the
    update counts as zeroed, not as a real skip (docs/logging.md)."""
    model = make_model()
    optimizer = GroupCounting(model.parameters(), on_device)
    wrapper = OptimWrapper(optimizer, clip_grad=dict(max_norm=1.0), exact_skip=True)
    wrapper.update_params(loss_of(model, 0))
    assert float(optimizer.param_groups[0]["k"]) == 2
    params = params_of(model)
    wrapper.update_params(inf_loss(model))
    if on_device:
        assert float(optimizer.param_groups[0]["k"]) == 2
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), params))
        assert (float(wrapper.skipped_steps), float(wrapper.zeroed_steps)) == (1, 0)
    else:
        assert optimizer.param_groups[0]["k"] == 3  # the step ran; it is counted as such
        assert (float(wrapper.skipped_steps), float(wrapper.zeroed_steps)) == (0, 1)
    wrapper.update_params(loss_of(model, 1))  # a finite update counts as neither
    assert (float(wrapper.skipped_steps), float(wrapper.zeroed_steps)) == ((1, 0) if on_device else (0, 1))


def test_exact_skip_trains_exactly_like_a_run_without_the_bad_update():
    model, reference = make_model(), make_model()
    wrapper = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=1e-2), clip_grad=dict(max_norm=1.0),
                           exact_skip=True)
    ref_wrapper = OptimWrapper(torch.optim.AdamW(reference.parameters(), lr=1e-2), clip_grad=dict(max_norm=1.0))
    for seed in range(6):
        if seed == 3:
            wrapper.update_params(inf_loss(model))
        wrapper.update_params(loss_of(model, seed))
        ref_wrapper.update_params(loss_of(reference, seed))
    assert_params_equal(model, reference)


def test_exact_skip_falls_back_to_a_zeroed_step_where_state_does_not_exist_yet():
    """The very first update creates the optimizer's state; a skip cannot un-create it."""
    model = make_model()
    wrapper = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=0.1), clip_grad=dict(max_norm=1.0),
                           exact_skip=True)
    wrapper.update_params(inf_loss(model))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert (float(wrapper.skipped_steps), float(wrapper.zeroed_steps)) == (0, 1)


def test_state_off_the_norms_device_is_not_restorable():
    """e.g. the host step count of a non-capturable Adam while the gradients are on a GPU."""
    param = nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([param], lr=0.1)
    optimizer.state[param] = {"momentum_buffer": torch.zeros(2)}
    assert hwoptim._guard._step_tensors(optimizer, [param], torch.device("cpu")) is not None
    assert hwoptim._guard._step_tensors(optimizer, [param], torch.device("meta")) is None
    optimizer.state[param] = {"step": 3}  # a Python number: restoring it would need a sync
    assert hwoptim._guard._step_tensors(optimizer, [param], torch.device("cpu")) is None


class EditsStateAfterStep(torch.optim.SGD):
    """SGD whose step then edits each parameter's state with ``edit`` (a subclass's)."""

    def edit(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def step(self, closure: Any = None) -> Any:
        out = super().step(closure)
        for group in self.param_groups:
            for param in group["params"]:
                self.edit(self.state[param])
        return out


class NotesInState(EditsStateAfterStep):
    """SGD with momentum that also keeps, per parameter, a None entry followed by a tensor
    it changes at every step (as third-party optimizers do with optional state)."""

    def edit(self, state: dict[str, Any]) -> None:
        if "seen" not in state:
            state["optional"] = None
            state["seen"] = torch.zeros(())
        state["seen"].add_(1)


def test_exact_skip_restores_state_kept_after_an_empty_entry():
    model = make_model()
    optimizer = NotesInState(model.parameters(), lr=0.1, momentum=0.9)
    wrapper = OptimWrapper(optimizer, clip_grad=dict(max_norm=1.0), exact_skip=True)
    wrapper.update_params(loss_of(model, 0))
    state = optimizer_state(optimizer)
    wrapper.update_params(inf_loss(model))
    after = optimizer_state(optimizer)
    for index, entry in state.items():
        assert float(after[index]["seen"]) == float(entry["seen"]) == 1.0, index
        assert torch.equal(after[index]["momentum_buffer"], entry["momentum_buffer"]), index
    assert (float(wrapper.skipped_steps), float(wrapper.zeroed_steps)) == (1, 0)


class CountsInState(EditsStateAfterStep):
    """Keeps a Python counter per parameter: not restorable without a host sync."""

    def edit(self, state: dict[str, Any]) -> None:
        state["count"] = state.get("count", 0) + 1


def test_exact_skip_counts_a_step_that_creates_python_state_as_zeroed():
    """Restorable before the step (no state yet), not after it (a Python number): the
    update is a zeroed step, counted so, not an error."""
    model = make_model()
    params = params_of(model)
    wrapper = OptimWrapper(CountsInState(model.parameters(), lr=0.1), clip_grad=dict(max_norm=1.0),
                           exact_skip=True)
    wrapper.update_params(inf_loss(model))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), params))  # zero gradients, plain SGD
    assert (float(wrapper.skipped_steps), float(wrapper.zeroed_steps)) == (0, 1)


class WidensState(EditsStateAfterStep):
    """Replaces a state tensor by one of another dtype (same shape) at every step."""

    def edit(self, state: dict[str, Any]) -> None:
        old = state.get("acc", torch.zeros(()))
        state["acc"] = (old.double() if old.dtype == torch.float32 else old.float()) + 1


def test_exact_skip_counts_a_step_that_changes_a_state_tensors_dtype_as_zeroed():
    """A copy of another dtype cannot be written back where() it was: zeroed, counted so."""
    model = make_model()
    wrapper = OptimWrapper(WidensState(model.parameters(), lr=0.1), clip_grad=dict(max_norm=1.0),
                           exact_skip=True)
    wrapper.update_params(loss_of(model, 0))
    wrapper.update_params(inf_loss(model))
    assert (float(wrapper.skipped_steps), float(wrapper.zeroed_steps)) == (0, 1)


class ReplacesGroupTensor(torch.optim.SGD):
    """Keeps a device tensor ``d`` in each group and replaces it (a new tensor) at every step."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, lr=0.1)
        for group in self.param_groups:
            group["d"] = torch.ones(())

    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:
            group["d"] = group["d"] * 2
        return super().step(closure)


def test_exact_skip_does_not_take_a_replaced_group_tensor_for_a_changed_python_value():
    """Group tensors are restored on the device, whichever object holds them after the
    step; only Python values (compared on the host) make the update a zeroed one."""
    model = make_model()
    optimizer = ReplacesGroupTensor(model.parameters())
    wrapper = OptimWrapper(optimizer, clip_grad=dict(max_norm=1.0), exact_skip=True)
    wrapper.update_params(loss_of(model, 0))
    wrapper.update_params(inf_loss(model))
    assert (float(wrapper.skipped_steps), float(wrapper.zeroed_steps)) == (1, 0)


def test_group_values_differ_when_a_step_adds_a_group_or_a_key():
    same = hwoptim._guard._same_values
    assert same([{"lr": 0.1}], [{"lr": 0.1}])
    assert not same([{"lr": 0.1}], [{"lr": 0.1}, {"lr": 0.1}])
    assert not same([{"lr": 0.1}], [{"lr": 0.1, "k": 1}])
    assert not same([{"lr": 0.1}], [{"lr": 0.2}])


def test_a_bad_update_zeroes_value_clipped_dtensor_gradients_beside_plain_ones(tmp_path):
    """Value clipping leaves finite gradients beside the inf: the zeroed step multiplies
    them by 0, mesh by mesh for DTensors (torch's foreach ops refuse a mix). One process,
    a one-rank mesh: the same path as FSDP2 + a plain parameter."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        plain = nn.Parameter(torch.ones(3))
        spread = nn.Parameter(distribute_tensor(torch.ones(4), mesh, [Replicate()]))
        wrapper = OptimWrapper(torch.optim.SGD([plain, spread], lr=0.1), clip_grad=dict(type="value", clip_value=0.5))
        plain.grad = torch.tensor([1.0, float("inf"), 2.0])
        spread.grad = distribute_tensor(torch.tensor([3.0, -1.0, 0.25, 4.0]), mesh, [Replicate()])
        wrapper.step()
        assert torch.equal(plain.detach(), torch.ones(3))
        assert torch.equal(spread.detach().full_tensor(), torch.ones(4))
        assert (float(wrapper.skipped_steps), float(wrapper.zeroed_steps)) == (0, 1)
        plain.grad = torch.tensor([1.0, -1.0, 0.0])
        spread.grad = distribute_tensor(torch.tensor([3.0, -1.0, 0.25, 4.0]), mesh, [Replicate()])
        wrapper.step()  # a finite update is clamped and stepped
        assert torch.allclose(spread.detach().full_tensor(), torch.tensor([0.95, 1.05, 0.975, 0.95]))
    finally:
        dist.destroy_process_group()


def test_a_fused_optimizer_skips_a_bad_update_under_a_float64_default_dtype():
    """The found_inf a fused optimizer reads is float32 whatever torch's default dtype (its
    kernels take no other), and made on the parameter's device; a single parameter."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        param = nn.Parameter(torch.ones(3, dtype=torch.float32))
        wrapper = OptimWrapper(torch.optim.AdamW([param], lr=0.1, fused=True), clip_grad=dict(max_norm=1.0))
        assert wrapper._guard.policy == FUSED
        param.grad = torch.tensor([1.0, float("inf"), 0.0], dtype=torch.float32)
        wrapper.step()
        assert torch.equal(param.detach(), torch.ones(3, dtype=torch.float32))
        assert float(wrapper.skipped_steps) == 1
        param.grad = torch.ones(3, dtype=torch.float32)
        wrapper.step()
        assert not torch.equal(param.detach(), torch.ones(3, dtype=torch.float32))
    finally:
        torch.set_default_dtype(previous)


def test_exact_skip_with_a_fused_optimizer_or_a_scaler_changes_nothing():
    fused = OptimWrapper(torch.optim.AdamW(make_model().parameters(), fused=True), clip_grad=dict(max_norm=1.0),
                         exact_skip=True)
    assert fused._guard.policy == FUSED  # it skips on the device already
    model = make_model()
    scaled = AmpOptimWrapper(torch.optim.AdamW(model.parameters()), device="cpu", dtype="float16",
                             clip_grad=dict(max_norm=1.0), exact_skip=True)
    scaled.update_params(loss_of(model, 0))
    scaled.update_params(inf_loss(model))
    assert (float(scaled.skipped_steps), float(scaled.zeroed_steps)) == (1, 0)


def test_exact_skip_must_be_a_bool():
    with pytest.raises(TypeError, match="exact_skip must be True or False; got 'yes'"):
        OptimWrapper(torch.optim.SGD(make_model().parameters(), lr=0.1), exact_skip="yes")  # type: ignore[arg-type]


class Sharded(nn.Linear):
    """Stands for an FSDP2 module (fully_shard): the method its gradient-sync skip uses."""

    def __init__(self) -> None:
        super().__init__(8, 1)
        self.syncing: list[bool] = []

    def set_requires_gradient_sync(self, flag: bool, *, recurse: bool = True) -> None:
        self.syncing.append(flag)


def test_under_fsdp_partial_grads_are_not_saved_and_the_resume_warns():
    model = Sharded()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=2,
                           save_partial_grads=True)
    wrapper.initialize_count_status(model, 0, 10)
    with wrapper.optim_context(model):
        loss = model(torch.ones(1, 8)).sum()
    wrapper.update_params(loss)
    assert model.syncing == [False, True]
    with pytest.warns(UserWarning, match="FSDP keeps the window's gradients inside itself"):
        state = wrapper.state_dict()
    assert "grads" not in state["hwoptim"]
    fresh_model = Sharded()
    fresh = OptimWrapper(torch.optim.SGD(fresh_model.parameters(), lr=0.1), accumulative_counts=2)
    fresh.load_state_dict(state)
    with pytest.warns(UserWarning, match="not divisible"):
        fresh.initialize_count_status(fresh_model, 1, 10)


def test_the_new_options_come_through_a_config():
    model = make_model()
    wrapper = build_optim_wrapper(model, dict(
        type="AmpOptimWrapper", optimizer=dict(type="AdamW", lr=1e-3), device="cpu",
        accumulative_counts=2, clip_grad=dict(max_norm=1.0), save_partial_grads=True, exact_skip=True,
    ))
    assert wrapper._save_partial_grads and wrapper._guard.policy == EXACT


@pytest.mark.parametrize("clip", [None, dict(max_norm=1.0)], ids=["no-clip", "clip"])
def test_exact_skip_skips_a_num_items_window_without_items_for_real(clip):
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    wrapper = OptimWrapper(optimizer, clip_grad=clip, exact_skip=True)
    wrapper.update_params(loss_of(model, 0) * 16, num_items=16)
    params, state = params_of(model), optimizer_state(optimizer)
    wrapper.update_params(loss_of(model, 1) * 0.0, num_items=0)  # all padding
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), params))
    after = optimizer_state(optimizer)
    assert all(torch.equal(after[i][k], v) for i, entry in state.items() for k, v in entry.items())
    with pytest.warns(UserWarning, match="no items"):
        assert (float(wrapper.skipped_steps), float(wrapper.zeroed_steps)) == (1, 0)


def summed_loss_of(model: nn.Module, seed: int) -> tuple[torch.Tensor, int | torch.Tensor]:
    """A loss summed over a micro-batch of 3 to 7 items, and its count (a tensor every
    other micro-batch, as a device-side count would be)."""
    n = 3 + seed % 5
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    loss = nn.functional.mse_loss(model(x).float(), x[:, :1] * 2 - x[:, 1:2], reduction="sum")
    return loss, (torch.tensor(n) if seed % 2 else n)


def train_items(wrapper: OptimWrapper, model: nn.Module, seeds: range) -> None:
    for seed in seeds:
        with wrapper.optim_context(model):
            loss, n = summed_loss_of(model, seed)
        wrapper.update_params(loss, num_items=n)


def test_a_checkpoint_inside_a_num_items_window_resumes_bit_identically():
    """The window's item count and loss sum are partial state too: saved with the grads."""
    def fresh(seed: int = 0) -> tuple[nn.Module, OptimWrapper]:
        model = make_model(seed)
        return model, WRAPPERS["fp32-clip"](model, True)

    reference, ref_wrapper = fresh()
    ref_wrapper.initialize_count_status(reference, 0, N_MICRO)
    train_items(ref_wrapper, reference, range(N_MICRO))
    for k in range(N_MICRO + 1):
        model, wrapper = fresh()
        wrapper.initialize_count_status(model, 0, N_MICRO)
        train_items(wrapper, model, range(k))
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": wrapper.state_dict()}, buffer)
        buffer.seek(0)
        checkpoint = torch.load(buffer, weights_only=True)
        assert ("items_window" in checkpoint["optimizer"]["hwoptim"]) == (k % 3 != 0 and k != N_MICRO)
        resumed, resumed_wrapper = fresh(seed=1)
        resumed.load_state_dict(checkpoint["model"])
        resumed_wrapper.load_state_dict(checkpoint["optimizer"])
        resumed_wrapper.initialize_count_status(resumed, k, N_MICRO)
        train_items(resumed_wrapper, resumed, range(k, N_MICRO))
        for got, want in zip(resumed.parameters(), reference.parameters()):
            assert torch.equal(got, want), f"checkpoint after micro-batch {k}"
        if k < N_MICRO:  # the last update ran after the resume: its loss per item agrees
            assert torch.equal(resumed_wrapper.last_loss, ref_wrapper.last_loss)


@pytest.mark.parametrize("items", [False, True], ids=["mean-loss", "num_items"])
@pytest.mark.parametrize(("saved_at", "save"), [(3, False), (3, True), (4, True)],
                         ids=["boundary", "boundary-save-partial", "inside-save-partial"])
def test_rolling_back_to_a_checkpoint_in_the_same_process_is_exact(items, saved_at, save):
    """Loading a checkpoint sets the window to what the checkpoint holds: the live window's
    gradients and item count, trained after the save, do not leak into the next update."""
    run = train_items if items else train
    reference = make_model()
    ref_wrapper = WRAPPERS["fp32-clip"](reference, False)
    ref_wrapper.initialize_count_status(reference, 0, N_MICRO)
    run(ref_wrapper, reference, range(N_MICRO))
    model = make_model()
    wrapper = WRAPPERS["fp32-clip"](model, save)
    wrapper.initialize_count_status(model, 0, N_MICRO)
    run(wrapper, model, range(saved_at))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": wrapper.state_dict()}, buffer)
    run(wrapper, model, range(saved_at, saved_at + 1))  # then roll back to the checkpoint
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    model.load_state_dict(checkpoint["model"])
    wrapper.load_state_dict(checkpoint["optimizer"])
    wrapper.initialize_count_status(model, saved_at, N_MICRO)
    run(wrapper, model, range(saved_at, N_MICRO))
    for got, want in zip(model.parameters(), reference.parameters()):
        assert torch.equal(got, want)
    if items:
        assert torch.equal(wrapper.last_loss, ref_wrapper.last_loss)


def test_a_bad_saved_items_window_raises_before_anything_changes():
    model = make_model()
    wrapper = WRAPPERS["fp32-clip"](model, True)
    wrapper.initialize_count_status(model, 0, N_MICRO)
    train_items(wrapper, model, range(4))
    state = copy.deepcopy(wrapper.state_dict())
    state["hwoptim"]["items_window"]["host_items"] = -1
    state["hwoptim"]["inner_count"] = 7
    with pytest.raises(ValueError, match="host_items must be an int >= 0; got -1"):
        wrapper.load_state_dict(state)
    assert wrapper.inner_count == 4


@pytest.mark.parametrize("make", [fp16, fp32])
def test_after_a_failed_num_items_step_the_next_window_counts_its_own_items_only(make):
    model, reference = make_model(), make_model()
    wrapper, ref_wrapper = make(model, False, dict(max_norm=1.0)), make(reference, False, dict(max_norm=1.0))
    for wrapped, net in ((wrapper, model), (ref_wrapper, reference)):
        wrapped.initialize_count_status(net, 0, None)
        train_items(wrapped, net, range(2))
    loss, n = summed_loss_of(model, 2)
    wrapper.update_params(loss, num_items=n)
    loss, n = summed_loss_of(model, 3)
    with pytest.raises(TypeError):
        wrapper.update_params(loss, step_kwargs={"junk": 1}, num_items=n)
    assert wrapper._items.loss is None and wrapper._items.host_items == 0
    train_items(wrapper, model, range(4, 8))
    train_items(ref_wrapper, reference, range(4, 8))
    assert_params_equal(model, reference)
    assert torch.equal(wrapper.last_loss, ref_wrapper.last_loss)
