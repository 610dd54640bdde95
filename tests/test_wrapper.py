"""OptimWrapper: mmengine's semantics (its test checklist, ported) and where hwoptim goes further."""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from unittest import mock

import pytest
import torch
from helpers import COPIES, assert_same, copied, run_micro_batches, total_norm
from torch import nn

from hwoptim import OptimWrapper
from hwoptim._binding import ModelBinding
from hwoptim._torch_compat import takes_found_inf


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


_TEACHER = torch.tensor([[0.5], [-1.0], [0.25], [2.0]])


def loss_of(model: nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 4, generator=g)
    return nn.functional.mse_loss(model(x), x @ _TEACHER)


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def sgd(model: nn.Module, **kw: float) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=kw.pop("lr", 0.1), **kw)


def spy_update(wrapper: OptimWrapper) -> tuple[mock.Mock, mock.Mock, mock.Mock]:
    """Replace backward/step/zero_grad like mmengine's tests do: counting, recording."""
    backward = mock.Mock(side_effect=lambda loss: setattr(wrapper._window, "inner", wrapper._window.inner + 1))
    step, zero = mock.Mock(), mock.Mock()
    wrapper.backward, wrapper.step, wrapper.zero_grad = backward, step, zero  # type: ignore[method-assign]
    return backward, step, zero


# -- construction -------------------------------------------------------------------------


def test_defaults_match_mmengine():
    model = make_model()
    optimizer = sgd(model)
    wrapper = OptimWrapper(optimizer)
    assert wrapper.optimizer is optimizer
    assert wrapper.clip_grad_kwargs is None
    assert wrapper.accumulative_counts == 1
    assert (wrapper._window.inner, wrapper._window.max_counts, wrapper._window.remainder) == (0, -1, -1)
    assert wrapper.last_grad_norm is None and wrapper.skipped_steps is None


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", None])
def test_accumulative_counts_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="accumulative_counts must be an int >= 1"):
        OptimWrapper(sgd(make_model()), accumulative_counts=bad)


def test_optimizer_must_be_an_optimizer():
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer.*got dict"):
        OptimWrapper(dict(type="SGD", lr=0.1))  # type: ignore[arg-type]


def test_clip_grad_must_be_a_dict():
    with pytest.raises(TypeError, match="clip_grad must be a dict"):
        OptimWrapper(sgd(make_model()), clip_grad=[])  # type: ignore[arg-type]


def test_bad_clip_grad_fails_at_construction_not_at_first_step():
    with pytest.raises(ValueError, match="needs 'max_norm'"):
        OptimWrapper(sgd(make_model()), clip_grad=dict(norm_type=2))


def test_clip_grad_dict_is_never_mutated_and_can_be_reused():
    cfg = dict(type="value", clip_value=0.5)
    frozen = copy.deepcopy(cfg)
    first = OptimWrapper(sgd(make_model()), clip_grad=cfg)
    second = OptimWrapper(sgd(make_model()), clip_grad=cfg)
    assert cfg == frozen
    assert first.clip_grad_kwargs == second.clip_grad_kwargs == {"clip_value": 0.5}


# -- update_params and the counters (mmengine's checklist) --------------------------------


def test_update_params_without_accumulation_passes_the_loss_and_steps():
    wrapper = OptimWrapper(sgd(make_model()))
    backward, step, zero = spy_update(wrapper)
    loss = torch.tensor(1.5)
    wrapper.update_params(loss)
    assert backward.call_args.args[0] is loss
    step.assert_called_once_with()
    zero.assert_called_once_with()


def test_update_params_accumulates_then_steps_on_the_third_call():
    wrapper = OptimWrapper(sgd(make_model()), accumulative_counts=3)
    wrapper.initialize_count_status(None, 0, 100)
    backward, step, zero = spy_update(wrapper)
    wrapper.update_params(torch.tensor(3.0))
    assert backward.call_args.args[0] == pytest.approx(1.0)
    step.assert_not_called()
    zero.assert_not_called()
    wrapper.update_params(torch.tensor(3.0))
    assert wrapper.inner_count == 2
    wrapper.update_params(torch.tensor(3.0))
    step.assert_called_once_with()
    zero.assert_called_once_with()


def test_step_and_zero_kwargs_are_forwarded():
    wrapper = OptimWrapper(sgd(make_model()))
    _, step, zero = spy_update(wrapper)
    wrapper.update_params(torch.tensor(1.0), step_kwargs={"closure": None}, zero_kwargs={"set_to_none": False})
    step.assert_called_once_with(closure=None)
    zero.assert_called_once_with(set_to_none=False)


def test_without_initialization_the_last_partial_window_does_not_step_and_warns():
    wrapper = OptimWrapper(sgd(make_model()), accumulative_counts=3)
    wrapper._window.inner = 99
    backward, step, _ = spy_update(wrapper)
    with pytest.warns(UserWarning, match="initialize_count_status"):
        wrapper.update_params(torch.tensor(3.0))
    assert backward.call_args.args[0] == pytest.approx(1.0)  # factor 3
    step.assert_not_called()


def test_max_counts_none_means_unknown_end_without_a_warning():
    wrapper = OptimWrapper(sgd(make_model()), accumulative_counts=2)
    wrapper.initialize_count_status(None, 0, None)
    spy_update(wrapper)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapper.update_params(torch.tensor(1.0))
    assert wrapper._window.max_counts == -1


def test_initialized_remainder_window_steps_with_its_own_factor():
    wrapper = OptimWrapper(sgd(make_model()), accumulative_counts=3)
    wrapper.initialize_count_status(None, 99, 100)
    backward, step, zero = spy_update(wrapper)
    loss = torch.tensor(2.0)
    wrapper.update_params(loss)
    assert backward.call_args.args[0] == loss  # factor = remainder 1
    step.assert_called_once()
    zero.assert_called_once()


def test_initialized_full_window_before_the_remainder_divides_by_the_window():
    wrapper = OptimWrapper(sgd(make_model()), accumulative_counts=3)
    wrapper.initialize_count_status(None, 96, 100)
    backward, step, _ = spy_update(wrapper)
    wrapper.update_params(torch.tensor(3.0))
    wrapper.update_params(torch.tensor(3.0))
    step.assert_not_called()
    assert backward.call_args.args[0] == pytest.approx(1.0)


def test_remainder_is_computed_from_the_absolute_max():
    wrapper = OptimWrapper(sgd(make_model()), accumulative_counts=3)
    wrapper.initialize_count_status(None, 0, 100)
    assert wrapper._window.remainder == 1


def test_counter_trace_matches_mmengine_exactly():
    # (index before backward, loss factor, should_sync, should_update) for max=10, acc=3
    expected = [(0, 3, False, False), (1, 3, False, False), (2, 3, True, True), (3, 3, False, False),
                (4, 3, False, False), (5, 3, True, True), (6, 3, False, False), (7, 3, False, False),
                (8, 3, True, True), (9, 1, True, True)]
    wrapper = OptimWrapper(sgd(make_model()), accumulative_counts=3)
    wrapper.initialize_count_status(None, 0, 10)
    trace = []
    for _ in range(10):
        index, sync = wrapper.inner_count, wrapper.should_sync()
        factor = 3.0 / float(wrapper.scale_loss(torch.tensor(3.0)))
        wrapper._window.inner += 1
        trace.append((index, round(factor), sync, wrapper.should_update()))
    assert trace == expected


def test_past_max_counts_windows_are_full_instead_of_dividing_by_zero():
    wrapper = OptimWrapper(sgd(make_model()), accumulative_counts=2)
    wrapper.initialize_count_status(None, 4, 4)  # mmengine asserts "loss_factor > 0" here
    for _ in range(3):
        assert float(wrapper.scale_loss(torch.tensor(2.0))) == pytest.approx(1.0)
        wrapper._window.inner += 1


def test_past_a_max_counts_inside_a_window_the_first_window_divides_by_its_length():
    """acc 4, max_counts 10: windows 1-4, 5-8, the remainder 9-10, then (training goes on)
    11-12, which ends at the next multiple of 4 and holds 2 micro-batches, then 13-16. Each
    update is the gradient of its window's mean loss, as plain torch computes it."""
    model = make_model()
    reference = copy.deepcopy(model)
    wrapper = OptimWrapper(sgd(model), accumulative_counts=4)
    wrapper.initialize_count_status(model, 0, 10)
    for seed in range(16):
        wrapper.update_params(loss_of(model, seed))
    optimizer = sgd(reference)
    for window in (range(0, 4), range(4, 8), range(8, 10), range(10, 12), range(12, 16)):
        loss = sum(loss_of(reference, seed) for seed in window) / len(window)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want)


def test_resume_inside_a_window_warns():
    model = make_model()
    wrapper = OptimWrapper(sgd(model), accumulative_counts=3)
    with pytest.warns(UserWarning, match="Resumed iteration number") as record:
        wrapper.initialize_count_status(model, 2, 100)
    assert len(record) == 1


def test_batch_norm_with_accumulation_warns():
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1))
    wrapper = OptimWrapper(sgd(model), accumulative_counts=3)
    with pytest.warns(UserWarning, match="Gradient accumulative") as record:
        wrapper.initialize_count_status(model, 0, 99)
    assert len(record) == 1


def test_no_warnings_without_accumulation():
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1))
    wrapper = OptimWrapper(sgd(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapper.initialize_count_status(model, 7, 99)


@pytest.mark.parametrize(
    ("init", "max_counts", "match"),
    [(-1, 10, "init_counts"), (True, 10, "init_counts"), (0, -2, "max_counts"),
     (0, 2.5, "max_counts"), (11, 10, "past max_counts")],
)
def test_initialize_count_status_rejects_bad_counts(init, max_counts, match):
    wrapper = OptimWrapper(sgd(make_model()), accumulative_counts=2)
    with pytest.raises(ValueError, match=match):
        wrapper.initialize_count_status(None, init, max_counts)
    assert wrapper._window.max_counts == -1  # nothing half-applied


def test_numpy_integers_are_counts_and_become_plain_ints():
    np = pytest.importorskip("numpy")
    model = make_model()
    wrapper = OptimWrapper(sgd(model), accumulative_counts=np.int64(3))
    wrapper.initialize_count_status(model, np.int32(3), np.uint16(8))
    assert (wrapper.accumulative_counts, wrapper.inner_count, wrapper._window.max_counts) == (3, 3, 8)
    assert {type(wrapper.accumulative_counts), type(wrapper.inner_count), type(wrapper._window.max_counts)} == {int}
    assert wrapper.state_dict()["hwoptim"] == {"inner_count": 3, "max_counts": 8, "accumulative_counts": 3}


@pytest.mark.parametrize("bad", ["np.bool_(True)", "np.float64(2.0)", "np.array(2)", "torch.tensor(2)"])
def test_what_is_no_integer_is_no_count_whatever_its_type(bad):
    np = pytest.importorskip("numpy")
    value = eval(bad, {"np": np, "torch": torch})
    with pytest.raises(ValueError, match="accumulative_counts must be an int >= 1"):
        OptimWrapper(sgd(make_model()), accumulative_counts=value)
    wrapper = OptimWrapper(sgd(make_model()))
    with pytest.raises(ValueError, match="init_counts must be an int >= 0"):
        wrapper.initialize_count_status(None, value, None)
    with pytest.raises(ValueError, match="max_counts must be an int >= 0 or None"):
        wrapper.initialize_count_status(None, 0, value)


def test_inner_count_is_read_only():
    wrapper = OptimWrapper(sgd(make_model()))
    with pytest.raises(AttributeError):
        wrapper.inner_count = 3  # type: ignore[misc]


# -- the optimizer views --------------------------------------------------------------------


def test_get_lr_single_group():
    assert OptimWrapper(sgd(make_model(), lr=0.1)).get_lr() == {"lr": [0.1]}


def test_get_lr_several_groups_has_no_fake_base_group():
    model = make_model()
    optimizer = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.01}, {"params": model[2].parameters()}], lr=0.1
    )
    wrapper = OptimWrapper(optimizer)
    assert wrapper.get_lr() == {"lr": [0.01, 0.1]}
    assert wrapper.param_groups is optimizer.param_groups
    assert all(isinstance(p, nn.Parameter) for g in wrapper.param_groups for p in g["params"])


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.8), 0.8),
        (lambda ps: torch.optim.Adam(ps, lr=0.1, betas=(0.9, 0.9)), 0.9),
        (lambda ps: torch.optim.RMSprop(ps, lr=0.1, momentum=0.3), 0.3),
        (lambda ps: torch.optim.Adagrad(ps, lr=0.1), 0),
    ],
)
def test_get_momentum(make, expected):
    wrapper = OptimWrapper(make(make_model().parameters()))
    assert wrapper.get_momentum() == {"momentum": [expected]}


def test_defaults_and_param_groups_are_the_optimizers():
    optimizer = sgd(make_model())
    wrapper = OptimWrapper(optimizer)
    assert wrapper.defaults is optimizer.defaults
    assert wrapper.param_groups is optimizer.param_groups


def test_step_and_zero_grad_call_the_optimizer():
    optimizer = mock.MagicMock(spec=torch.optim.Optimizer)
    optimizer.defaults, optimizer.param_groups = {}, [{}]
    wrapper = OptimWrapper(optimizer)
    wrapper.step()
    wrapper.zero_grad(set_to_none=True)
    optimizer.step.assert_called_once_with()
    optimizer.zero_grad.assert_called_once_with(set_to_none=True)


def test_backward_calls_loss_backward_with_kwargs_and_counts():
    wrapper = OptimWrapper(sgd(make_model()))
    loss = mock.MagicMock()
    wrapper.backward(loss, retain_graph=True)
    loss.backward.assert_called_once_with(retain_graph=True)
    assert wrapper.inner_count == 1


def test_repr_names_the_settings_and_the_optimizer():
    text = repr(OptimWrapper(sgd(make_model()), accumulative_counts=2, clip_grad=dict(max_norm=1.0)))
    assert "accumulative_counts=2" in text and "max_norm=1.0" in text and "SGD" in text


# -- a real training loop ----------------------------------------------------------------------


def test_loss_falls_with_accumulation_and_clipping():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=0.02), accumulative_counts=2,
                           clip_grad=dict(max_norm=1.0))
    wrapper.initialize_count_status(model, 0, 80)
    losses = []
    for i in range(80):
        with wrapper.optim_context(model):
            loss = loss_of(model, seed=i % 4)
        wrapper.update_params(loss)
        losses.append(float(loss.detach()))
    assert sum(losses[-8:]) < 0.5 * sum(losses[:8])


def test_accumulation_equals_one_step_on_the_concatenated_batch():
    model, reference = make_model(), make_model()
    wrapper = OptimWrapper(sgd(model, lr=0.05), accumulative_counts=3)
    wrapper.initialize_count_status(model, 0, 3)
    for seed in range(3):
        wrapper.update_params(loss_of(model, seed))
    ref_opt = sgd(reference, lr=0.05)
    (sum(loss_of(reference, seed) for seed in range(3)) / 3).backward()
    ref_opt.step()
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want)


# -- clipping -------------------------------------------------------------------------------------


def test_norm_clipping_keeps_the_pre_clip_norm_as_a_tensor():
    model = make_model()
    wrapper = OptimWrapper(sgd(model), clip_grad=dict(max_norm=0.01))
    loss = loss_of(model, 0) * 100
    loss.backward(retain_graph=True)
    expected = total_norm([p.grad for p in model.parameters()])
    model.zero_grad()
    wrapper.update_params(loss)
    assert isinstance(wrapper.last_grad_norm, torch.Tensor)
    torch.testing.assert_close(wrapper.last_grad_norm, expected)


def test_norm_clipping_limits_the_update():
    model = make_model()
    before = params_of(model)
    wrapper = OptimWrapper(sgd(model, lr=1.0), clip_grad=dict(max_norm=0.5))
    wrapper.update_params(loss_of(model, 0) * 1000)
    delta = torch.cat([(a.detach() - b).flatten() for a, b in zip(model.parameters(), before)])
    assert float(delta.norm()) == pytest.approx(0.5, rel=1e-4)


def test_value_clipping_clamps_and_still_reports_the_norm():
    model = make_model()
    wrapper = OptimWrapper(sgd(model), clip_grad=dict(type="value", clip_value=1e-3))
    loss = loss_of(model, 0) * 100
    wrapper.backward(loss)
    wrapper.step()  # clips, then steps: the gradients stay
    assert max(float(p.grad.abs().max()) for p in model.parameters()) == pytest.approx(1e-3)
    assert float(wrapper.last_grad_norm) > 1e-3


@pytest.mark.parametrize("foreach", [False, True])
def test_value_clipping_without_any_gradient_steps_like_mmengine(foreach):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=foreach)
    wrapper = OptimWrapper(optimizer, clip_grad=dict(type="value", clip_value=0.5))
    before = params_of(model)
    wrapper.update_params(torch.ones((), requires_grad=True) * 2)  # touches no parameter
    for got, want in zip(model.parameters(), before):
        assert torch.equal(got, want)
    assert float(wrapper.last_grad_norm) == 0.0
    assert float(wrapper.skipped_steps) == 0
    wrapper.update_params(loss_of(model, 0))  # the next real step clips and steps
    assert not all(torch.equal(got, want) for got, want in zip(model.parameters(), before))


# -- the optimizer's parameters are the model's -------------------------------------------------


def test_an_optimizer_of_replaced_parameters_is_refused_when_the_model_is_given():
    model = make_model()
    wrapper = OptimWrapper(sgd(model), accumulative_counts=2)
    # What model.to(<out-of-tree device>) does: new Parameter objects, on the new device, in
    # the module; the optimizer keeps the old ones ("meta" stands for the new device).
    for module in (model[0], model[2]):
        module.weight = nn.Parameter(torch.empty_like(module.weight, device="meta"))
        module.bias = nn.Parameter(torch.empty_like(module.bias, device="meta"))
    with pytest.raises(RuntimeError, match=r"4 of the optimizer's parameters are not on the model's device "
                       r"\(meta\).*move the model to the device before building the optimizer"):
        wrapper.initialize_count_status(model, 0, 10)
    with pytest.raises(RuntimeError, match="before building the optimizer"):
        with wrapper.optim_context(model):
            pass


def test_parameters_that_are_not_the_models_but_on_its_device_are_fine():
    # mmengine accepts these: a learnable loss temperature, another model's parameters.
    model = make_model()
    temperature = nn.Parameter(torch.ones(()))
    other = nn.Linear(3, 3)
    wrapper = OptimWrapper(
        torch.optim.AdamW([*model.parameters(), temperature, *other.parameters()], lr=0.1),
        clip_grad=dict(max_norm=1.0))
    wrapper.initialize_count_status(model, 0, 10)
    with wrapper.optim_context(model):
        loss = loss_of(model, 0) * temperature
    before = temperature.detach().clone()
    wrapper.update_params(loss)
    assert not torch.equal(temperature.detach(), before)  # trained with the model


def test_a_model_spread_over_device_types_is_not_checked_without_a_wrapper_device():
    model = make_model()
    wrapper = OptimWrapper(sgd(model))
    model[2].weight = nn.Parameter(torch.empty_like(model[2].weight, device="meta"))
    wrapper.initialize_count_status(model, 0, 10)  # cpu and meta: nothing to compare with


def test_the_parameter_check_runs_once_per_model():
    model = make_model()
    wrapper = OptimWrapper(sgd(model), clip_grad=dict(max_norm=1.0))
    with mock.patch.object(ModelBinding, "_check_placement", autospec=True) as check:
        for seed in range(3):
            with wrapper.optim_context(model):
                loss = loss_of(model, seed)
            wrapper.update_params(loss)
    assert check.call_count == 1


def test_a_subset_of_the_model_is_fine():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model[2].parameters(), lr=0.1))
    wrapper.initialize_count_status(model, 0, 10)  # e.g. a frozen backbone: no error
    with wrapper.optim_context(model):
        loss = loss_of(model, 0)
    wrapper.update_params(loss)


def test_clip_params_follow_add_param_group():
    model = make_model()
    optimizer = torch.optim.SGD(model[0].parameters(), lr=0.1)
    wrapper = OptimWrapper(optimizer, clip_grad=dict(max_norm=1e-6))
    wrapper.update_params(loss_of(model, 0))
    optimizer.add_param_group({"params": model[2].parameters()})
    before = params_of(model)[2:]
    wrapper.update_params(loss_of(model, 1) * 1e6)
    change = max(float((p.detach() - b).abs().max()) for p, b in zip(list(model.parameters())[2:], before))
    assert 0 < change < 1e-6  # the new group was clipped too


# -- non-finite gradients (mmengine turns parameters into NaN here) -------------------------------


def inf_loss(model: nn.Module) -> torch.Tensor:
    return model(torch.ones(1, 4)).sum() * float("inf")


def test_inf_gradient_with_clipping_never_reaches_the_parameters():
    model = make_model()
    wrapper = OptimWrapper(sgd(model), clip_grad=dict(max_norm=1.0))
    before = params_of(model)
    wrapper.update_params(inf_loss(model))
    for got, want in zip(model.parameters(), before):
        assert torch.equal(got, want)  # plain SGD with zeroed gradients does not move
    assert float(wrapper.zeroed_steps) == 1  # stepped with zeroed gradients, not skipped
    assert float(wrapper.skipped_steps) == 0
    assert not torch.isfinite(wrapper.last_grad_norm)
    wrapper.update_params(loss_of(model, 0))  # training goes on
    assert float(wrapper.zeroed_steps) == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_fused_adam_keeps_parameters_finite_on_an_inf_step():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=0.1), clip_grad=dict(max_norm=1.0))
    wrapper.update_params(loss_of(model, 0))
    wrapper.update_params(inf_loss(model))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert float(wrapper.zeroed_steps) == 1


def test_fused_optimizer_skips_the_non_finite_step_on_the_device():
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    wrapper = OptimWrapper(optimizer, clip_grad=dict(max_norm=1.0))
    assert takes_found_inf(optimizer)
    wrapper.update_params(loss_of(model, 0))
    before = params_of(model)
    state_before = copy.deepcopy(optimizer.state_dict()["state"])
    wrapper.update_params(inf_loss(model))
    for got, want in zip(model.parameters(), before):
        assert torch.equal(got, want)
    for index, state in optimizer.state_dict()["state"].items():
        assert torch.equal(state["step"], state_before[index]["step"])  # not even counted
    assert not hasattr(optimizer, "found_inf")
    assert float(wrapper.skipped_steps) == 1


def test_value_clipping_zeroes_a_non_finite_step_too():
    model = make_model()
    wrapper = OptimWrapper(sgd(model), clip_grad=dict(type="value", clip_value=0.1))
    before = params_of(model)
    wrapper.update_params(model(torch.ones(1, 4)).sum() * float("inf"))  # inf, not nan, grads
    for got, want in zip(model.parameters(), before):
        assert torch.equal(got, want)  # not stepped with the clamped +-0.1
    assert float(wrapper.zeroed_steps) == 1


def test_infinite_max_norm_measures_without_clipping():
    model, reference = make_model(), make_model()
    wrapper = OptimWrapper(sgd(model, lr=0.5), clip_grad=dict(max_norm=float("inf")))
    wrapper.update_params(loss_of(model, 0) * 100)
    ref_opt = sgd(reference, lr=0.5)
    (loss_of(reference, 0) * 100).backward()
    norm = total_norm([p.grad for p in reference.parameters()])
    ref_opt.step()
    torch.testing.assert_close(wrapper.last_grad_norm, norm)
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want)


def test_skipped_steps_follows_the_gradients_to_another_device():
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1, fused=True), clip_grad=dict(max_norm=1.0))
    moved = []
    # a count kept on another device (as if the first steps ran there): 2 skips so far
    wrapper._skips.skipped = mock.Mock(device=torch.device("cuda", 0),
                                       to=lambda d: moved.append(d) or torch.tensor(2.0))
    wrapper.update_params(inf_loss(model))
    skipped = wrapper.skipped_steps  # folds the pending record into the count
    assert moved == [torch.device("cpu")]
    assert skipped.device.type == "cpu" and float(skipped) == 3


@pytest.mark.parametrize("fused", [False, True])
def test_skips_are_counted_exactly_across_folds(fused):
    model = make_model()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.01, fused=fused), clip_grad=dict(max_norm=1.0))
    bad = {3, 255, 256, 300, 511, 512, 600}
    for i in range(700):  # past two folds of the pending records (every 256 updates)
        wrapper.update_params(inf_loss(model) if i in bad else loss_of(model, i))
        if i == 400:  # a read folds early; counting goes on
            assert float(wrapper.skipped_steps if fused else wrapper.zeroed_steps) == 4
    assert wrapper._skips.pending < 256
    # a fused optimizer skips for real; any other steps with zeroed gradients
    counted, other = (wrapper.skipped_steps, wrapper.zeroed_steps)[:: 1 if fused else -1]
    assert (float(counted), float(other)) == (len(bad), 0)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_error_if_nonfinite_raises_before_touching_anything():
    model = make_model()
    wrapper = OptimWrapper(sgd(model), clip_grad=dict(max_norm=1.0, error_if_nonfinite=True))
    before = params_of(model)
    with pytest.raises(RuntimeError, match="non-finite"):
        wrapper.update_params(inf_loss(model))
    for got, want in zip(model.parameters(), before):
        assert torch.equal(got, want)


# -- optim_context: sync skipping --------------------------------------------------------------------


class RecordingDDP(nn.Module):
    """A stand-in for DDP/FSDP1: records whether no_sync is active when backward runs."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(2, 1)
        self.syncing = True
        self.backward_sync: list[bool] = []
        self.inner.weight.register_hook(self._on_grad)

    def _on_grad(self, grad: torch.Tensor) -> torch.Tensor:
        self.backward_sync.append(self.syncing)
        return grad

    @contextmanager
    def no_sync(self):
        self.syncing = False
        try:
            yield
        finally:
            self.syncing = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class RecordingFSDP2(RecordingDDP):
    """A stand-in for an FSDP2 module: set_requires_gradient_sync instead of no_sync."""

    no_sync = None  # type: ignore[assignment]

    def set_requires_gradient_sync(self, flag: bool) -> None:
        self.syncing = flag


@pytest.mark.parametrize("model_cls", [RecordingDDP, RecordingFSDP2])
@pytest.mark.parametrize("pattern", ["mmengine", "inside"])
def test_sync_is_skipped_during_the_backward_of_non_updating_micro_batches(model_cls, pattern):
    model = model_cls()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=3)
    wrapper.initialize_count_status(model, 0, 7)
    run_micro_batches(wrapper, model, 7, pattern)
    # windows [0,1,2] [3,4,5] [6]: only the last micro-batch of each syncs
    assert model.backward_sync == [False, False, True, False, False, True, True]
    assert model.syncing is True


def test_no_sync_is_never_entered_without_accumulation():
    model = RecordingDDP()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    with mock.patch.object(RecordingDDP, "no_sync") as no_sync:
        for _ in range(3):
            with wrapper.optim_context(model):
                loss = model(torch.ones(1, 2)).sum()
            wrapper.update_params(loss)
    no_sync.assert_not_called()


def test_an_exception_in_the_block_restores_sync():
    model = RecordingDDP()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=2)
    with pytest.raises(KeyError), wrapper.optim_context(model):
        assert model.syncing is False
        raise KeyError("boom")
    assert model.syncing is True and wrapper._binding.pending is None


def test_a_forward_without_backward_does_not_leak_the_skip():
    model = RecordingDDP()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=2)
    wrapper.initialize_count_status(model, 0, 4)
    with wrapper.optim_context(model):  # e.g. a validation forward
        model(torch.ones(1, 2))
    with wrapper.optim_context(model):
        loss = model(torch.ones(1, 2)).sum()
    wrapper.update_params(loss)
    assert model.backward_sync == [False] and model.syncing is True


def test_compiled_model_wrappers_are_unwrapped_for_sync_skipping():
    inner = RecordingDDP()

    class Compiled:  # what torch.compile returns keeps the module as _orig_mod
        _orig_mod = inner

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            return inner(x)

    compiled = Compiled()
    wrapper = OptimWrapper(torch.optim.SGD(inner.parameters(), lr=0.1), accumulative_counts=2)
    wrapper.initialize_count_status(compiled, 0, 2)
    for _ in range(2):
        with wrapper.optim_context(compiled):
            loss = compiled(torch.ones(1, 2)).sum()
        wrapper.update_params(loss)
    assert inner.backward_sync == [False, True]


def test_module_clip_grad_norm_is_used_when_the_model_has_one():
    model = RecordingDDP()
    calls = []

    def clip_grad_norm_(max_norm, norm_type):  # FSDP1's signature: the global norm over shards
        calls.append((max_norm, norm_type))
        return torch.tensor(0.5)

    model.clip_grad_norm_ = clip_grad_norm_  # type: ignore[attr-defined]
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), clip_grad=dict(max_norm=2.0))
    with wrapper.optim_context(model):
        loss = model(torch.ones(1, 2)).sum()
    wrapper.update_params(loss)
    assert calls == [(2.0, 2.0)]
    assert float(wrapper.last_grad_norm) == 0.5


# -- checkpoints --------------------------------------------------------------------------------------


def test_state_dict_is_the_optimizers_plus_the_counters():
    model = make_model()
    optimizer = sgd(model, momentum=0.9)
    wrapper = OptimWrapper(optimizer, accumulative_counts=2)
    wrapper.initialize_count_status(model, 0, 10)
    wrapper.update_params(loss_of(model, 0))
    state = wrapper.state_dict()
    assert state["hwoptim"] == {"inner_count": 1, "max_counts": 10, "accumulative_counts": 2}
    assert {k: v for k, v in state.items() if k != "hwoptim"} == optimizer.state_dict()


@pytest.mark.parametrize("num_items", [False, True], ids=["mean-loss", "num_items"])
def test_a_resumed_run_whose_end_is_unknown_does_not_warn_to_call_initialize_count_status(num_items):
    """initialize_count_status(model, 0, None) is saved as such, not as a run that never
    called it; a checkpoint without the mark (older, or never called) still warns."""
    def micro_batch(wrapper: OptimWrapper, model: nn.Module) -> None:
        loss = loss_of(model, 0)
        if num_items:
            wrapper.update_params(loss * 6, num_items=6)
        else:
            wrapper.update_params(loss)

    model = make_model()
    wrapper = OptimWrapper(sgd(model), accumulative_counts=2)
    wrapper.initialize_count_status(model, 0, None)
    micro_batch(wrapper, model)
    checkpoint = copy.deepcopy(wrapper.state_dict())
    resumed = OptimWrapper(sgd(model), accumulative_counts=2)
    resumed.load_state_dict(checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        micro_batch(resumed, model)
    assert resumed.inner_count == 2
    never = OptimWrapper(sgd(model), accumulative_counts=2)
    with pytest.warns(UserWarning, match="initialize_count_status"):
        micro_batch(never, model)
    resumed_never = OptimWrapper(sgd(model), accumulative_counts=2)
    resumed_never.load_state_dict(copy.deepcopy(never.state_dict()))
    with pytest.warns(UserWarning, match="initialize_count_status"):
        micro_batch(resumed_never, model)


def run(model: nn.Module, wrapper: OptimWrapper, seeds: range) -> None:
    for seed in seeds:
        with wrapper.optim_context(model):
            loss = loss_of(model, seed)
        wrapper.update_params(loss)


def test_resume_from_state_dict_continues_exactly():
    def fresh() -> tuple[nn.Module, OptimWrapper]:
        model = make_model()
        wrapper = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=0.01), accumulative_counts=3,
                               clip_grad=dict(max_norm=0.5))
        return model, wrapper

    model, wrapper = fresh()
    wrapper.initialize_count_status(model, 0, 14)
    run(model, wrapper, range(14))

    first, first_wrapper = fresh()
    first_wrapper.initialize_count_status(first, 0, 14)
    run(first, first_wrapper, range(9))
    checkpoint = copy.deepcopy({"model": first.state_dict(), "optim": first_wrapper.state_dict()})

    resumed, resumed_wrapper = fresh()
    resumed.load_state_dict(checkpoint["model"])
    resumed_wrapper.load_state_dict(checkpoint["optim"])  # no initialize_count_status needed
    assert (resumed_wrapper.inner_count, resumed_wrapper._window.max_counts) == (9, 14)
    run(resumed, resumed_wrapper, range(9, 14))
    for got, want in zip(resumed.parameters(), model.parameters()):
        assert torch.equal(got, want)


def test_load_state_dict_leaves_its_argument_untouched():
    model = make_model()
    wrapper = OptimWrapper(sgd(model, momentum=0.9))
    wrapper.update_params(loss_of(model, 0))
    state = wrapper.state_dict()
    state["base_param_settings"] = {"lr": 0.1}
    state["loss_scaler"] = {}
    keys = set(state)
    OptimWrapper(sgd(make_model(), momentum=0.9)).load_state_dict(state)
    assert set(state) == keys


def test_loads_a_bare_optimizer_state_dict_and_keeps_its_counters():
    source = sgd(make_model(), momentum=0.9, lr=0.3)
    wrapper = OptimWrapper(sgd(make_model(), momentum=0.9))
    wrapper._window.inner = 5
    wrapper.load_state_dict(source.state_dict())
    assert wrapper.get_lr() == {"lr": [0.3]}
    assert wrapper.inner_count == 5


def test_a_mismatched_state_dict_raises_before_changing_anything():
    model = make_model()
    wrapper = OptimWrapper(sgd(model, lr=0.1))
    wrapper._window.inner = 4
    other = torch.optim.SGD([{"params": [torch.zeros(1)]}, {"params": [torch.zeros(1)]}], lr=0.5)
    with pytest.raises(ValueError, match="2 parameter group"):
        wrapper.load_state_dict(other.state_dict())
    bad_counters = dict(sgd(make_model(), lr=0.5).state_dict(), hwoptim={"inner_count": -3})
    with pytest.raises(ValueError, match=r"lacks 'max_counts'|inner_count"):
        wrapper.load_state_dict(bad_counters)
    bad_mark = dict(sgd(make_model(), lr=0.5).state_dict(), hwoptim={
        "inner_count": 1, "max_counts": -1, "accumulative_counts": 1, "end_unknown": "yes"})
    with pytest.raises(ValueError, match="end_unknown must be True or False; got 'yes'"):
        wrapper.load_state_dict(bad_mark)
    assert wrapper.get_lr() == {"lr": [0.1]} and wrapper.inner_count == 4


def test_not_a_state_dict_is_refused_clearly():
    wrapper = OptimWrapper(sgd(make_model()))
    with pytest.raises(ValueError, match="no 'param_groups'"):
        wrapper.load_state_dict({"state": {}})
    with pytest.raises(TypeError, match="must be a dict"):
        wrapper.load_state_dict([])  # type: ignore[arg-type]


def test_loading_counters_saved_with_another_window_warns():
    model = make_model()
    saved = OptimWrapper(sgd(model), accumulative_counts=4).state_dict()
    wrapper = OptimWrapper(sgd(make_model()), accumulative_counts=2)
    with pytest.warns(UserWarning, match="accumulative_counts=4"):
        wrapper.load_state_dict(saved)


# -- copies: pickle, torch.save, deepcopy ------------------------------------------------------

COPY_CONFIGS = {
    "plain": dict(),
    "accumulating": dict(accumulative_counts=3),
    "norm": dict(clip_grad=dict(max_norm=0.5)),
    "norm-inf-foreach": dict(accumulative_counts=2, clip_grad=dict(max_norm=0.5, norm_type="inf", foreach=True)),
    "value": dict(accumulative_counts=2, clip_grad=dict(type="value", clip_value=0.05)),
    "measure-only": dict(clip_grad=dict(max_norm=float("inf"))),
}


def train_micro_batches(wrapper: OptimWrapper, model: nn.Module, seeds: range, inf_at: int = -1) -> None:
    for seed in seeds:
        with wrapper.optim_context(model):
            loss = loss_of(model, seed)
        if seed == inf_at:
            loss = loss * float("inf")
        wrapper.update_params(loss)


@pytest.mark.parametrize("how", COPIES)
@pytest.mark.parametrize("fused", [False, True], ids=["sgd", "fused-adamw"])
@pytest.mark.parametrize("config", list(COPY_CONFIGS))
def test_a_copy_with_its_model_trains_on_exactly_like_the_original(config, fused, how):
    model = make_model()
    optimizer = (torch.optim.AdamW(model.parameters(), lr=0.05, fused=True) if fused
                 else sgd(model, momentum=0.9))
    wrapper = OptimWrapper(optimizer, **COPY_CONFIGS[config])
    wrapper.initialize_count_status(model, 0, 30)
    guarded = wrapper.clip_grad_kwargs is not None
    train_micro_batches(wrapper, model, range(6), inf_at=3 if guarded else -1)

    model2, wrapper2 = copied((model, wrapper), how)
    assert wrapper2.optimizer is not optimizer
    assert {id(p) for g in wrapper2.param_groups for p in g["params"]} == {id(p) for p in model2.parameters()}
    for w, m in ((wrapper, model), (wrapper2, model2)):
        train_micro_batches(w, m, range(6, 12), inf_at=9 if guarded else -1)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, p2)
    assert_same(wrapper2.state_dict(), wrapper.state_dict())
    assert_same(wrapper2.skipped_steps, wrapper.skipped_steps)
    assert_same(wrapper2.zeroed_steps, wrapper.zeroed_steps)
    assert_same(wrapper2.last_grad_norm, wrapper.last_grad_norm)
    if guarded:  # the two inf updates: skipped by the fused optimizer, zeroed by SGD
        assert float(wrapper2.skipped_steps if fused else wrapper2.zeroed_steps) == 2.0


@pytest.mark.parametrize("how", COPIES)
def test_a_copy_with_num_items_trains_on_exactly_like_the_original(how):
    def train(w: OptimWrapper, m: nn.Module, seeds: range) -> None:
        for seed in seeds:
            with w.optim_context(m):
                loss = loss_of(m, seed) * (seed % 3 + 1)
            w.update_params(loss, num_items=seed % 3 + 1)

    model = make_model()
    wrapper = OptimWrapper(sgd(model, momentum=0.9), accumulative_counts=2, clip_grad=dict(max_norm=1.0))
    wrapper.initialize_count_status(model, 0, 20)
    train(wrapper, model, range(4))
    assert wrapper.skipped_steps is not None and wrapper.last_loss is not None  # builds the mirror
    model2, wrapper2 = copied((model, wrapper), how)
    assert wrapper2._items.reduction is None and wrapper2._items._empty_mirror is None
    train(wrapper, model, range(4, 8))
    train(wrapper2, model2, range(4, 8))
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, p2)
    assert torch.equal(wrapper2.last_loss, wrapper.last_loss)


@pytest.mark.parametrize("how", COPIES)
@pytest.mark.parametrize("num_items", [False, True], ids=["mean-loss", "num_items"])
def test_a_copy_made_inside_a_window_carries_the_window_s_gradients(num_items, how):
    """torch's Parameter drops .grad when copied; the wrapper copies the window's gradients
    with its counters, so the copy's next update covers the earlier micro-batches too."""
    def train(w: OptimWrapper, m: nn.Module, seeds: range) -> None:
        for seed in seeds:
            with w.optim_context(m):
                loss = loss_of(m, seed)
            if num_items:
                w.update_params(loss * (seed % 3 + 1), num_items=seed % 3 + 1)
            else:
                w.update_params(loss)

    model = make_model()
    wrapper = OptimWrapper(sgd(model, momentum=0.9), accumulative_counts=3, clip_grad=dict(max_norm=1.0))
    wrapper.initialize_count_status(model, 0, 9)
    train(wrapper, model, range(5))  # inside the second window
    model2, wrapper2 = copied((model, wrapper), how)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert p2.grad is not None and p2.grad is not p.grad and torch.equal(p2.grad, p.grad)
    train(wrapper, model, range(5, 9))
    train(wrapper2, model2, range(5, 9))
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, p2)
    assert_same(wrapper2.state_dict(), wrapper.state_dict())


def test_a_copy_holds_no_model_and_binds_the_one_it_is_given():
    class OwnClip(nn.Module):  # like FSDP1: the module clips its own (sharded) gradients
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 1)
            self.clipped = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x)

        def clip_grad_norm_(self, max_norm: float, norm_type: float) -> torch.Tensor:
            self.clipped += 1
            return torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm, norm_type)

    model = OwnClip()
    wrapper = OptimWrapper(sgd(model), clip_grad=dict(max_norm=1.0))
    wrapper.initialize_count_status(model, 0, 10)
    alone = copy.deepcopy(wrapper)
    assert alone._binding.model is None and not any(isinstance(v, nn.Module) for v in vars(alone._binding).values())
    model2, wrapper2 = copy.deepcopy((model, wrapper))
    with wrapper2.optim_context(model2):
        loss = model2(torch.ones(2, 4)).sum()
    wrapper2.update_params(loss)
    assert (model.clipped, model2.clipped) == (0, 1)  # the copy clips through its own model


@pytest.mark.parametrize("how", COPIES)
def test_a_copy_taken_between_a_forward_and_its_backward_leaves_the_skip_with_the_original(how):
    model = RecordingDDP()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=2)
    wrapper.initialize_count_status(model, 0, 4)
    with wrapper.optim_context(model):
        loss = model(torch.ones(1, 2)).sum()
    assert model.syncing is False and wrapper._binding.pending is not None  # a generator context
    model2, wrapper2 = copied((model, wrapper), how)
    assert wrapper2._binding.pending is None and wrapper2._binding.model is None
    wrapper.update_params(loss)
    assert model.backward_sync == [False] and model.syncing is True
    model2.syncing = True  # the copied module's own flag was copied mid-skip
    before = params_of(model2)
    assert wrapper2.inner_count == 0  # the copied micro-batch's backward is the original's
    run_micro_batches(wrapper2, model2, 3, "mmengine")
    assert wrapper2._binding.model is model2 and wrapper2.inner_count == 3 and model2.syncing is True
    assert not any(torch.equal(a, b) for a, b in zip(before, params_of(model2)))

