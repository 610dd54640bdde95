"""hwoptim's AmpOptimWrapper inside mmengine's real Runner, on the emulated device.

mmengine's Runner puts the model on ``mmengine.device.get_device()``, which knows CUDA,
NPU, MLU, MPS, DIPU and MUSA only: on any other device (this one, as "emu" and as "npu"
with hwoptim's torch_npu stand-in, which lacks what mmengine's NPU detection imports) it
is "cpu". These tests pin that down, and train the documented way:
``constructor="hwoptim.OptimWrapperConstructor"`` places the model on the wrapper's
device before the optimizer is built (docs/migrating-from-mmengine.md). An item-weighted
model (hwoptim.mmengine.ItemWeightedTrainStep) trains there too, its counts on the device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _mmengine_worker import (
    ITERS,
    ItemData,
    ItemNet,
    Net,
    StopAfter,
    dataloader,
    item_weighted_reference,
    params_of,
    runner_kwargs,
)
from mmengine.runner import Runner

import hwoptim
from hwoptim.mmengine import DeviceHistoryBuffer


def amp_config(dtype: str, **overrides: Any) -> dict[str, Any]:
    return dict(
        dict(constructor="hwoptim.OptimWrapperConstructor",
             type=hwoptim.AmpOptimWrapper, device="auto", dtype=dtype,
             accumulative_counts=3,  # ITERS = 10: windows 3, 3, 3 and a last one of 1
             optimizer=dict(type="AdamW", lr=0.01), clip_grad=dict(max_norm=1.0)),
        **overrides,
    )


RUN = dict(
    train_cfg=dict(by_epoch=False, max_iters=ITERS),
    param_scheduler=dict(type="LinearLR", start_factor=0.2, by_epoch=False, begin=0, end=8),
)


def test_mmengine_puts_the_model_on_the_cpu_whatever_the_user_did(tmp_path, device):
    """What the docs tell users: moving the model first does not survive the Runner, and
    mmengine's default constructor then builds the optimizer over CPU parameters."""
    from mmengine.device import get_device

    assert get_device() == "cpu"
    model = Net().to(device)
    runner = Runner(**runner_kwargs(tmp_path, model=model, optim_wrapper=dict(
        type=hwoptim.AmpOptimWrapper, device="auto", dtype="bfloat16",
        optimizer=dict(type="SGD", lr=0.1))))
    assert {p.device.type for p in runner.model.parameters()} == {"cpu"}
    with pytest.raises(RuntimeError, match=r"constructor='hwoptim\.OptimWrapperConstructor'"):
        runner.train()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_amp_under_the_runner_trains_on_the_device_and_resumes(tmp_path, device, dtype, monkeypatch):
    # torch's safe loading on (hwoptim.mmengine's allow list; tests/test_mmengine_safe_load.py)
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    straight = Runner(**runner_kwargs(
        tmp_path / "straight", optim_wrapper=amp_config(dtype),
        default_hooks=dict(logger=dict(type="LoggerHook", interval=5), checkpoint=None),
        log_level="INFO", **RUN))
    straight.train()

    model, wrapper = straight.model, straight.optim_wrapper
    assert wrapper.device == device and wrapper.cast_dtype == getattr(torch, dtype)
    assert all(p.device == device for p in model.parameters())
    assert model.data_preprocessor._device == device  # mmengine moves the batches there
    assert set(model.forward_dtypes) == {getattr(torch, dtype)}
    assert all(s.device == device for state in wrapper.optimizer.state.values()
               for s in state.values() if isinstance(s, torch.Tensor) and s.dim() > 0)
    assert wrapper.last_grad_norm.device == device
    scalars = straight.message_hub.log_scalars
    assert isinstance(scalars["train/grad_norm"], DeviceHistoryBuffer)
    assert len(scalars["train/grad_norm"].data[0]) == 4  # 3 + 3 + 3 + 1: one per update
    log = next(Path(straight.log_dir).glob("*.log")).read_text()
    assert "grad_norm: " in log
    assert f"hwoptim: moving the model from cpu to the AmpOptimWrapper's device {device}" in log
    if dtype == "float16":
        assert wrapper.loss_scale.device == device
        assert scalars["train/loss_scale"].current() == float(wrapper.loss_scale)
        assert "loss_scale: " in log
    else:
        assert wrapper.loss_scaler is None and "train/loss_scale" not in scalars

    # interrupted after iteration 7, resumed from the checkpoint of iteration 6
    work_dir = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        Runner(**runner_kwargs(
            work_dir, optim_wrapper=amp_config(dtype), custom_hooks=[StopAfter(7)],
            default_hooks=dict(logger=None, checkpoint=dict(type="CheckpointHook", interval=3,
                                                            by_epoch=False)),
            **RUN)).train()
    assert (work_dir / "iter_6.pth").exists()
    resumed = Runner(**runner_kwargs(work_dir, optim_wrapper=amp_config(dtype), resume=True, **RUN))
    resumed.train()

    assert resumed.iter == ITERS
    # no logger in this run: the values of its updates (iterations 9 and 10) are still
    # queued, as device tensors, not read
    queued = resumed.message_hub.log_scalars["train/grad_norm"]
    assert queued.pending == 2 and all(t.device == device for t in queued._queued)
    assert all(p.device == device for p in resumed.model.parameters())
    for got, want in zip(params_of(resumed.model), params_of(model)):
        assert torch.equal(got.cpu(), want.cpu())
    if dtype == "float16":
        assert resumed.optim_wrapper.loss_scale.device == device
        assert float(resumed.optim_wrapper.loss_scale) == float(wrapper.loss_scale)


def test_item_weighted_model_under_the_runner_counts_on_the_device(tmp_path, device):
    """num_items as a device tensor from the model's losses: the same parameters as the
    plain-torch reference on the CPU (fp32), and the logged item losses queued on the device."""
    runner = Runner(**runner_kwargs(
        tmp_path, model=ItemNet(), train_dataloader=dataloader(dataset=ItemData()),
        optim_wrapper=amp_config("float32", optimizer=dict(type="SGD", lr=0.1, momentum=0.9),
                                 clip_grad=dict(max_norm=0.5))))
    runner.train()
    assert all(p.device == device for p in runner.model.parameters())
    queued = runner.message_hub.log_scalars["train/item_loss"]
    assert queued.pending == 4 and all(t.device == device for t in queued._queued)

    params, item_loss, _ = item_weighted_reference(ITERS, 3)
    for got, want in zip(params_of(runner.model), params):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)
    assert queued.data[0].tolist() == pytest.approx(item_loss, rel=1e-5)


def test_per_group_norms_are_logged_from_the_device_under_the_runner(tmp_path, device):
    """paramwise_cfg names the layers; train/grad_norm/<layer> is queued on the device and
    read at the log interval, with the total beside it (reads per update: the host-read
    tests; the Runner's own syncs: tests/test_mmengine.py)."""
    runner = Runner(**runner_kwargs(
        tmp_path, model=Net(),
        optim_wrapper=amp_config(
            "bfloat16", paramwise_cfg=dict(custom_keys={"fc1": dict(name="fc1"), "fc2": dict(name="fc2")}),
        ),
        default_hooks=dict(logger=dict(type="LoggerHook", interval=5), checkpoint=None),
        log_level="INFO", **RUN,
    ))
    runner.train()
    wrapper = runner.optim_wrapper
    assert list(wrapper.last_grad_norms) == ["fc1", "fc2"]
    assert all(t.device == device for t in wrapper.last_grad_norms.values())
    scalars = runner.message_hub.log_scalars
    for group in ("fc1", "fc2"):
        buffer = scalars[f"train/grad_norm/{group}"]
        assert isinstance(buffer, DeviceHistoryBuffer)
        values = buffer.data[0]
        assert len(values) == 4 and values[-1] == pytest.approx(float(wrapper.last_grad_norms[group]))
    total = scalars["train/grad_norm"].data[0][-1]
    assert total == pytest.approx((values[-1] ** 2 + scalars["train/grad_norm/fc1"].data[0][-1] ** 2) ** 0.5,
                                  rel=1e-3)
    log = next(Path(runner.log_dir).glob("*.log")).read_text()
    assert "grad_norm/fc1: " in log
