"""Per-group gradient norms (``last_grad_norms``), the groups of the last bad update
(``nonfinite_groups``) and opt-in per-group clipping (issue 19, part 2).

The mixed-mesh layouts run for real in tests/test_grad_norm_dist.py; the Runner's logging
in tests/test_mmengine.py; the emulated device's host reads in tests/emulated/.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from test_host_sync import HostSyncDetector
from torch import nn
from torch._dynamo.utils import counters

import hwoptim
from hwoptim.clip import ClipGrad


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))


def _groups(model: nn.Sequential, names: tuple[Any, ...] = ("in", "mid", "out")) -> list[dict[str, Any]]:
    """One param group per Linear; ``None`` leaves that group unnamed (its index names it)."""
    groups = []
    for layer, name in zip((model[0], model[2], model[4]), names):
        group: dict[str, Any] = {"params": list(layer.parameters())}
        if name is not None:
            group["name"] = name
        groups.append(group)
    return groups


def _sgd(model: nn.Sequential, names: tuple[Any, ...] = ("in", "mid", "out"), **kw: Any) -> torch.optim.SGD:
    return torch.optim.SGD(_groups(model, names), lr=0.1, **kw)


def _backward(model: nn.Module, wrapper: hwoptim.OptimWrapper, seed: int = 0, scale: float = 1.0) -> None:
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(seed))
    with wrapper.optim_context(model):
        loss = model(x).float().square().mean() * scale
    wrapper.backward(loss)


def _norms_by_hand(model: nn.Sequential) -> dict[str, torch.Tensor]:
    """Each layer's gradient norm over its weight and bias, in float64."""
    return {
        name: torch.linalg.vector_norm(torch.cat([p.grad.double().flatten() for p in layer.parameters()]))
        for name, layer in zip(("in", "mid", "out"), (model[0], model[2], model[4]))
    }


def _read(mapping: dict[Any, torch.Tensor]) -> dict[Any, Any]:
    return {name: value.item() for name, value in mapping.items()}


# -- last_grad_norms --------------------------------------------------------------------------


def test_last_grad_norms_are_each_named_groups_norm_before_clipping_and_the_total_their_norm():
    model = _model()
    wrapper = hwoptim.OptimWrapper(_sgd(model), clip_grad=dict(max_norm=1e-3))
    _backward(model, wrapper)
    want = _norms_by_hand(model)  # before the step clips the gradients
    wrapper.step()
    got = wrapper.last_grad_norms
    assert list(got) == ["in", "mid", "out"]
    assert all(t.shape == () and t.device == torch.device("cpu") for t in got.values())
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-6, atol=0)
    total = torch.linalg.vector_norm(torch.stack(list(want.values())))
    torch.testing.assert_close(wrapper.last_grad_norm.double(), total, rtol=1e-6, atol=0)
    # the gradients were clipped by the total: the per-group norms are from before that
    assert all(_norms_by_hand(model)[n] < want[n] for n in want)


def test_a_group_without_a_name_is_named_by_its_index_and_groups_sharing_a_name_are_one():
    model = _model()
    wrapper = hwoptim.OptimWrapper(_sgd(model, ("body", None, "body")), clip_grad=dict(max_norm=math.inf))
    _backward(model, wrapper)
    want = _norms_by_hand(model)
    wrapper.step()
    got = wrapper.last_grad_norms
    assert list(got) == ["body", 1]
    torch.testing.assert_close(got[1].double(), want["mid"], rtol=1e-6, atol=0)
    body = torch.linalg.vector_norm(torch.stack([want["in"], want["out"]]))
    torch.testing.assert_close(got["body"].double(), body, rtol=1e-6, atol=0)


def test_one_group_is_the_total_norm_itself():
    model = _model()
    wrapper = hwoptim.OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), clip_grad=dict(max_norm=1.0))
    _backward(model, wrapper)
    wrapper.step()
    assert list(wrapper.last_grad_norms) == [0]
    assert torch.equal(wrapper.last_grad_norms[0], wrapper.last_grad_norm)


def test_before_the_first_update_and_without_clipping_there_are_no_group_norms():
    model = _model()
    clipped = hwoptim.OptimWrapper(_sgd(model), clip_grad=dict(max_norm=1.0))
    plain = hwoptim.OptimWrapper(_sgd(model))
    assert clipped.last_grad_norms == {} and clipped.nonfinite_groups == {}
    _backward(model, plain)
    plain.step()
    assert plain.last_grad_norms == {} and plain.nonfinite_groups == {}


def test_the_groups_norms_take_no_second_pass_over_the_gradients(monkeypatch):
    model = _model()
    wrapper = hwoptim.OptimWrapper(_sgd(model), clip_grad=dict(max_norm=1.0))
    calls = []
    norm = torch._foreach_norm

    def counting(tensors: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(tensors))
        return norm(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_norm", counting)
    _backward(model, wrapper)
    wrapper.step()
    assert calls == [6]  # one kernel over the six gradients, for the total and every group


def test_the_total_is_torch_get_total_norm_bit_for_bit_however_the_params_are_grouped():
    if not hasattr(torch.nn.utils, "get_total_norm"):
        pytest.skip("torch before 2.6 has no get_total_norm")
    model = _model()
    wrapper = hwoptim.OptimWrapper(_sgd(model), clip_grad=dict(max_norm=math.inf))
    _backward(model, wrapper)
    want = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    wrapper.step()
    assert torch.equal(wrapper.last_grad_norm, want)


def test_reading_nothing_the_update_computes_no_group_norm_on_the_host():
    model = _model()
    wrapper = hwoptim.OptimWrapper(_sgd(model), accumulative_counts=2,
                                   clip_grad=dict(max_norm=1.0, per_group=True))
    wrapper.initialize_count_status(model, 0, 6)
    detector = HostSyncDetector()
    for step in range(6):
        x = torch.randn(5, 4)
        if step == 3:
            x[0, 0] = math.inf
        with detector:
            with wrapper.optim_context(model):
                loss = model(x).square().mean()
            wrapper.update_params(loss)
            wrapper.last_grad_norms  # noqa: B018 - views only: no read
            wrapper.nonfinite_groups  # noqa: B018
    assert detector.by("hwoptim") == []
    # the inf input reaches the first layer's gradients only (tanh bounds what follows)
    assert _read(wrapper.nonfinite_groups) == {"in": True, "mid": False, "out": False}


# -- nonfinite_groups -----------------------------------------------------------------------


def _poison(model: nn.Sequential, layer: int) -> None:
    model[layer].weight.grad[0, 0] = math.inf


WRAPPERS = {
    "zero": lambda m: hwoptim.OptimWrapper(_sgd(m, momentum=0.9), clip_grad=dict(max_norm=1.0)),
    "exact": lambda m: hwoptim.OptimWrapper(_sgd(m, momentum=0.9), clip_grad=dict(max_norm=1.0), exact_skip=True),
    "fused": lambda m: hwoptim.OptimWrapper(_sgd(m, fused=True), clip_grad=dict(max_norm=1.0)),
    "per-group": lambda m: hwoptim.OptimWrapper(_sgd(m), clip_grad=dict(max_norm=1.0, per_group=True)),
    "value": lambda m: hwoptim.OptimWrapper(_sgd(m), clip_grad=dict(type="value", clip_value=0.1)),
    "fp16-scaler": lambda m: hwoptim.AmpOptimWrapper(
        _sgd(m), device="cpu", dtype="float16", loss_scale=64.0, clip_grad=dict(max_norm=1.0)),
}


@pytest.mark.parametrize("kind", list(WRAPPERS))
def test_nonfinite_groups_name_the_groups_of_the_last_bad_update_and_survive_good_ones(kind):
    model = _model()
    wrapper = WRAPPERS[kind](model)
    _backward(model, wrapper, seed=0)
    wrapper.step()
    assert _read(wrapper.nonfinite_groups) == {"in": False, "mid": False, "out": False}

    wrapper.zero_grad()
    _backward(model, wrapper, seed=1)
    _poison(model, 2)
    wrapper.step()
    assert _read(wrapper.nonfinite_groups) == {"in": False, "mid": True, "out": False}
    assert wrapper.last_grad_norms["mid"].item() == math.inf
    assert math.isfinite(wrapper.last_grad_norms["in"].item())

    wrapper.zero_grad()
    _backward(model, wrapper, seed=2)  # a good update: the flags stay those of the bad one
    wrapper.step()
    assert _read(wrapper.nonfinite_groups) == {"in": False, "mid": True, "out": False}

    wrapper.zero_grad()
    _backward(model, wrapper, seed=3)
    _poison(model, 0)
    _poison(model, 4)
    wrapper.step()
    assert _read(wrapper.nonfinite_groups) == {"in": True, "mid": False, "out": True}
    bad = float(wrapper.skipped_steps) + float(wrapper.zeroed_steps)
    assert bad == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_groups_are_one_fold_of_many_updates():
    from hwoptim import _skips

    model = _model()
    wrapper = hwoptim.OptimWrapper(_sgd(model), clip_grad=dict(max_norm=1.0))
    for step in range(_skips.FOLD_EVERY + 3):  # a fold in between, and a pending tail
        wrapper.zero_grad()
        _backward(model, wrapper, seed=step)
        if step in (5, _skips.FOLD_EVERY + 1):
            _poison(model, 4 if step == 5 else 0)
        wrapper.step()
        if step == _skips.FOLD_EVERY - 1:
            assert _read(wrapper.nonfinite_groups) == {"in": False, "mid": False, "out": True}
    assert _read(wrapper.nonfinite_groups) == {"in": True, "mid": False, "out": False}


def test_a_copied_wrapper_keeps_its_group_norms_and_flags():
    model = _model()
    wrapper = hwoptim.OptimWrapper(_sgd(model), clip_grad=dict(max_norm=1.0))
    _backward(model, wrapper)
    _poison(model, 4)
    wrapper.step()
    model2, wrapper2 = copy.deepcopy((model, wrapper))
    assert _read(wrapper2.nonfinite_groups) == _read(wrapper.nonfinite_groups)
    assert list(wrapper2.last_grad_norms) == ["in", "mid", "out"]
    wrapper2.zero_grad()
    _backward(model2, wrapper2, seed=4)
    wrapper2.step()
    assert list(wrapper2.last_grad_norms) == ["in", "mid", "out"]


def test_groups_added_later_are_measured_from_the_next_update():
    model = _model()
    opt = torch.optim.SGD(_groups(model)[:2], lr=0.1)
    wrapper = hwoptim.OptimWrapper(opt, clip_grad=dict(max_norm=1.0))
    _backward(model, wrapper)
    _poison(model, 0)
    wrapper.step()
    assert _read(wrapper.nonfinite_groups) == {"in": True, "mid": False}
    opt.add_param_group(dict(params=list(model[4].parameters()), name="out"))
    wrapper.zero_grad()
    _backward(model, wrapper, seed=1)
    wrapper.step()
    assert list(wrapper.last_grad_norms) == ["in", "mid", "out"]
    assert _read(wrapper.nonfinite_groups) == {"in": False, "mid": False, "out": False}


# -- per-group clipping ---------------------------------------------------------------------


def test_per_group_clipping_clips_each_group_by_its_own_norm_as_torch_would_alone():
    model, ref = _model(), _model()
    wrapper = hwoptim.OptimWrapper(_sgd(model), clip_grad=dict(max_norm=0.05, per_group=True))
    _backward(model, wrapper)
    for p, q in zip(model.parameters(), ref.parameters()):
        q.grad = p.grad.clone()
    before = _norms_by_hand(model)
    total_before = torch.linalg.vector_norm(torch.stack(list(before.values())))
    wrapper._guard.update(wrapper._binding.params(), None, {})  # clip and step, nothing else
    for layer in (0, 2, 4):
        torch.nn.utils.clip_grad_norm_(list(ref[layer].parameters()), 0.05)
        for p, q in zip(model[layer].parameters(), ref[layer].parameters()):
            torch.testing.assert_close(p.grad, q.grad)
    after = _norms_by_hand(model)  # "in" is below max_norm: untouched; the others clipped to it
    assert before["in"] < 0.05 < min(before["mid"], before["out"])
    assert {n: round(v.item(), 4) for n, v in after.items()} == {"in": round(before["in"].item(), 4),
                                                                "mid": 0.05, "out": 0.05}
    torch.testing.assert_close(wrapper.last_grad_norm.double(), total_before, rtol=1e-6, atol=0)


def test_per_group_max_norms_by_name_leave_a_group_they_do_not_name_unclipped():
    model = _model()
    wrapper = hwoptim.OptimWrapper(_sgd(model), clip_grad=dict(max_norm={"in": 0.01, "out": 0.02}))
    _backward(model, wrapper)
    before = _norms_by_hand(model)
    wrapper.step()
    after = _norms_by_hand(model)
    assert after["in"].item() == pytest.approx(0.01, rel=1e-3)
    assert after["out"].item() == pytest.approx(0.02, rel=1e-3)
    torch.testing.assert_close(after["mid"], before["mid"])
    assert wrapper.clip_grad_kwargs == {"max_norm": {"in": 0.01, "out": 0.02}, "norm_type": 2.0, "per_group": True}


def test_per_group_clipping_by_index_and_inf_norm_type():
    model = _model()
    wrapper = hwoptim.OptimWrapper(_sgd(model, (None, None, None)),
                                   clip_grad=dict(max_norm={1: 1e-3}, norm_type="inf"))
    _backward(model, wrapper)
    wrapper.step()
    assert list(wrapper.last_grad_norms) == [0, 1, 2]
    assert max(p.grad.abs().max().item() for p in model[2].parameters()) == pytest.approx(1e-3, rel=1e-3)


def test_a_bad_update_with_per_group_clipping_steps_with_all_gradients_zeroed():
    model = _model()
    wrapper = hwoptim.OptimWrapper(_sgd(model), clip_grad=dict(max_norm=1.0, per_group=True))
    before = [p.detach().clone() for p in model.parameters()]
    _backward(model, wrapper)
    _poison(model, 4)
    wrapper.step()  # plain SGD: a zeroed step moves nothing, the finite groups included
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert float(wrapper.zeroed_steps) == 1


@pytest.mark.parametrize(
    ("clip_grad", "error", "message"),
    [
        (dict(max_norm=1.0, per_group=1), TypeError, "clip_grad 'norm': per_group must be True or False; got 1"),
        (dict(max_norm={"in": 1.0, "head": 2.0}), ValueError,
         r"clip_grad max_norm names the param group\(s\) \['head'\], which the optimizer does not have; "
         r"its groups are \['in', 'mid', 'out'\]"),
        (dict(max_norm={"in": 0.0}), ValueError, r"clip_grad 'norm': max_norm\['in'\] must be a positive number"),
        (dict(max_norm={"in": -1}), ValueError, r"max_norm\['in'\] must be a positive"),
        (dict(max_norm={}), ValueError, "clip_grad max_norm is an empty dict"),
        (dict(max_norm={"in": 1.0}, per_group=False), ValueError, "max_norm is a dict of per-group values, "
         "but per_group=False"),
        (dict(max_norm={True: 1.0}), TypeError, "clip_grad max_norm keys must be param group names"),
        (dict(type="value", clip_value=1.0, per_group=True), ValueError,
         "clip_grad type 'value' does not take 'per_group'"),
    ],
)
def test_bad_per_group_configs_are_refused_at_construction(clip_grad, error, message):
    model = _model()
    opt = _sgd(model)
    with pytest.raises(error, match=message):
        hwoptim.OptimWrapper(opt, clip_grad=clip_grad)
    assert opt.state == {} and all(p.grad is None for p in model.parameters())


def test_a_group_name_that_cannot_be_a_key_is_refused_at_construction():
    model = _model()
    opt = torch.optim.SGD([dict(params=model.parameters(), name=["a"])], lr=0.1)
    with pytest.raises(TypeError, match=r"param group names must be str or int .* got list"):
        hwoptim.OptimWrapper(opt, clip_grad=dict(max_norm=1.0))
    hwoptim.OptimWrapper(opt)  # without clip_grad no norm is named: nothing to refuse


def test_per_group_clipping_of_a_module_that_clips_itself_is_refused_when_it_is_bound():
    class OwnClip(nn.Linear):
        def clip_grad_norm_(self, max_norm: float, norm_type: float) -> torch.Tensor:
            return torch.tensor(1.0)

    model = OwnClip(2, 2)
    wrapper = hwoptim.OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1),
                                   clip_grad=dict(max_norm=1.0, per_group=True))
    with pytest.raises(ValueError, match="per_group=True cannot clip OwnClip: it clips through its own"):
        with wrapper.optim_context(model):
            pass


def test_a_per_group_config_pickles_and_reads_back():
    clip = ClipGrad(dict(max_norm={"a": 1.0, 3: 2.0}))
    assert clip.per_group and clip.group_max_norms == {"a": 1.0, 3: 2.0}
    assert repr(clip) == "dict(type='norm', max_norm={'a': 1.0, 3: 2.0}, norm_type=2.0, per_group=True)"


# -- AMP, compile_step, OptimWrapperDict -------------------------------------------------------


def test_under_a_loss_scaler_the_group_norms_are_unscaled():
    model = _model()
    wrapper = hwoptim.AmpOptimWrapper(_sgd(model), device="cpu", dtype="float16", loss_scale=1024.0,
                                      clip_grad=dict(max_norm=math.inf))
    _backward(model, wrapper)
    wrapper.step()  # unscaled in place, not clipped (max_norm inf): the grads are the truth
    want = _norms_by_hand(model)
    got = wrapper.last_grad_norms
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-3, atol=0)


@pytest.mark.parametrize("per_group", [False, True])
def test_compile_step_gives_the_eager_group_norms_and_flags_without_recompiling(per_group):
    torch._dynamo.reset()
    counters.clear()
    runs = {}
    for compiled in (False, True):
        model = _model()
        wrapper = hwoptim.OptimWrapper(
            _sgd(model), clip_grad=dict(max_norm=0.5, per_group=per_group),
            compile_step=dict(backend="eager") if compiled else False,
        )
        seen = []
        for step in range(5):
            wrapper.zero_grad()
            _backward(model, wrapper, seed=step)
            if step == 2:
                _poison(model, 2)
            wrapper.step()
            seen.append((torch.stack(list(wrapper.last_grad_norms.values())).clone(),
                         torch.stack(list(wrapper.nonfinite_groups.values())).clone()))
            if compiled and step == 0:
                graphs = int(counters["stats"]["unique_graphs"])
        runs[compiled] = (seen, [p.detach().clone() for p in model.parameters()])
        if compiled:
            assert wrapper._guard.compiled is not None and wrapper._guard.compiled.compiled
            assert int(counters["stats"]["unique_graphs"]) == graphs, "recompiled after the first update"
    for (norms_e, flags_e), (norms_c, flags_c) in zip(runs[False][0], runs[True][0]):
        torch.testing.assert_close(norms_c, norms_e, equal_nan=True)
        assert torch.equal(flags_c, flags_e)
    assert runs[True][0][-1][1].tolist() == [False, True, False]
    for a, b in zip(runs[False][1], runs[True][1]):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()


def test_optim_wrapper_dict_gives_each_wrappers_group_norms_and_flags():
    gen, disc = _model(), _model()
    wrappers = hwoptim.OptimWrapperDict(
        generator=hwoptim.OptimWrapper(_sgd(gen), clip_grad=dict(max_norm=1.0)),
        discriminator=hwoptim.OptimWrapper(torch.optim.SGD(disc.parameters(), lr=0.1)),
    )
    _backward(gen, wrappers["generator"])
    _poison(gen, 0)
    wrappers["generator"].step()
    assert list(wrappers.last_grad_norms["generator"]) == ["in", "mid", "out"]
    assert wrappers.last_grad_norms["discriminator"] == {}
    assert _read(wrappers.nonfinite_groups["generator"]) == {"in": True, "mid": False, "out": False}
    assert wrappers.nonfinite_groups["discriminator"] == {}
