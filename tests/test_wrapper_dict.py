"""OptimWrapperDict: mmengine's checklist, plus the members mmengine leaves broken."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import COPIES, assert_same, copied
from torch import nn

from hwoptim import AmpOptimWrapper, OptimWrapper, OptimWrapperDict


class GAN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.generator = nn.Linear(2, 2)
        self.discriminator = nn.Linear(2, 1)


def make() -> tuple[GAN, OptimWrapperDict, OptimWrapper, OptimWrapper]:
    model = GAN()
    g = OptimWrapper(torch.optim.SGD(model.generator.parameters(), lr=0.1, momentum=0.8))
    d = OptimWrapper(torch.optim.SGD(model.discriminator.parameters(), lr=0.2, momentum=0.9))
    return model, OptimWrapperDict(generator=g, discriminator=d), g, d


def test_holds_the_wrappers():
    _, wrappers, g, d = make()
    assert wrappers.optim_wrappers == {"generator": g, "discriminator": d}


def test_only_accepts_optim_wrappers():
    with pytest.raises(TypeError, match="only accepts OptimWrapper instances, but got g: SGD"):
        OptimWrapperDict(g=torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1))


@pytest.mark.parametrize("method", ["update_params", "backward"])
def test_loss_methods_say_to_call_the_named_wrapper(method):
    _, wrappers, _, _ = make()
    with pytest.raises(NotImplementedError, match=rf"`{method}` should be called by each optimizer.*'generator'"):
        getattr(wrappers, method)(torch.tensor(1.0))


@pytest.mark.parametrize("method", ["step", "should_update", "should_sync"])
def test_step_methods_say_to_call_the_named_wrapper(method):
    _, wrappers, _, _ = make()
    with pytest.raises(NotImplementedError, match=f"`{method}` should be called"):
        getattr(wrappers, method)()


def test_optim_context_says_to_call_the_named_wrapper():
    model, wrappers, _, _ = make()
    with pytest.raises(NotImplementedError, match="`optim_context` should be called"), wrappers.optim_context(model):
        pass


def test_zero_grad_zeroes_every_wrapper_and_forwards_kwargs():
    model, wrappers, _, _ = make()
    (model.generator(torch.ones(1, 2)).sum() + model.discriminator(torch.ones(1, 2)).sum()).backward()
    wrappers.zero_grad(set_to_none=False)
    assert all(float(p.grad.abs().sum()) == 0 for p in model.parameters())
    wrappers.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_initialize_count_status_reaches_every_wrapper_with_its_submodule():
    model = GAN()
    g = OptimWrapper(torch.optim.SGD(model.generator.parameters(), lr=0.1), accumulative_counts=2)
    d = OptimWrapper(torch.optim.SGD(model.discriminator.parameters(), lr=0.1), accumulative_counts=3)
    wrappers = OptimWrapperDict(generator=g, discriminator=d)
    wrappers.initialize_count_status(model, 0, 10)
    assert (g._window.max_counts, g._window.remainder, d._window.remainder) == (10, 0, 1)
    assert g._binding.model is model.generator and d._binding.model is model.discriminator
    assert wrappers.inner_count == {"generator": 0, "discriminator": 0}


def test_per_name_views():
    _, wrappers, g, d = make()
    assert wrappers.param_groups == {"generator": g.param_groups, "discriminator": d.param_groups}
    assert wrappers.defaults["discriminator"]["lr"] == 0.2
    assert wrappers.get_lr() == {"generator.lr": [0.1], "discriminator.lr": [0.2]}
    assert wrappers.get_momentum() == {"generator.momentum": [0.8], "discriminator.momentum": [0.9]}
    assert wrappers.last_grad_norm == {"generator": None, "discriminator": None}
    assert wrappers.skipped_steps == wrappers.zeroed_steps == {"generator": None, "discriminator": None}


def test_counts_clipping_and_scaling_are_per_name_views():
    model = GAN()
    g = OptimWrapper(torch.optim.SGD(model.generator.parameters(), lr=0.1), accumulative_counts=3)
    d = AmpOptimWrapper(torch.optim.SGD(model.discriminator.parameters(), lr=0.2), device="cpu",
                        dtype="float16", loss_scale={"init_scale": 64.0}, clip_grad=dict(max_norm=1.0))
    wrappers = OptimWrapperDict(generator=g, discriminator=d)
    d.update_params(model.discriminator(torch.ones(1, 2)).sum())
    assert wrappers.accumulative_counts == {"generator": 3, "discriminator": 1}
    assert wrappers.clip_grad_kwargs == {"generator": None, "discriminator": {"max_norm": 1.0, "norm_type": 2.0}}
    assert wrappers.loss_scaler == {"generator": None, "discriminator": d.loss_scaler}
    scales = wrappers.loss_scale
    assert scales["generator"] is None and float(scales["discriminator"]) == 64.0


def test_the_single_optimizer_says_to_use_the_named_wrappers():
    _, wrappers, _, _ = make()
    message = r"no single optimizer: use wrappers\[name\]\.optimizer with name in 'generator', 'discriminator'"
    with pytest.raises(AttributeError, match=message):
        wrappers.optimizer  # noqa: B018
    assert not hasattr(wrappers, "optimizer")


def test_every_public_member_of_optim_wrapper_is_a_per_name_view_or_says_what_to_call():
    model, wrappers, g, _ = make()
    wrappers["generator"].update_params(model.generator(torch.ones(1, 2)).sum())
    members = sorted(name for name in dir(g) if not name.startswith("_"))
    assert {"accumulative_counts", "loss_scale", "optimizer", "update_params"} <= set(members)
    for name in members:
        assert name in vars(OptimWrapperDict), f"OptimWrapperDict inherits {name!r} unchanged"
        if callable(getattr(type(g), name, None)):
            continue  # methods: overridden (checked above) and tested one by one elsewhere
        if name == "base_param_settings":  # a constant, None on every wrapper (mmengine reads it)
            assert wrappers.base_param_settings is None
            continue
        try:
            value = getattr(wrappers, name)
        except (AttributeError, NotImplementedError) as exc:
            assert "wrappers[name]" in str(exc), f"{name}: {exc}"
        else:
            assert isinstance(value, dict) and list(value) == ["generator", "discriminator"], name


def test_state_dict_per_name_and_round_trip():
    model, wrappers, g, d = make()
    wrappers["generator"].update_params(model.generator(torch.ones(1, 2)).sum())
    state = wrappers.state_dict()
    assert_same(state, {"generator": g.state_dict(), "discriminator": d.state_dict()})
    _, fresh, _, _ = make()
    frozen = copy.deepcopy(state)
    fresh.load_state_dict(state)
    assert_same(fresh.state_dict(), state)
    assert_same(state, frozen)


def test_a_partial_or_unknown_load_raises_before_loading_anything():
    _, wrappers, _, _ = make()
    state = wrappers.state_dict()
    _, fresh, fresh_g, _ = make()
    fresh_g.optimizer.param_groups[0]["lr"] = 0.5
    with pytest.raises(ValueError, match=r"missing name\(s\) \['discriminator'\]"):
        fresh.load_state_dict({"generator": state["generator"]})
    with pytest.raises(ValueError, match=r"unknown name\(s\) \['critic'\]"):
        fresh.load_state_dict({**state, "critic": state["generator"]})
    broken = {**state, "discriminator": {"state": {}}}
    with pytest.raises(ValueError, match="no 'param_groups'"):
        fresh.load_state_dict(broken)
    assert fresh_g.get_lr() == {"lr": [0.5]}  # the generator was not loaded either


def test_a_bad_scaler_value_in_one_member_loads_no_member():
    def fp16_pair(lr: float) -> tuple[GAN, OptimWrapperDict]:
        model = GAN()
        return model, OptimWrapperDict(
            generator=OptimWrapper(torch.optim.SGD(model.generator.parameters(), lr=lr)),
            discriminator=AmpOptimWrapper(torch.optim.SGD(model.discriminator.parameters(), lr=lr),
                                          device="cpu", dtype="float16", loss_scale={"init_scale": 8.0}),
        )

    _, source = fp16_pair(0.5)
    state = source.state_dict()
    state["discriminator"]["loss_scaler"]["scale"] = float("nan")
    _, target = fp16_pair(0.1)
    with pytest.raises(ValueError, match=r"loss_scaler\['scale'\] must be a positive finite number; got nan"):
        target.load_state_dict(state)
    assert target.get_lr() == {"generator.lr": [0.1], "discriminator.lr": [0.1]}
    assert target["discriminator"].loss_scaler.state_dict()["scale"] == 8.0


def test_mapping_protocol():
    _, wrappers, g, d = make()
    assert list(wrappers.items()) == [("generator", g), ("discriminator", d)]
    assert list(wrappers.values()) == [g, d]
    assert list(wrappers.keys()) == ["generator", "discriminator"] == list(wrappers)
    assert wrappers["generator"] is g
    assert len(wrappers) == 2 and "discriminator" in wrappers and "critic" not in wrappers
    with pytest.raises(KeyError, match="Cannot find 'critic'"):
        wrappers["critic"]


def test_repr_names_each_wrapper():
    _, wrappers, _, _ = make()
    text = repr(wrappers)
    assert "name: generator" in text and "name: discriminator" in text


def test_wrappers_of_different_kinds_train_independently():
    model = GAN()
    g = AmpOptimWrapper(torch.optim.SGD(model.generator.parameters(), lr=0.1), device="cpu", dtype="bfloat16")
    d = OptimWrapper(torch.optim.SGD(model.discriminator.parameters(), lr=0.1), accumulative_counts=2)
    wrappers = OptimWrapperDict(generator=g, discriminator=d)
    wrappers.initialize_count_status(model, 0, 4)
    before = model.discriminator.weight.detach().clone()
    with wrappers["generator"].optim_context(model.generator):
        fake = model.generator(torch.ones(3, 2))
    wrappers["generator"].update_params(fake.float().pow(2).mean())
    with wrappers["discriminator"].optim_context(model.discriminator):
        d_loss = model.discriminator(fake.detach().float()).mean()
    wrappers["discriminator"].update_params(d_loss)
    assert torch.equal(model.discriminator.weight, before)  # accumulating, not stepped yet
    assert wrappers.inner_count == {"generator": 1, "discriminator": 1}


@pytest.mark.parametrize("how", COPIES)
def test_a_copy_with_its_model_trains_on_exactly_like_the_original(how):
    def train(wrappers: OptimWrapperDict, model: GAN, seeds: range) -> None:
        for seed in seeds:
            x = torch.randn(4, 2, generator=torch.Generator().manual_seed(seed))
            for name in ("generator", "discriminator"):
                part = getattr(model, name)
                with wrappers[name].optim_context(part):
                    loss = part(x).pow(2).mean()
                wrappers[name].update_params(loss * float("inf") if seed == 5 else loss)

    model = GAN()
    wrappers = OptimWrapperDict(
        generator=OptimWrapper(torch.optim.SGD(model.generator.parameters(), lr=0.1, momentum=0.9),
                               accumulative_counts=2, clip_grad=dict(max_norm=0.5)),
        discriminator=AmpOptimWrapper(torch.optim.AdamW(model.discriminator.parameters(), lr=0.1),
                                      device="cpu", dtype="float16", clip_grad=dict(max_norm=0.5)),
    )
    wrappers.initialize_count_status(model, 0, 20)
    train(wrappers, model, range(4))
    model2, wrappers2 = copied((model, wrappers), how)
    assert list(wrappers2) == ["generator", "discriminator"]
    train(wrappers, model, range(4, 8))
    train(wrappers2, model2, range(4, 8))
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, p2)
    assert_same(wrappers2.state_dict(), wrappers.state_dict())
    assert_same(wrappers2.skipped_steps, wrappers.skipped_steps)
    assert float(wrappers2.skipped_steps["discriminator"]) >= 1.0  # the inf step at least

