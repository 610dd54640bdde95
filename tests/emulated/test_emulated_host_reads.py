"""The no-host-sync contract, counted on a device: device-to-host reads per update_params.

tests/test_host_sync.py finds the syncing calls hwoptim's own code makes; here the device
counts every read, torch's included: none for fp32, bf16 and fused optimizers; for fp16 with
a non-fused optimizer only torch GradScaler's one per optimizer step.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hwoptim import AmpOptimWrapper
from hwoptim.testing.emulated import count_host_reads

CASES = [
    # (dtype, optimizer keyword arguments, clip_grad, reads allowed per stepping update)
    ("float32", dict(foreach=False), dict(max_norm=1.0), 0),
    ("float32", dict(foreach=True), dict(type="value", clip_value=0.5), 0),
    ("float32", dict(fused=True), dict(max_norm=1.0), 0),
    ("bfloat16", dict(foreach=False), dict(type="value", clip_value=0.5), 0),
    ("bfloat16", dict(foreach=True), dict(max_norm=1.0), 0),
    ("bfloat16", dict(fused=True), dict(max_norm=1.0), 0),
    ("float16", dict(fused=True), dict(max_norm=1.0), 0),
    ("float16", dict(fused=True), None, 0),
    ("float16", dict(foreach=True), dict(max_norm=1.0), 1),  # GradScaler's found_inf.item()
    ("float16", dict(foreach=False), None, 1),
]


@pytest.mark.parametrize(("dtype", "opt_kw", "clip", "allowed"), CASES, ids=lambda v: str(v))
def test_reads_per_update_params(device, dtype, opt_kw, clip, allowed):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).to(device)
    wrapper = AmpOptimWrapper(torch.optim.AdamW(model.parameters(), lr=1e-3, **opt_kw), device="auto",
                              dtype=dtype, accumulative_counts=2, clip_grad=clip)
    wrapper.initialize_count_status(model, 0, 6)
    per_call = []
    for step in range(6):
        x = torch.randn(4, 6, device=device)
        with wrapper.optim_context(model):
            loss = model(x).float().square().mean()
        if step == 3:
            loss = loss * float("inf")  # a skipped step reads no more than a good one
        with count_host_reads() as reads:
            wrapper.update_params(loss)
        per_call.append(reads.total)
    assert per_call[0::2] == [0, 0, 0], "a micro-batch that does not step must read nothing"
    assert per_call[1::2] == [allowed] * 3, per_call
    # the counting left the result alone: a real skip (scaler, fused) or a zeroed step
    assert float(wrapper.skipped_steps) + float(wrapper.zeroed_steps) == 1


def test_logging_every_n_steps_costs_one_read(device):
    model = nn.Linear(4, 1).to(device)
    wrapper = AmpOptimWrapper(torch.optim.AdamW(model.parameters(), fused=True), device="auto",
                              dtype="float16", loss_scale=dict(init_scale=256.0), clip_grad=dict(max_norm=1.0))
    with wrapper.optim_context(model):
        loss = model(torch.randn(2, 4, device=device)).float().sum()
    wrapper.update_params(loss)
    with count_host_reads() as reads:  # the pattern docs/logging.md and the README give
        values = torch.stack([wrapper.last_grad_norm, wrapper.skipped_steps, wrapper.loss_scale]).tolist()
    assert reads.total == 1, reads
    assert values[1:] == [0.0, 256.0]


@pytest.mark.parametrize("count", ["int", "tensor"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_item_weighted_updates_read_nothing(device, dtype, count):
    """update_params(loss, num_items=n): the window's count is summed on the device."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3).to(device)
    wrapper = AmpOptimWrapper(torch.optim.AdamW(model.parameters(), fused=True), device="auto", dtype=dtype,
                              accumulative_counts=2, clip_grad=dict(max_norm=1.0))
    wrapper.initialize_count_status(model, 0, 4)
    for items in (4, 3, 5, 2):
        x = torch.randn(items, 6, device=device)
        with wrapper.optim_context(model):
            loss = model(x).float().square().sum()
        num_items = items if count == "int" else torch.tensor(items, device=device)
        with count_host_reads() as reads:
            wrapper.update_params(loss, num_items=num_items)
        assert reads.total == 0, reads
    assert on_device(device, wrapper.last_loss, wrapper.skipped_steps, wrapper.last_grad_norm)


def on_device(device, *tensors):
    return all(t is not None and t.device == device for t in tensors)


def _layer_groups(model: nn.Sequential) -> list[dict]:
    return [{"params": list(m.parameters()), "name": f"layer{i}"}
            for i, m in enumerate(m for m in model if isinstance(m, nn.Linear))]


@pytest.mark.parametrize("compile_step", [False, dict(backend="eager")], ids=["eager", "compiled"])
@pytest.mark.parametrize(("dtype", "clip"), [
    ("bfloat16", dict(max_norm=1.0)),
    ("bfloat16", dict(max_norm=1.0, per_group=True)),
    ("float16", dict(max_norm={"layer1": 0.5})),
], ids=str)
def test_per_group_norms_and_nonfinite_groups_read_nothing_until_logged(device, dtype, clip, compile_step):
    """last_grad_norms and nonfinite_groups stay on the device: no read per update (a bad
    one included), and one read for all of them at a log step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).to(device)
    wrapper = AmpOptimWrapper(torch.optim.AdamW(_layer_groups(model), lr=1e-3, fused=True), device="auto",
                              dtype=dtype, loss_scale=256.0 if dtype == "float16" else None,
                              clip_grad=clip, compile_step=compile_step)
    for step in range(4):
        with wrapper.optim_context(model):
            loss = model(torch.randn(4, 6, device=device)).float().square().mean()
        if step == 2:
            loss = loss * float("inf")
        with count_host_reads() as reads:
            wrapper.update_params(loss)
            norms, flags = wrapper.last_grad_norms, wrapper.nonfinite_groups
        assert reads.total == 0, (step, reads)
    assert list(norms) == ["layer0", "layer1"] and on_device(device, *norms.values(), *flags.values())
    with count_host_reads() as reads:  # the logging pattern of docs/logging.md
        values = torch.stack([*norms.values(), *flags.values()]).tolist()
    assert reads.total == 1, reads
    assert all(math.isfinite(v) for v in values[:2])  # the last update was good
    assert values[2:] == [1.0, 1.0]  # the inf loss reached both layers at update 3
    assert float(wrapper.skipped_steps) == 1
