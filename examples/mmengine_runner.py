"""hwoptim inside mmengine's Runner: the one config line that changes.

An mmengine training setup (a BaseModel, a dataset, a Runner with a param scheduler, the
logger and the checkpoint hook) where only ``optim_wrapper``'s ``type`` names hwoptim. The
Runner builds the wrapper, drives it from ``BaseModel.train_step``, steps the scheduler,
saves and resumes it, and logs ``grad_norm`` and ``loss_scale``, read at the logging
interval only. On a CPU it runs AMP (mmengine's own AmpOptimWrapper refuses the CPU).

    python examples/mmengine_runner.py                      # float16 with a loss scaler
    python examples/mmengine_runner.py --dtype bfloat16 --device cpu
    python examples/mmengine_runner.py --scoped-name        # type="hwoptim.AmpOptimWrapper"
    python examples/mmengine_runner.py --work-dir run --steps 30 --checkpoint-every 10
    python examples/mmengine_runner.py --work-dir run --steps 60 --resume   # from iteration 30

Needs mmengine: ``pip install "hwoptim[mmengine]"``.
"""
# smoke-args: --steps 8 --log-every 4
# smoke-expect: grad_norm:
# smoke-expect: loss_scale:
# smoke-expect: done: 8 iterations

from __future__ import annotations

import argparse
import importlib
import os
import tempfile
import warnings

import torch
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

import hwoptim


class Colours(Dataset):
    """Synthetic images; the class is the brightest colour channel."""

    def __init__(self, size: int = 256) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(size, 3, 8, 8, generator=g)
        self.labels = self.images.mean(dim=(2, 3)).argmax(dim=1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"inputs": self.images[i], "labels": self.labels[i]}


class Classifier(BaseModel):
    """A tiny mmengine model: forward(mode="loss") returns its losses, as mmengine wants."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(16, 3),
        )

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor, mode: str = "loss"):
        logits = self.net(inputs)
        if mode == "loss":
            return {"loss": F.cross_entropy(logits.float(), labels)}
        return logits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="training iterations")
    parser.add_argument("--dtype", default="float16", help="autocast dtype (float16 shows the loss scale)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, npu, ... (default: auto)")
    parser.add_argument("--accum", type=int, default=2, help="accumulative_counts")
    parser.add_argument("--log-every", type=int, default=10, help="LoggerHook interval")
    parser.add_argument("--scoped-name", action="store_true",
                        help='name the wrapper "hwoptim.AmpOptimWrapper" instead of giving the class')
    parser.add_argument("--work-dir", default=None, help="where the Runner writes (default: a temp dir)")
    parser.add_argument("--checkpoint-every", type=int, default=None,
                        help="CheckpointHook interval in iterations (default: at the end)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint in --work-dir")
    args = parser.parse_args(argv)

    if args.scoped_name:
        # what custom_imports=dict(imports=["hwoptim.mmengine"]) does in a config file
        importlib.import_module("hwoptim.mmengine")
    optim_wrapper = dict(
        # The one line that changes: mmengine's type="AmpOptimWrapper" becomes hwoptim's.
        type="hwoptim.AmpOptimWrapper" if args.scoped_name else hwoptim.AmpOptimWrapper,
        device=args.device,  # hwoptim only: where AMP runs ("auto" by default)
        dtype=args.dtype,
        optimizer=dict(type="AdamW", lr=3e-3, weight_decay=0.01),
        clip_grad=dict(max_norm=1.0),
        accumulative_counts=args.accum,
    )
    if args.resume and args.work_dir is None:
        parser.error("--resume needs the --work-dir of the run to continue")
    # Resuming needs no TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD: with hwoptim.mmengine imported (the
    # wrapper's constructor imports it), mmengine loads its checkpoints with torch's safe
    # loading on, allowing only what they hold (docs/migrating-from-mmengine.md).
    # mmengine's schedulers warn when an iteration ends without an optimizer step, as every
    # accumulating one does (with mmengine's own wrapper too); the schedule is still right.
    warnings.filterwarnings("ignore", message="Detected call of `scheduler.step()`")
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="hwoptim-mmengine-")
    runner = Runner(
        model=dict(type=Classifier),  # built by the Runner once it has seeded: runs repeat
        work_dir=work_dir,
        train_dataloader=dict(
            dataset=Colours(), batch_size=16, num_workers=0,
            sampler=dict(type="DefaultSampler", shuffle=True), collate_fn=dict(type="default_collate"),
        ),
        train_cfg=dict(by_epoch=False, max_iters=args.steps),
        optim_wrapper=optim_wrapper,
        param_scheduler=dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=20),
        default_hooks=dict(
            logger=dict(type="LoggerHook", interval=args.log_every),
            checkpoint=dict(type="CheckpointHook", interval=args.checkpoint_every or args.steps,
                            by_epoch=False),
        ),
        resume=args.resume,
        log_processor=dict(by_epoch=False),
        randomness=dict(seed=0),
    )
    runner.train()

    wrapper = runner.optim_wrapper
    hub = runner.message_hub
    line = f"done: {runner.iter} iterations, {type(wrapper).__name__} on {wrapper.device}"
    line += f" ({str(wrapper.cast_dtype).replace('torch.', '')})"
    if "train/grad_norm" in hub.log_scalars:
        line += f", last grad_norm {hub.get_scalar('train/grad_norm').current():.3f}"
    if "train/loss_scale" in hub.log_scalars:
        line += f", loss_scale {hub.get_scalar('train/loss_scale').current():g}"
    print(line)
    print(f"checkpoint: {os.path.join(work_dir, f'iter_{runner.iter}.pth')}")


if __name__ == "__main__":
    main()
