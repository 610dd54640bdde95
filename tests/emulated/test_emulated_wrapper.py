"""The wrappers where placement matters, on a real non-CPU device type.

Every precision, optimizer form and clipping kind trains with accumulation (and a shorter
last window) and an injected inf; the values the wrapper keeps for logging stay on its
device; checkpoints move between the device and the CPU; and the two defects the emulated
device found (an optimizer built before ``model.to(device)``; value clipping with no
gradient) stay fixed.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from hwoptim import AmpOptimWrapper, OptimWrapper, OptimWrapperDict, build_optim_wrapper, get_backend

PRECISIONS = {
    "fp32": dict(dtype="float32"),
    "bf16": dict(dtype="bfloat16"),
    "fp16-dynamic": dict(dtype="float16"),
    "fp16-static": dict(dtype="float16", loss_scale=1024.0),
}
OPTIMIZERS = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
CLIPS = {"norm": dict(max_norm=1.0), "value": dict(type="value", clip_value=0.5)}
MICRO_BATCHES = 7  # windows of 3, 3 and a remainder of 1
INF_AT = 4  # in the second window


def make_model(device: Any = "cpu", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).to(device)


def batches(device: Any, n: int = MICRO_BATCHES) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g).to(device), torch.randn(8, 3, generator=g).to(device))
            for _ in range(n)]


def train(wrapper: OptimWrapper, model: nn.Module, data: list[Any], inf_at: int | None = None,
          start: int = 0) -> None:
    for i, (x, y) in enumerate(data[start:], start):
        with wrapper.optim_context(model):
            loss = nn.functional.mse_loss(model(x).float(), y)
        if i == inf_at:
            loss = loss * float("inf")
        wrapper.update_params(loss)


def on(device: torch.device, tensor: torch.Tensor | None) -> bool:
    return tensor is not None and tensor.device == device


def bad_updates(wrapper: OptimWrapper, device: torch.device) -> tuple[float, float]:
    """(real skips, zeroed steps), both kept on the device."""
    assert on(device, wrapper.skipped_steps) and on(device, wrapper.zeroed_steps)
    return float(wrapper.skipped_steps), float(wrapper.zeroed_steps)


@pytest.mark.parametrize("clip", CLIPS, ids=str)
@pytest.mark.parametrize("form", OPTIMIZERS, ids=str)
@pytest.mark.parametrize("precision", PRECISIONS, ids=str)
def test_training_with_an_inf_keeps_everything_on_the_device(device, precision, form, clip):
    model = make_model(device)
    initial = [p.detach().cpu().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, **OPTIMIZERS[form])
    wrapper = AmpOptimWrapper(optimizer, device="auto", accumulative_counts=3, clip_grad=CLIPS[clip],
                              **PRECISIONS[precision])
    assert wrapper.device == device
    wrapper.initialize_count_status(model, 0, MICRO_BATCHES)
    train(wrapper, model, batches(device), inf_at=INF_AT)

    assert wrapper.inner_count == MICRO_BATCHES
    assert all(p.device == device and bool(torch.isfinite(p).all()) for p in model.parameters())
    assert any(not torch.equal(p.detach().cpu(), q) for p, q in zip(model.parameters(), initial))
    assert on(device, wrapper.last_grad_norm) and bool(torch.isfinite(wrapper.last_grad_norm))
    # a loss scaler or a fused optimizer skips for real; any other steps with zeroed gradients
    real = precision.startswith("fp16") or form == "fused"
    assert bad_updates(wrapper, device) == ((1, 0) if real else (0, 1))
    if precision.startswith("fp16"):
        assert on(device, wrapper.loss_scale)
        expected = 1024.0 if precision == "fp16-static" else 65536.0 / 2  # backed off once
        assert float(wrapper.loss_scale) == expected
    else:
        assert wrapper.loss_scaler is None and wrapper.loss_scale is None
    for state in optimizer.state.values():
        assert state["exp_avg"].device == device


@pytest.mark.parametrize("form", OPTIMIZERS, ids=str)
def test_fp32_on_the_device_matches_the_cpu(device, form):
    """Accumulation with a remainder window, clipping, the skip: the same numbers as on the CPU."""
    runs = {}
    for where in ("cpu", device):
        model = make_model(where)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, **OPTIMIZERS[form])
        wrapper = AmpOptimWrapper(optimizer, device=where, dtype="float32", accumulative_counts=3,
                                  clip_grad=dict(max_norm=0.5))
        wrapper.initialize_count_status(model, 0, MICRO_BATCHES)
        train(wrapper, model, batches(where), inf_at=INF_AT)
        runs[str(where)] = (model, wrapper)
    (cpu_model, cpu_wrapper), (dev_model, dev_wrapper) = runs["cpu"], runs[str(device)]
    for got, want in zip(dev_model.parameters(), cpu_model.parameters()):
        torch.testing.assert_close(got.detach().cpu(), want.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dev_wrapper.last_grad_norm.cpu(), cpu_wrapper.last_grad_norm)


@pytest.mark.parametrize("precision", PRECISIONS, ids=str)
def test_the_second_device_trains_like_the_first(device, precision):
    """Issue 17 item 16: a backward on device 1 failed on an internal assert of torch's engine."""
    runs = []
    for index in (0, 1):
        where = torch.device(device.type, index)
        model = make_model(where)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        wrapper = AmpOptimWrapper(optimizer, device=where, accumulative_counts=3, clip_grad=dict(max_norm=0.5),
                                  **PRECISIONS[precision])
        assert wrapper.device == where
        wrapper.initialize_count_status(model, 0, MICRO_BATCHES)
        train(wrapper, model, batches(where), inf_at=INF_AT)
        assert all(p.device == where for p in model.parameters())
        assert on(where, wrapper.last_grad_norm)
        runs.append([p.detach().cpu() for p in model.parameters()])
    for got, want in zip(*runs):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_fp32_switches_autocast_off_on_the_device_without_a_warning(device):
    """The device's autocast has no float32 (torch would switch it off itself, warning at
    every forward): the backend switches it off before torch is asked."""
    model = make_model(device)
    wrapper = AmpOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), device=device, dtype="float32")
    x = torch.randn(8, 6).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            with wrapper.optim_context(model):
                assert not torch.is_autocast_enabled(device.type)
                out = model(x)
            assert out.dtype == torch.float32
            wrapper.update_params(out.pow(2).mean())


def test_plain_optim_wrapper_keeps_its_values_with_the_parameters(device):
    model = make_model(device)
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=2,
                           clip_grad=dict(max_norm=1.0))
    wrapper.initialize_count_status(model, 0, 4)
    train(wrapper, model, batches(device, 4), inf_at=1)
    assert on(device, wrapper.last_grad_norm)
    assert bad_updates(wrapper, device) == (0, 1)  # SGD is not fused: a zeroed step


# -- the defects the emulated device found ------------------------------------------------------


def test_an_optimizer_built_before_model_to_is_refused(device):
    """The old quick-start order: on this device .to() replaces the parameters, so the
    optimizer would step stale CPU copies (bf16: silently no training)."""
    model = make_model("cpu")
    wrapper = AmpOptimWrapper(torch.optim.AdamW(model.parameters(), fused=True), device="auto",
                              dtype="bfloat16", clip_grad=dict(max_norm=1.0))
    model.to(wrapper.device)
    with pytest.raises(RuntimeError, match="move the model to the device before building the optimizer"):
        wrapper.initialize_count_status(model, 0, 3)
    with pytest.raises(RuntimeError, match="move the model to the device before building the optimizer"):
        with wrapper.optim_context(model):
            pass


def test_a_model_never_moved_is_refused(device):
    model = make_model("cpu")
    wrapper = AmpOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), device="auto")
    with pytest.raises(RuntimeError, match=f"not on the wrapper's device {device}"):
        wrapper.initialize_count_status(model, 0, 3)


@pytest.mark.parametrize("clip", CLIPS, ids=str)
@pytest.mark.parametrize("form", ["for-loop", "foreach"])
def test_no_gradient_at_all_steps_and_keeps_the_norm_on_the_device(device, form, clip):
    model = make_model(device)
    before = [p.detach().cpu().clone() for p in model.parameters()]
    for wrapper in (
        OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1, **OPTIMIZERS[form]), clip_grad=CLIPS[clip]),
        # bf16: with fp16, torch's GradScaler itself refuses a step without gradients
        AmpOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1, **OPTIMIZERS[form]), device="auto",
                        dtype="bfloat16", clip_grad=CLIPS[clip]),
    ):
        wrapper.initialize_count_status(model, 0, 1)
        wrapper.update_params(torch.ones((), device=device, requires_grad=True) * 2)  # no parameter
        assert on(device, wrapper.last_grad_norm) and float(wrapper.last_grad_norm) == 0.0
        assert on(device, wrapper.skipped_steps)
    assert all(torch.equal(p.detach().cpu(), q) for p, q in zip(model.parameters(), before))


# -- several optimizers ---------------------------------------------------------------------------


class TwoPart(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).relu())


def test_optim_wrapper_dict_trains_each_part_on_the_device(device):
    torch.manual_seed(0)
    model = TwoPart().to(get_backend("auto").device())
    amp = dict(type="AmpOptimWrapper", device="auto", dtype="float16", clip_grad=dict(max_norm=1.0))
    wrappers = build_optim_wrapper(model, dict(
        encoder=dict(amp, optimizer=dict(type="AdamW", lr=1e-2, fused=True)),
        head=dict(amp, optimizer=dict(type="SGD", lr=1e-2, momentum=0.9), accumulative_counts=2),
    ))
    assert isinstance(wrappers, OptimWrapperDict)
    wrappers.initialize_count_status(model, 0, 4)
    data = batches(device, 4)
    for name, part in (("encoder", model.encoder), ("head", model.head)):
        wrapper = wrappers[name]
        for x, y in data:
            with wrapper.optim_context(part):
                loss = nn.functional.mse_loss(model(x).float(), y)
            wrapper.update_params(loss)
        assert on(device, wrapper.last_grad_norm) and on(device, wrapper.loss_scale)
    state = wrappers.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    wrappers.load_state_dict(torch.load(buffer, weights_only=True))
    assert {name: w.inner_count for name, w in wrappers.items()} == {"encoder": 4, "head": 4}


# -- checkpoints ---------------------------------------------------------------------------------


def build(device: Any, **kw: Any) -> tuple[nn.Module, AmpOptimWrapper]:
    model = make_model(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    wrapper = AmpOptimWrapper(optimizer, device=device, accumulative_counts=2,
                              clip_grad=dict(max_norm=1.0), **kw)
    return model, wrapper


def save(model: nn.Module, wrapper: OptimWrapper) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": wrapper.state_dict()}, buffer)
    buffer.seek(0)
    return buffer


def devices_in(obj: Any) -> set[str]:
    if isinstance(obj, torch.Tensor):
        return {obj.device.type}
    if isinstance(obj, dict):
        return set().union(*(devices_in(v) for v in obj.values())) if obj else set()
    if isinstance(obj, (list, tuple)):
        return set().union(*(devices_in(v) for v in obj)) if obj else set()
    return set()


def test_resume_on_the_device_is_exact(device):
    data = batches(device, 8)
    model, wrapper = build(device, dtype="float16")
    wrapper.initialize_count_status(model, 0, 8)
    train(wrapper, model, data, inf_at=2)
    straight = [p.detach().cpu() for p in model.parameters()]

    model, wrapper = build(device, dtype="float16")
    wrapper.initialize_count_status(model, 0, 8)
    train(wrapper, model, data[:4], inf_at=2)
    checkpoint = torch.load(save(model, wrapper), weights_only=True)  # device tensors
    assert devices_in(checkpoint["optim"]["state"]) == {device.type}
    model, wrapper = build(device, dtype="float16")
    model.load_state_dict(checkpoint["model"])
    wrapper.load_state_dict(checkpoint["optim"])
    assert wrapper.inner_count == 4
    train(wrapper, model, data, start=4)
    for got, want in zip(model.parameters(), straight):
        assert torch.equal(got.detach().cpu(), want)
    assert on(device, wrapper.loss_scale)


@pytest.mark.parametrize("map_location", ["cpu", None])
def test_a_device_checkpoint_resumes_on_the_cpu(device, map_location):
    model, wrapper = build(device, dtype="float16")
    wrapper.initialize_count_status(model, 0, 8)
    train(wrapper, model, batches(device, 4))
    checkpoint = torch.load(save(model, wrapper), map_location=map_location, weights_only=True)
    assert devices_in(checkpoint) == {map_location or device.type}

    cpu_model, cpu_wrapper = build("cpu", dtype="float16")
    cpu_model.load_state_dict(checkpoint["model"])
    cpu_wrapper.load_state_dict(checkpoint["optim"])
    train(cpu_wrapper, cpu_model, batches("cpu", 8), start=4)
    assert devices_in(cpu_wrapper.state_dict()) <= {"cpu"}
    assert cpu_wrapper.inner_count == 8
    assert float(cpu_wrapper.loss_scale) == float(wrapper.loss_scale)


def test_a_cpu_checkpoint_resumes_on_the_device_as_it_would_on_the_cpu(device):
    data = batches("cpu", 8)
    model, wrapper = build("cpu", dtype="float32")
    wrapper.initialize_count_status(model, 0, 8)
    train(wrapper, model, data[:4])
    buffer = save(model, wrapper)
    train(wrapper, model, data, start=4)  # the CPU run goes on

    checkpoint = torch.load(buffer, map_location=device, weights_only=True)
    assert devices_in(checkpoint) == {device.type}
    dev_model, dev_wrapper = build(device, dtype="float32")
    dev_model.load_state_dict(checkpoint["model"])
    dev_wrapper.load_state_dict(checkpoint["optim"])
    train(dev_wrapper, dev_model, batches(device, 8), start=4)
    for got, want in zip(dev_model.parameters(), model.parameters()):
        torch.testing.assert_close(got.detach().cpu(), want.detach(), rtol=1e-6, atol=1e-7)
    assert devices_in(dev_wrapper.optimizer.state_dict()["state"]) == {device.type}


@pytest.mark.parametrize("how", ["pickle", "torch.save", "deepcopy"])
def test_a_wrapper_copied_with_its_model_trains_on_there_exactly_like_the_original(device, how):
    import copy
    import pickle

    model = make_model(device)
    wrapper = AmpOptimWrapper(torch.optim.AdamW(model.parameters(), lr=0.05), device="auto",
                              dtype="float16", accumulative_counts=3, clip_grad=dict(max_norm=1.0))
    data = batches(device, 12)
    wrapper.initialize_count_status(model, 0, len(data))
    train(wrapper, model, data[:6], inf_at=4)
    if how == "pickle":
        model2, wrapper2 = pickle.loads(pickle.dumps((model, wrapper)))
    elif how == "torch.save":
        buffer = io.BytesIO()
        torch.save((model, wrapper), buffer)
        buffer.seek(0)
        model2, wrapper2 = torch.load(buffer, weights_only=False)
    else:
        model2, wrapper2 = copy.deepcopy((model, wrapper))
    assert type(wrapper2.backend) is type(wrapper.backend) and wrapper2.device == wrapper.device
    assert all(p.device == device for p in model2.parameters())
    for w, m in ((wrapper, model), (wrapper2, model2)):
        train(w, m, data, inf_at=8, start=6)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p.cpu(), p2.cpu())
    assert on(device, wrapper2.skipped_steps) and on(device, wrapper2.last_grad_norm)
    assert torch.equal(wrapper2.skipped_steps.cpu(), wrapper.skipped_steps.cpu())
