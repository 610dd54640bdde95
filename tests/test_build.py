"""build_optim_wrapper: mmengine's config shape, checked against mmengine itself."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_same
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.optim import OptimWrapper as MMOptimWrapper
from torch import nn

from hwoptim import AmpOptimWrapper, OptimWrapper, OptimWrapperDict, build_optim_wrapper
from hwoptim.build import resolve_optimizer_type


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, groups=4))
        self.neck = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.weight.requires_grad_(False)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.neck(self.backbone(x).mean((2, 3)) * self.scale))


def test_default_is_an_optim_wrapper_with_one_group():
    model = Net()
    wrapper = build_optim_wrapper(model, dict(optimizer=dict(type="SGD", lr=0.1, momentum=0.9)))
    assert type(wrapper) is OptimWrapper
    assert isinstance(wrapper.optimizer, torch.optim.SGD) and len(wrapper.param_groups) == 1
    assert wrapper.get_momentum() == {"momentum": [0.9]}


def test_amp_wrapper_with_every_option():
    wrapper = build_optim_wrapper(Net(), dict(
        type="AmpOptimWrapper", device="cpu", dtype="float16", loss_scale=256,
        optimizer=dict(type="AdamW", lr=1e-3), clip_grad=dict(max_norm=1.0), accumulative_counts=4))
    assert isinstance(wrapper, AmpOptimWrapper)
    assert wrapper.cast_dtype is torch.float16 and wrapper._precision.fixed_scale == 256.0
    assert wrapper.clip_grad_kwargs == {"max_norm": 1.0, "norm_type": 2.0}
    assert wrapper.accumulative_counts == 4


def test_config_is_not_modified():
    cfg = dict(type="OptimWrapper", optimizer=dict(type="SGD", lr=0.1), clip_grad=dict(type="norm", max_norm=1),
               paramwise_cfg=dict(custom_keys={"head": dict(lr_mult=0.1)}))
    frozen = copy.deepcopy(cfg)
    build_optim_wrapper(Net(), cfg)
    build_optim_wrapper(Net(), cfg)
    assert cfg == frozen


@pytest.mark.parametrize("spec", [torch.optim.Adam, "Adam", "torch.optim:Adam"])
def test_optimizer_type_forms(spec):
    wrapper = build_optim_wrapper(Net(), dict(optimizer=dict(type=spec, lr=0.01)))
    assert type(wrapper.optimizer) is torch.optim.Adam


def test_wrapper_type_forms():
    cfg = dict(optimizer=dict(type="SGD", lr=0.1))
    assert type(build_optim_wrapper(Net(), dict(cfg, type=AmpOptimWrapper, device="cpu"))) is AmpOptimWrapper
    assert type(build_optim_wrapper(Net(), dict(cfg, type="hwoptim:OptimWrapper"))) is OptimWrapper


def test_a_built_optimizer_is_accepted():
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    assert build_optim_wrapper(model, dict(optimizer=optimizer)).optimizer is optimizer


def test_unknown_optimizer_names_close_ones():
    with pytest.raises(ValueError, match="unknown optimizer type 'AdamWW'; did you mean 'AdamW'"):
        build_optim_wrapper(Net(), dict(optimizer=dict(type="AdamWW", lr=0.1)))
    with pytest.raises(ValueError, match="did you mean 'SGD'"):
        resolve_optimizer_type("sgd")


def test_unknown_wrapper_type_names_close_ones():
    with pytest.raises(ValueError, match="unknown optim wrapper type 'AmpOptimWraper'; did you mean 'AmpOptimWrapper'"):
        build_optim_wrapper(Net(), dict(type="AmpOptimWraper", optimizer=dict(type="SGD", lr=0.1)))


@pytest.mark.parametrize(
    ("cfg", "error", "match"),
    [
        (dict(optimizer=dict(type="SGD", lr=0.1), accumulative_count=2), ValueError,
         "OptimWrapper does not take 'accumulative_count'; it takes accumulative_counts, clip_grad"),
        (dict(optimizer=dict(lr=0.1)), ValueError, "needs a 'type'"),
        (dict(type="OptimWrapper"), ValueError, "needs an 'optimizer'"),
        (dict(optimizer=dict(type="SGD", lr=0.1, params=[])), ValueError, "must not set 'params'"),
        (dict(optimizer=dict(type="SGD", lr=0.1, momentun=0.9)), TypeError, "cannot build SGD"),
        (dict(optimizer=dict(type="nope:Thing", lr=0.1)), ValueError, "cannot import module 'nope'"),
        (dict(optimizer=dict(type="torch:Tensor", lr=0.1)), TypeError, "not a torch.optim.Optimizer"),
        (dict(optimizer=dict(type="SGD", lr=0.1), constructor="MyConstructor"), ValueError, "not supported"),
        (dict(optimizer=dict(type="SGD", lr=0.1), paramwise_cfg=dict(bias_lr=2)), ValueError,
         "unknown key.*'bias_lr'"),
        (dict(optimizer=dict(type="SGD", lr=0.1), paramwise_cfg=dict(norm_decay_mult=0.0)), ValueError,
         "needs a weight_decay"),
        (dict(optimizer=dict(type="SGD", lr=0.1), paramwise_cfg=dict(custom_keys=dict(head=0.1))), TypeError,
         "custom_keys must map"),
    ],
)
def test_bad_configs(cfg, error, match):
    with pytest.raises(error, match=match):
        build_optim_wrapper(Net(), cfg)


def test_ddp_style_module_is_unwrapped():
    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = Net()

    wrapped = Wrapped()
    wrapper = build_optim_wrapper(wrapped, dict(
        optimizer=dict(type="SGD", lr=0.1), paramwise_cfg=dict(custom_keys={"head": dict(lr_mult=0.5)})))
    assert {g["lr"] for g in wrapper.param_groups} == {0.1, 0.05}
    names = {id(p): n for n, p in wrapped.module.named_parameters()}
    assert all(names[id(g["params"][0])] for g in wrapper.param_groups)


PARAMWISE = [
    dict(custom_keys={"backbone": dict(lr_mult=0.1, decay_mult=0.5), "backbone.0": dict(lr_mult=0.2, foo=1),
                      ".scale": dict(decay_mult=0.0)}),
    dict(bias_lr_mult=2.0, bias_decay_mult=0.0, norm_decay_mult=0.0),
    dict(dwconv_decay_mult=0.3, flat_decay_mult=0.7),
    dict(norm_decay_mult=0.1, flat_decay_mult=0.2, custom_keys={"head.bias": dict(lr_mult=3.0)}),
]


@pytest.mark.parametrize("paramwise_cfg", PARAMWISE)
def test_paramwise_groups_equal_mmengines(paramwise_cfg):
    optimizer_cfg = dict(type="SGD", lr=0.1, momentum=0.9, weight_decay=1e-2)
    ours = build_optim_wrapper(Net(), dict(optimizer=optimizer_cfg, paramwise_cfg=paramwise_cfg))
    theirs = DefaultOptimWrapperConstructor(
        dict(type="OptimWrapper", optimizer=dict(optimizer_cfg)), copy.deepcopy(paramwise_cfg))(Net())
    ours_groups = ours.optimizer.state_dict()["param_groups"]
    theirs_groups = theirs.optimizer.state_dict()["param_groups"]
    assert ours_groups == theirs_groups  # same order, same lr/weight_decay/extra keys


def test_an_mmengine_checkpoint_loads_and_ours_loads_into_mmengine():
    paramwise_cfg = dict(custom_keys={"head": dict(lr_mult=0.1)}, norm_decay_mult=0.0)
    optimizer_cfg = dict(type="SGD", lr=0.1, momentum=0.9, weight_decay=1e-2)
    mm_model, our_model = Net(), Net()
    mm = DefaultOptimWrapperConstructor(dict(type="OptimWrapper", optimizer=dict(optimizer_cfg)),
                                        copy.deepcopy(paramwise_cfg))(mm_model)
    assert isinstance(mm, MMOptimWrapper)
    x = torch.randn(2, 3, 8, 8)
    mm.update_params(mm_model(x).sum())
    ours = build_optim_wrapper(our_model, dict(optimizer=optimizer_cfg, paramwise_cfg=paramwise_cfg))
    mm_state = mm.state_dict()  # has mmengine's "base_param_settings"
    ours.load_state_dict(mm_state)
    assert "base_param_settings" in mm_state
    assert_same(ours.optimizer.state_dict()["state"], mm.optimizer.state_dict()["state"])
    ours.update_params(our_model(x).sum())
    back = DefaultOptimWrapperConstructor(dict(type="OptimWrapper", optimizer=dict(optimizer_cfg)),
                                          copy.deepcopy(paramwise_cfg))(Net())
    back.load_state_dict(ours.state_dict())
    assert_same(back.optimizer.state_dict()["state"], ours.optimizer.state_dict()["state"])


def test_several_optimizers_by_submodule_name():
    class GAN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.generator = nn.Linear(2, 2)
            self.discriminator = nn.Linear(2, 1)

    model = GAN()
    prebuilt = OptimWrapper(torch.optim.SGD(model.discriminator.parameters(), lr=0.3))
    wrappers = build_optim_wrapper(model, dict(
        generator=dict(type="AmpOptimWrapper", device="cpu", optimizer=dict(type="Adam", lr=1e-3)),
        discriminator=prebuilt))
    assert isinstance(wrappers, OptimWrapperDict)
    assert wrappers["discriminator"] is prebuilt
    assert {id(p) for p in wrappers["generator"].optimizer.param_groups[0]["params"]} == {
        id(p) for p in model.generator.parameters()}
    with pytest.raises(ValueError, match="no submodule 'critic'"):
        build_optim_wrapper(model, dict(critic=dict(optimizer=dict(type="SGD", lr=0.1))))
    with pytest.raises(ValueError, match="is float, not a dict"):
        build_optim_wrapper(model, dict(generator=0.1))
