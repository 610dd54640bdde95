"""AmpOptimWrapper: dtype and loss-scale rules, inf skipping, checkpoints, on CPU and (marked) CUDA."""

from __future__ import annotations

import copy
import math
import re
import warnings
from unittest import mock

import pytest
import torch
from helpers import COPIES, assert_same, copied, total_norm
from torch import nn

from hwoptim import AmpOptimWrapper, OptimWrapper, get_backend
from hwoptim.backends.cpu import CpuBackend


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 1))


def loss_of(model: nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 8, generator=g)
    y = x[:, :1] * 2 - x[:, 1:2]
    return nn.functional.mse_loss(model(x).float(), y)


def adamw(model: nn.Module, **kw) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=kw.pop("lr", 1e-2), **kw)


def inf_loss(model: nn.Module) -> torch.Tensor:
    return model(torch.ones(1, 8)).float().sum() * float("inf")


# -- construction rules ---------------------------------------------------------------------


def test_cpu_defaults_to_bfloat16_without_a_scaler():
    wrapper = AmpOptimWrapper(adamw(make_model()), device="cpu")
    assert isinstance(wrapper.backend, CpuBackend)
    assert wrapper.device == torch.device("cpu")
    assert wrapper.cast_dtype is torch.bfloat16
    assert wrapper.loss_scaler is None  # bf16 has fp32's range: no scaler, no sync for it


def test_auto_picks_cpu_on_a_cpu_only_machine(monkeypatch):
    monkeypatch.delenv("HWOPTIM_DEVICE", raising=False)
    # torch.accelerator (torch 2.6+) names the build's accelerator even without a device
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        pytest.skip("this machine has an accelerator")
    assert AmpOptimWrapper(optimizer=adamw(make_model())).backend.name == "cpu"


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("float16", torch.float16), ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
     ("float32", torch.float32), (torch.float16, torch.float16), (None, torch.bfloat16)],
)
def test_dtype_names_and_dtypes(dtype, expected):
    assert AmpOptimWrapper(adamw(make_model()), device="cpu", dtype=dtype).cast_dtype is expected


@pytest.mark.parametrize("dtype", ["float64", torch.int8, torch.float64])
def test_a_dtype_the_device_cannot_autocast_to_names_the_ones_it_can(dtype):
    expected = r"'cpu' backend cannot autocast to .*it supports 'bfloat16', 'float16', 'float32'"
    with pytest.raises(ValueError, match=expected):
        AmpOptimWrapper(adamw(make_model()), device="cpu", dtype=dtype)


def test_unknown_dtype_name():
    with pytest.raises(ValueError, match="'half8' is not a known dtype name"):
        AmpOptimWrapper(adamw(make_model()), device="cpu", dtype="half8")


@pytest.mark.parametrize(
    ("loss_scale", "dtype", "scaled", "fixed"),
    [("dynamic", "float16", True, None), ("dynamic", "bfloat16", False, None),
     ("dynamic", "float32", False, None), (512, "bfloat16", True, 512.0), (128.0, "float16", True, 128.0),
     ({"init_scale": 1, "growth_factor": 2}, "float16", True, None),
     ({"enabled": False}, "float16", False, None), (None, "float16", False, None)],
)
def test_loss_scale_rules(loss_scale, dtype, scaled, fixed):
    wrapper = AmpOptimWrapper(adamw(make_model()), device="cpu", dtype=dtype, loss_scale=loss_scale)
    assert (wrapper.loss_scaler is not None) is scaled
    assert wrapper._precision.fixed_scale == fixed
    if scaled:
        assert isinstance(wrapper.loss_scaler, torch.amp.GradScaler)


def test_loss_scale_dict_arguments_reach_the_scaler():
    wrapper = AmpOptimWrapper(adamw(make_model()), device="cpu", dtype="float16",
                              loss_scale={"init_scale": 8.0, "growth_interval": 3})
    assert wrapper.loss_scaler.state_dict()["scale"] == 8.0
    assert wrapper.loss_scaler.get_growth_interval() == 3


@pytest.mark.parametrize("bad", ["unknown", "static", True, [1.0]])
def test_bad_loss_scale_types(bad):
    with pytest.raises(TypeError, match="loss_scale must be of type float"):
        AmpOptimWrapper(adamw(make_model()), device="cpu", loss_scale=bad)


@pytest.mark.parametrize("bad", [0, -2.0, float("inf"), float("nan")])
def test_bad_fixed_loss_scales(bad):
    with pytest.raises(ValueError, match="positive finite"):
        AmpOptimWrapper(adamw(make_model()), device="cpu", loss_scale=bad)


def test_unknown_loss_scale_dict_key():
    with pytest.raises(ValueError, match=r"unknown key.*'init'; GradScaler takes init_scale"):
        AmpOptimWrapper(adamw(make_model()), device="cpu", loss_scale={"init": 2.0})


@pytest.mark.parametrize(
    ("key", "bad", "allowed"),
    [
        ("init_scale", 0, "a positive finite number"),
        ("init_scale", -1.0, "a positive finite number"),
        ("init_scale", float("inf"), "a positive finite number"),
        ("init_scale", float("nan"), "a positive finite number"),
        ("init_scale", "a", "a positive finite number"),
        ("init_scale", True, "a positive finite number"),
        ("growth_factor", 1.0, "a finite number > 1"),
        ("growth_factor", 0.5, "a finite number > 1"),
        ("growth_factor", float("inf"), "a finite number > 1"),
        ("backoff_factor", 1.0, "a number between 0 and 1"),
        ("backoff_factor", 0, "a number between 0 and 1"),
        ("backoff_factor", float("nan"), "a number between 0 and 1"),
        ("growth_interval", 1.5, "an int >= 1"),
        ("growth_interval", 0, "an int >= 1"),
        ("growth_interval", True, "an int >= 1"),
    ],
)
def test_every_loss_scale_dict_value_is_checked_at_construction(key, bad, allowed):
    # torch checks none of these: a scale of 0 wrote NaN into the weights, inf/nan skipped
    # every step, and "a" or growth_interval=1.5 failed only at the first step.
    optimizer = adamw(make_model())
    with pytest.raises(ValueError, match=rf"loss_scale\['{key}'\] must be {allowed}.*got {re.escape(repr(bad))}"):
        AmpOptimWrapper(optimizer, device="cpu", dtype="float16", loss_scale={key: bad})


@pytest.mark.parametrize("bad", [1, "yes"])
def test_a_loss_scale_enabled_that_is_no_bool_is_a_type_error(bad):
    with pytest.raises(TypeError, match=rf"loss_scale\['enabled'\] must be True or False; got {re.escape(repr(bad))}"):
        AmpOptimWrapper(adamw(make_model()), device="cpu", dtype="float16", loss_scale={"enabled": bad})


def test_numpy_scalars_are_accepted_for_every_loss_scale_value():
    np = pytest.importorskip("numpy")
    wrapper = AmpOptimWrapper(
        adamw(make_model()), device="cpu", dtype="float16",
        loss_scale={"init_scale": np.float32(64), "growth_factor": np.float64(4.0),
                    "backoff_factor": np.float16(0.25), "growth_interval": np.int64(3)},
    )
    scaler = wrapper.loss_scaler
    assert (scaler.get_scale(), scaler.get_growth_factor(), scaler.get_backoff_factor(),
            scaler.get_growth_interval()) == (64.0, 4.0, 0.25, 3)
    assert type(scaler._init_scale) is float and type(scaler._growth_interval) is int
    fixed = AmpOptimWrapper(adamw(make_model()), device="cpu", loss_scale=np.int32(512))
    assert fixed._precision.fixed_scale == 512.0 and type(fixed._precision.fixed_scale) is float


def test_device_forms():
    opt = adamw(make_model())
    assert AmpOptimWrapper(opt, device=torch.device("cpu")).device.type == "cpu"
    backend = get_backend("cpu")
    assert AmpOptimWrapper(opt, device=backend).backend is backend


def test_unknown_device_lists_the_registered_backends():
    with pytest.raises(ValueError, match=r"unknown device 'tpu'; registered backends: .*'cpu'"):
        AmpOptimWrapper(adamw(make_model()), device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_unavailable_device_says_what_is_missing(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU-only build, also on a CUDA one
    monkeypatch.setattr(torch.version, "hip", None)
    with pytest.raises(RuntimeError, match=r"'cuda' backend is not available: .*pytorch.org"):
        AmpOptimWrapper(adamw(make_model()), device="cuda")


def test_optimizer_is_required_and_may_come_by_keyword():
    with pytest.raises(TypeError, match="needs an optimizer"):
        AmpOptimWrapper(device="cpu")
    assert AmpOptimWrapper(optimizer=adamw(make_model()), device="cpu").optimizer is not None


def test_use_fsdp_must_be_a_bool():
    with pytest.raises(TypeError, match="use_fsdp"):
        AmpOptimWrapper(adamw(make_model()), device="cpu", use_fsdp="yes")  # type: ignore[arg-type]


def test_use_fsdp_gives_the_sharded_scaler():
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    wrapper = AmpOptimWrapper(adamw(make_model()), device="cpu", dtype="float16", use_fsdp=True)
    assert isinstance(wrapper.loss_scaler, ShardedGradScaler)


def test_nothing_is_built_when_a_later_argument_is_bad():
    with mock.patch.object(CpuBackend, "grad_scaler") as grad_scaler, pytest.raises(ValueError):
        AmpOptimWrapper(adamw(make_model()), device="cpu", dtype="float16", accumulative_counts=0)
    grad_scaler.assert_not_called()


# -- autocast -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [(None, torch.bfloat16), ("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32)],
)
def test_optim_context_autocasts_to_the_cast_dtype(dtype, expected):
    model = make_model()
    wrapper = AmpOptimWrapper(adamw(model), device="cpu", dtype=dtype)
    with wrapper.optim_context(model):
        assert model(torch.randn(2, 8)).dtype is expected
        with torch.autocast("cpu", enabled=False):
            assert model(torch.randn(2, 8)).dtype is torch.float32
    assert model(torch.randn(2, 8)).dtype is torch.float32


def test_float32_switches_an_outer_autocast_off():
    model = make_model()
    wrapper = AmpOptimWrapper(adamw(model), device="cpu", dtype="float32")
    with torch.autocast("cpu", dtype=torch.bfloat16), wrapper.optim_context(model):
        assert model(torch.randn(2, 8)).dtype is torch.float32


# -- scaling, skipping, clipping --------------------------------------------------------------------


def test_an_overflowing_step_is_skipped_and_the_scale_backs_off():
    model = make_model()
    wrapper = AmpOptimWrapper(adamw(model), device="cpu", dtype="float16")
    wrapper.update_params(loss_of(model, 0))
    scale = float(wrapper.loss_scale)
    before = [p.detach().clone() for p in model.parameters()]
    wrapper.update_params(inf_loss(model))
    for got, want in zip(model.parameters(), before):
        assert torch.equal(got, want)
    assert float(wrapper.loss_scale) == scale / 2
    assert float(wrapper.skipped_steps) == 1


def test_overflow_with_error_if_nonfinite_is_skipped_not_raised():
    model = make_model()
    wrapper = AmpOptimWrapper(adamw(model), device="cpu", dtype="float16",
                              clip_grad=dict(max_norm=1.0, error_if_nonfinite=True))
    before = [p.detach().clone() for p in model.parameters()]
    wrapper.update_params(inf_loss(model))  # mmengine crashes here on the first fp16 overflow
    for got, want in zip(model.parameters(), before):
        assert torch.equal(got, want)
    assert float(wrapper.skipped_steps) == 1


def test_gradients_are_unscaled_before_clipping():
    model, reference = make_model(), make_model()
    wrapper = AmpOptimWrapper(adamw(model), device="cpu", dtype="float16", loss_scale=1024.0,
                              clip_grad=dict(max_norm=1e9))
    with wrapper.optim_context(model):
        loss = loss_of(model, 0)
    wrapper.update_params(loss)
    with torch.autocast("cpu", dtype=torch.float16):
        ref_loss = loss_of(reference, 0)
    ref_loss.backward()
    expected = total_norm([p.grad for p in reference.parameters()])
    torch.testing.assert_close(wrapper.last_grad_norm, expected, rtol=1e-3, atol=0)


def test_a_fixed_scale_stays_fixed_but_overflow_is_still_skipped():
    model = make_model()
    wrapper = AmpOptimWrapper(adamw(model), device="cpu", dtype="float16", loss_scale=64)
    for seed in range(3):
        wrapper.update_params(loss_of(model, seed))
    assert float(wrapper.loss_scale) == 64
    wrapper.update_params(inf_loss(model))
    assert float(wrapper.loss_scale) == 64 and float(wrapper.skipped_steps) == 1


def test_fused_optimizer_under_fp16_scaling_trains_and_skips():
    model = make_model()
    wrapper = AmpOptimWrapper(adamw(model, fused=True), device="cpu", dtype="float16",
                              clip_grad=dict(max_norm=1.0))
    losses = []
    for seed in range(30):
        with wrapper.optim_context(model):
            loss = loss_of(model, seed % 3)
        wrapper.update_params(loss)
        losses.append(float(loss.detach()))
    assert sum(losses[-3:]) < sum(losses[:3])
    before = [p.detach().clone() for p in model.parameters()]
    wrapper.update_params(inf_loss(model))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_loss_falls_with_accumulation_and_clipping(dtype):
    model = make_model()
    wrapper = AmpOptimWrapper(adamw(model), device="cpu", dtype=dtype, accumulative_counts=3,
                              clip_grad=dict(max_norm=1.0))
    wrapper.initialize_count_status(model, 0, 60)
    losses = []
    for i in range(60):
        with wrapper.optim_context(model):
            loss = loss_of(model, i % 5)
        wrapper.update_params(loss)
        losses.append(float(loss.detach()))
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])


def test_float32_amp_equals_the_plain_wrapper_exactly():
    a, b = make_model(), make_model()
    amp = AmpOptimWrapper(adamw(a), device="cpu", dtype="float32", accumulative_counts=2,
                          clip_grad=dict(max_norm=0.1))
    plain = OptimWrapper(adamw(b), accumulative_counts=2, clip_grad=dict(max_norm=0.1))
    for wrapper, model in ((amp, a), (plain, b)):
        wrapper.initialize_count_status(model, 0, 9)
        for seed in range(9):
            with wrapper.optim_context(model):
                loss = loss_of(model, seed)
            wrapper.update_params(loss)
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


# -- mmengine's mocked checks --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", None])
def test_step_goes_through_the_scaler(dtype):
    wrapper = AmpOptimWrapper(adamw(make_model()), device="cpu", dtype=dtype, loss_scale=2.0)
    wrapper._precision.scaler = mock.MagicMock()  # the precision policy calls it
    wrapper.step()
    wrapper.loss_scaler.step.assert_called_once_with(wrapper.optimizer)
    wrapper.loss_scaler.update.assert_called_once_with(wrapper._precision.fixed_scale)


def test_backward_goes_through_the_scaler():
    wrapper = AmpOptimWrapper(adamw(make_model()), device="cpu", dtype="float16")
    wrapper._precision.scaler = mock.MagicMock()  # the precision policy calls it
    wrapper.backward(1)  # type: ignore[arg-type]
    wrapper.loss_scaler.scale.assert_called_once_with(1)
    wrapper.loss_scaler.scale.return_value.backward.assert_called_once_with()


# -- checkpoints ------------------------------------------------------------------------------------------


def trained_fp16(seed_steps: int = 3) -> tuple[nn.Module, AmpOptimWrapper]:
    model = make_model()
    wrapper = AmpOptimWrapper(adamw(model), device="cpu", dtype="float16", loss_scale={"init_scale": 256.0})
    for seed in range(seed_steps):
        wrapper.update_params(loss_of(model, seed))
    wrapper.update_params(inf_loss(model))  # scale 256 -> 128
    return model, wrapper


def test_state_dict_has_mmengines_loss_scaler_key():
    _, wrapper = trained_fp16()
    state = wrapper.state_dict()
    assert state["loss_scaler"] == wrapper.loss_scaler.state_dict()
    assert state["loss_scaler"]["scale"] == 128.0
    optimizer_only = {k: v for k, v in state.items() if k not in ("loss_scaler", "hwoptim")}
    assert optimizer_only == wrapper.optimizer.state_dict()


def test_loss_scale_round_trips():
    _, wrapper = trained_fp16()
    fresh = AmpOptimWrapper(adamw(make_model()), device="cpu", dtype="float16")
    state = wrapper.state_dict()
    frozen = copy.deepcopy(state)
    fresh.load_state_dict(state)
    assert fresh.loss_scaler.state_dict() == wrapper.loss_scaler.state_dict()
    assert fresh.optimizer.state_dict()["param_groups"] == wrapper.optimizer.state_dict()["param_groups"]
    assert state.keys() == frozen.keys() and state["loss_scaler"] == frozen["loss_scaler"]


def test_a_plain_optimizer_checkpoint_keeps_the_current_scale():
    model = make_model()
    fresh = AmpOptimWrapper(adamw(model), device="cpu", dtype="float16", loss_scale={"init_scale": 32.0})
    fresh.load_state_dict(adamw(make_model(), lr=0.5).state_dict())
    assert fresh.get_lr() == {"lr": [0.5]} and fresh.loss_scaler.state_dict()["scale"] == 32.0


def test_bf16_wrapper_saves_no_scaler_entry_and_warns_on_a_saved_scale():
    bf16 = AmpOptimWrapper(adamw(make_model()), device="cpu", dtype="bfloat16")
    assert "loss_scaler" not in bf16.state_dict()  # mmengine cannot load an empty one
    _, fp16 = trained_fp16()
    with pytest.warns(UserWarning, match="saved scale is ignored"):
        bf16.load_state_dict(fp16.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AmpOptimWrapper(adamw(make_model()), device="cpu", dtype="float16").load_state_dict(bf16.state_dict())


def test_a_malformed_scaler_state_raises_before_anything_changes():
    _, wrapper = trained_fp16()
    state = wrapper.state_dict()
    del state["loss_scaler"]["_growth_tracker"]
    fresh = AmpOptimWrapper(adamw(make_model(), lr=0.7), device="cpu", dtype="float16")
    with pytest.raises(ValueError, match="lacks '_growth_tracker'"):
        fresh.load_state_dict(state)
    assert fresh.get_lr() == {"lr": [0.7]}


def snapshot(wrapper: AmpOptimWrapper) -> dict:
    return {
        "optimizer": copy.deepcopy(wrapper.optimizer.state_dict()),
        "counters": (wrapper._window.inner, wrapper._window.max_counts, wrapper._window.remainder),
        "scaler": wrapper.loss_scaler.state_dict(),
        "scale": wrapper.loss_scale if wrapper.loss_scale is None else wrapper.loss_scale.clone(),
    }


BAD_SCALER_STATES = [
    ("scale", "abc"), ("scale", 0), ("scale", -4.0), ("scale", math.nan), ("scale", math.inf),
    ("scale", None), ("scale", torch.tensor(8.0)), ("growth_factor", 1.0), ("growth_factor", "2"),
    ("backoff_factor", 2.0), ("growth_interval", 0), ("growth_interval", 2.5),
    ("_growth_tracker", "x"), ("_growth_tracker", -1), ("_growth_tracker", 1.5),
    ("_growth_tracker", 2000), ("_growth_tracker", None),
]


@pytest.mark.parametrize(("key", "bad"), BAD_SCALER_STATES)
@pytest.mark.parametrize("trained", [False, True], ids=["fresh", "trained"])
def test_a_bad_scaler_value_raises_and_loads_nothing(key, bad, trained):
    _, source = trained_fp16()
    state = source.state_dict()
    state["hwoptim"]["inner_count"] = 12
    state["param_groups"][0]["lr"] = 0.3
    state["loss_scaler"][key] = bad
    target_model = make_model(1)
    target = AmpOptimWrapper(adamw(target_model, lr=0.7), device="cpu", dtype="float16",
                             loss_scale={"init_scale": 32.0})
    if trained:  # its scaler and optimizer state exist: a half-applied load would show
        target.initialize_count_status(target_model, 0, 100)
        target.update_params(loss_of(target_model, 5))
    before = snapshot(target)
    with pytest.raises(ValueError, match=rf"loss_scaler\['{key}'\] must be"):
        target.load_state_dict(state)
    after = snapshot(target)
    assert_same(after["optimizer"], before["optimizer"], "optimizer")
    assert after["counters"] == before["counters"]
    assert after["scaler"] == before["scaler"]
    assert (after["scale"] is None) is (before["scale"] is None)
    if trained:
        assert torch.equal(after["scale"], before["scale"])
    # and the wrapper still trains with its own scale
    target.update_params(loss_of(target_model, 6))
    assert target.loss_scaler.get_scale() == 32.0


def test_numpy_values_in_a_saved_scaler_state_load_as_plain_numbers():
    np = pytest.importorskip("numpy")
    _, source = trained_fp16()
    state = source.state_dict()
    state["loss_scaler"].update(scale=np.float32(64.0), _growth_tracker=np.int64(3))
    state["hwoptim"]["inner_count"] = np.int64(4)
    target = AmpOptimWrapper(adamw(make_model()), device="cpu", dtype="float16")
    target.load_state_dict(state)
    loaded = target.loss_scaler.state_dict()
    assert (loaded["scale"], loaded["_growth_tracker"]) == (64.0, 3)
    assert type(target.loss_scaler._init_scale) is float and target.inner_count == 4
    assert type(target.inner_count) is int


def test_an_empty_scaler_entry_keeps_the_current_scale():
    fresh = AmpOptimWrapper(adamw(make_model()), device="cpu", dtype="float16", loss_scale={"init_scale": 32.0})
    fresh.load_state_dict(dict(adamw(make_model()).state_dict(), loss_scaler={}))
    assert fresh.loss_scaler.state_dict()["scale"] == 32.0


def test_a_bf16_checkpoint_loads_into_mmengines_amp_wrapper(monkeypatch):
    from mmengine.optim import AmpOptimWrapper as MMAmpOptimWrapper

    model = make_model()
    ours = AmpOptimWrapper(adamw(model), device="cpu", dtype="bfloat16")
    ours.update_params(loss_of(model, 0))
    # mmengine's AmpOptimWrapper refuses to build without an accelerator: let it think it has
    # one and hand it torch's CPU scaler, so the check is about the checkpoint layout alone.
    # (Only after stepping: with CUDA "available", a CUDA build of torch asks the driver
    # whether Adam's step is being captured into a CUDA graph.)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("mmengine.optim.optimizer.amp_optimizer_wrapper.GradScaler",
                        lambda **kw: torch.amp.GradScaler("cpu", **kw))
    theirs = MMAmpOptimWrapper(optimizer=adamw(make_model()), dtype="bfloat16")
    theirs.load_state_dict(ours.state_dict())
    assert theirs.optimizer.state_dict()["state"].keys() == ours.optimizer.state_dict()["state"].keys()


def test_accumulative_counts_and_loss_scale_are_readable_on_every_wrapper():
    amp = AmpOptimWrapper(adamw(make_model()), device="cpu", dtype="bfloat16", accumulative_counts=3)
    plain = OptimWrapper(adamw(make_model()), accumulative_counts=2)
    assert (amp.accumulative_counts, plain.accumulative_counts) == (3, 2)
    assert amp.loss_scale is None and plain.loss_scale is None
    with pytest.raises(AttributeError):
        plain.accumulative_counts = 5  # type: ignore[misc]


def test_repr_names_device_dtype_and_scaler():
    text = repr(AmpOptimWrapper(adamw(make_model()), device="cpu", dtype="float16", loss_scale=8))
    assert "device=cpu" in text and "dtype=float16" in text and "fixed 8.0" in text


# -- copies: pickle, torch.save, deepcopy -----------------------------------------------------------------

AMP_COPY_CONFIGS = {
    "bf16-no-scaler": dict(dtype="bfloat16", clip_grad=dict(max_norm=0.5)),
    "fp16-dynamic": dict(dtype="float16", loss_scale={"init_scale": 256.0, "growth_interval": 2}),
    "fp16-dynamic-clip-acc": dict(dtype="float16", loss_scale={"init_scale": 256.0}, accumulative_counts=2,
                                  clip_grad=dict(max_norm=0.5)),
    "fp16-fixed": dict(dtype="float16", loss_scale=64.0, clip_grad=dict(type="value", clip_value=0.1)),
}


def train_amp(wrapper: AmpOptimWrapper, model: nn.Module, seeds: range, inf_at: int) -> None:
    for seed in seeds:
        with wrapper.optim_context(model):
            loss = loss_of(model, seed)
        wrapper.update_params(loss * float("inf") if seed == inf_at else loss)


def assert_copy_trains_like_the_original(model: nn.Module, wrapper: AmpOptimWrapper, how: str) -> None:
    wrapper.initialize_count_status(model, 0, 40)
    train_amp(wrapper, model, range(4), inf_at=1)
    model2, wrapper2 = copied((model, wrapper), how)
    assert type(wrapper2.backend) is type(wrapper.backend) and wrapper2.device == wrapper.device
    assert type(wrapper2.loss_scaler) is type(wrapper.loss_scaler)
    for w, m in ((wrapper, model), (wrapper2, model2)):
        train_amp(w, m, range(4, 10), inf_at=7)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, p2)
    assert_same(wrapper2.state_dict(), wrapper.state_dict())
    assert_same(wrapper2.skipped_steps, wrapper.skipped_steps)
    assert_same(wrapper2.loss_scale, wrapper.loss_scale)


@pytest.mark.parametrize("how", COPIES)
@pytest.mark.parametrize("config", list(AMP_COPY_CONFIGS))
def test_a_copy_with_its_model_trains_on_exactly_like_the_original(config, how):
    model = make_model()
    wrapper = AmpOptimWrapper(adamw(model), device="cpu", **AMP_COPY_CONFIGS[config])
    assert_copy_trains_like_the_original(model, wrapper, how)


@pytest.mark.parametrize("how", COPIES)
@pytest.mark.parametrize("name", ["npu", "cuda", "generic"])
def test_a_copy_made_under_a_mock_trains_on_there(name, how):
    from hwoptim.testing import mock_backend

    with mock_backend(name):
        model = make_model()
        wrapper = AmpOptimWrapper(adamw(model), device="auto", dtype="float16", accumulative_counts=2,
                                  clip_grad=dict(max_norm=0.5))
        assert wrapper.loss_scaler is not None
        assert_copy_trains_like_the_original(model, wrapper, how)


# -- the same on a real GPU ---------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_unmocked_fp16_training_and_skip():
    model = make_model().cuda()
    wrapper = AmpOptimWrapper(adamw(model), device="cuda", accumulative_counts=2, clip_grad=dict(max_norm=1.0))
    assert wrapper.cast_dtype is torch.float16 and wrapper.device.type == "cuda"
    assert isinstance(wrapper.loss_scaler, torch.amp.GradScaler)
    with wrapper.optim_context(model):
        assert model(torch.randn(2, 8, device="cuda")).dtype is torch.float16
    wrapper.initialize_count_status(model, 0, 40)
    losses = []
    for i in range(40):
        g = torch.Generator().manual_seed(i % 4)
        x = torch.randn(16, 8, generator=g).cuda()
        with wrapper.optim_context(model):
            loss = nn.functional.mse_loss(model(x).float(), x[:, :1] * 2)
        wrapper.update_params(loss)
        losses.append(float(loss.detach()))
    assert sum(losses[-4:]) < sum(losses[:4])
    before = [p.detach().clone() for p in model.parameters()]
    wrapper.update_params(model(torch.ones(1, 8, device="cuda")).float().sum() * float("inf"))
    wrapper.update_params(model(torch.ones(1, 8, device="cuda")).float().sum() * float("inf"))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert float(wrapper.skipped_steps) == 1


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "expected"), [("float32", torch.float32), ("float64", torch.float64)])
def test_cuda_full_precision_dtypes(dtype, expected):
    model = nn.Conv2d(1, 1, 1).cuda()
    wrapper = AmpOptimWrapper(adamw(model), device="cuda", dtype=dtype)
    with wrapper.optim_context(model):
        assert model(torch.randn(1, 1, 1, 1, device="cuda")).dtype is expected


def test_parameters_off_the_wrapper_device_are_refused_once_the_model_is_given():
    model = nn.Linear(4, 2, device="meta")  # stands for parameters left on another device
    wrapper = AmpOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), device="cpu")
    with pytest.raises(RuntimeError, match=r"2 of the optimizer's parameters are not on the wrapper's "
                       r"device cpu.*on meta.*move the model to the device before building the optimizer"):
        wrapper.initialize_count_status(model, 0, 10)
