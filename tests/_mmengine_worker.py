"""The model, data and Runner settings of tests/test_mmengine.py, and the scenarios each
rank of its distributed tests runs (mmengine's Runner and FlexibleRunner, 2 gloo ranks).

tests/_dist_harness.py starts the ranks and makes each scenario's process group (a file
store in the test's folder, no TCP port). The group exists before the Runner is built, so
the Runner (``launcher="pytorch"``) and DDPStrategy use it instead of calling init_dist;
everything else is the Runner's own distributed path (MMDistributedDataParallel,
DefaultSampler splitting the data by rank).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, MODELS
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from hwoptim.mmengine import ItemWeightedTrainStep

IN, OUT = 4, 2
#: samples in the data set; with BATCH per iteration: ITERS iterations per epoch
SAMPLES, BATCH = 40, 4
ITERS = SAMPLES // BATCH


@DATASETS.register_module(name="HwoptimTestData", force=True)
class Data(Dataset):  # type: ignore[type-arg]
    """SAMPLES fixed random (x, y) pairs, as dicts as mmengine's collate expects."""

    def __init__(self, samples: int = SAMPLES) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(samples, IN, generator=g)
        self.y = torch.randn(samples, OUT, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


@MODELS.register_module(name="HwoptimTestNet", force=True)
class Net(BaseModel):
    """Two linear layers; records the dtype its forward computed in (autocast shows there)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(IN, 8)
        self.fc2 = nn.Linear(8, OUT)
        self.forward_dtypes: list[torch.dtype] = []

    def forward(self, x: torch.Tensor, y: torch.Tensor, mode: str = "loss") -> Any:
        out = self.fc2(torch.tanh(self.fc1(x)))
        self.forward_dtypes.append(out.dtype)
        if mode == "loss":
            return {"loss": F.mse_loss(out.float(), y)}
        return [out]


@MODELS.register_module(name="HwoptimTestGAN", force=True)
class GAN(BaseModel):
    """Two parts with an optimizer each, trained in turn by a GAN-style train_step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.generator = nn.Linear(IN, OUT)
        self.discriminator = nn.Sequential(nn.Linear(OUT, 4), nn.Tanh(), nn.Linear(4, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor, mode: str = "tensor") -> Any:
        return self.generator(x)

    def train_step(self, data: Any, optim_wrapper: Any) -> dict[str, torch.Tensor]:
        data = self.data_preprocessor(data, True)
        x, y = data["x"], data["y"]
        d_wrapper, g_wrapper = optim_wrapper["discriminator"], optim_wrapper["generator"]
        with d_wrapper.optim_context(self.discriminator):
            fake = self.generator(x).detach()
            d_loss = F.softplus(self.discriminator(fake)).mean() + F.softplus(-self.discriminator(y)).mean()
        d_wrapper.update_params(d_loss)
        with g_wrapper.optim_context(self.generator):
            g_loss = F.softplus(-self.discriminator(self.generator(x))).mean()
        g_wrapper.update_params(g_loss)
        return {"loss_d": d_loss.detach(), "loss_g": g_loss.detach()}


class ItemData(Data):
    """Data with a 0/1 mask per output: the items, 0 to OUT per sample, so that batches and
    windows hold different numbers of items."""

    def __init__(self, samples: int = SAMPLES) -> None:
        super().__init__(samples)
        g = torch.Generator().manual_seed(1)
        self.mask = (torch.rand(samples, OUT, generator=g) < torch.rand(samples, 1, generator=g)).float()

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i], "mask": self.mask[i]}


class ItemNet(ItemWeightedTrainStep, Net):
    """Net whose loss is the sum of the squared errors of the masked-in outputs (the items),
    returned with their count: hwoptim.mmengine's item-weighted train_step."""

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None,
                mode: str = "loss") -> Any:
        out = self.fc2(torch.tanh(self.fc1(x)))
        if mode == "loss":
            assert mask is not None
            return {"loss": item_losses(out, y, mask).sum(), "num_items": mask.sum().long()}
        return [out]


def item_losses(out: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (out.float() - y) ** 2 * mask


def item_weighted_reference(iters: int, accumulate: int) -> tuple[list[torch.Tensor], list[float], list[float]]:
    """Plain torch: per window, the sum of its item losses over its item count; clip, step.
    Returns the parameters, and per update the item loss and the gradient norm."""
    model = ItemNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = list(torch.utils.data.DataLoader(ItemData(), batch_size=4, shuffle=False))[:iters]
    item_loss, norms = [], []
    for start in range(0, iters, accumulate):
        window = batches[start:start + accumulate]
        total = sum(item_losses(model(b["x"], b["y"], mode="tensor")[0], b["y"], b["mask"]).sum()
                    for b in window)
        count = sum(b["mask"].sum() for b in window)
        optimizer.zero_grad()
        (total / count).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)))
        optimizer.step()
        item_loss.append(float(total.detach() / count))
    return params_of(model), item_loss, norms


def dataloader(batch_size: int = BATCH, samples: int = SAMPLES, dataset: Any = None) -> dict[str, Any]:
    return dict(
        dataset=Data(samples) if dataset is None else dataset,
        sampler=dict(type="DefaultSampler", shuffle=False),
        batch_size=batch_size,
        num_workers=0,
        collate_fn=dict(type="default_collate"),
    )


def runner_kwargs(work_dir: Path, **overrides: Any) -> dict[str, Any]:
    """Runner arguments for a quiet run of Net: no checkpoints, no logger, unless overridden."""
    kwargs: dict[str, Any] = dict(
        model=Net(),
        work_dir=str(work_dir),
        experiment_name=f"run-{uuid.uuid4().hex[:8]}",  # each Runner its own MessageHub
        train_dataloader=dataloader(),
        train_cfg=dict(by_epoch=False, max_iters=ITERS),
        default_hooks=dict(logger=None, checkpoint=None),
        log_level="ERROR",
        default_scope="mmengine",
    )
    kwargs.update(overrides)
    return kwargs


def params_of(model: nn.Module) -> list[torch.Tensor]:
    module = getattr(model, "module", model)
    return [p.detach().clone() for p in module.parameters()]


# -- distributed: what each rank runs ---------------------------------------------------------

WORLD_SIZE = 2
#: iterations of the distributed runs and their window: 7 % 3 != 0, a last window of one
DIST_ITERS, DIST_ACC = 7, 3
#: the micro-batches that end a window and so must all-reduce: 3, 6 and 7
DIST_SYNCED = [False, False, True, False, False, True, True]


def dist_optim_wrapper() -> dict[str, Any]:
    return dict(
        type="hwoptim.OptimWrapper",
        optimizer=dict(type="SGD", lr=0.1, momentum=0.9),
        accumulative_counts=DIST_ACC,
        clip_grad=dict(max_norm=0.5),
    )


def _count_allreduces(ddp: Any) -> list[int]:
    """Count the gradient all-reduces of ``ddp`` through a comm hook (every bucket passes)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    calls = [0]

    def counting_allreduce(state, bucket):  # type: ignore[no-untyped-def]  # DDP checks annotations
        calls[0] += 1
        return default_hooks.allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting_allreduce)
    return calls


def _record_collectives(calls: list[int]) -> tuple[Any, list[int]]:
    """A hook recording how many all-reduces each training iteration made."""
    from mmengine.hooks import Hook

    per_iter: list[int] = []

    class CountPerIteration(Hook):
        priority = "LOWEST"

        def before_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
            self._before = calls[0]

        def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None,
                             outputs: Any = None) -> None:
            per_iter.append(calls[0] - self._before)

    return CountPerIteration(), per_iter


def _as_launched(rank: int) -> None:
    """What torchrun gives each process, and the custom_imports of the configs."""
    import hwoptim.mmengine  # noqa: F401  # what custom_imports=dict(imports=["hwoptim.mmengine"]) does

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(dist.get_world_size()))


def _dist_runner(rank: int, workdir: Path) -> dict[str, Any]:
    from mmengine.runner import Runner

    _as_launched(rank)
    runner = Runner(**runner_kwargs(
        workdir / "runner",
        train_dataloader=dataloader(batch_size=BATCH // WORLD_SIZE),
        train_cfg=dict(by_epoch=False, max_iters=DIST_ITERS),
        optim_wrapper=dist_optim_wrapper(),
        launcher="pytorch",
        # DDP over a CPU module takes no device_ids; the Runner's default passes LOCAL_RANK
        cfg=dict(model_wrapper_cfg=dict(type="MMDistributedDataParallel", device_ids=None)),
        experiment_name="dist-runner",
    ))
    calls = _count_allreduces(runner.model)
    hook, per_iter = _record_collectives(calls)
    runner.register_hook(hook)
    runner.train()
    return {
        "model_type": type(runner.model).__name__,
        "collectives": per_iter,
        "params": params_of(runner.model),
        "grad_norm": runner.message_hub.get_scalar("train/grad_norm").data[0].tolist(),
    }


def _dist_flexible(rank: int, workdir: Path) -> dict[str, Any]:
    from mmengine.runner import FlexibleRunner

    _as_launched(rank)
    runner = FlexibleRunner(
        model=Net(),
        work_dir=str(workdir / "flexible"),
        experiment_name="dist-flexible",
        train_dataloader=dataloader(batch_size=BATCH // WORLD_SIZE),
        train_cfg=dict(by_epoch=False, max_iters=DIST_ITERS),
        optim_wrapper=dist_optim_wrapper(),
        strategy=dict(type="DDPStrategy",
                      model_wrapper=dict(type="MMDistributedDataParallel", device_ids=None)),
        launcher="pytorch",
        default_hooks=dict(logger=None, checkpoint=None),
        log_level="ERROR",
    )
    # the strategy wraps the model in train(): count from its first forward on
    from mmengine.hooks import Hook

    per_iter: list[int] = []

    class CountPerIteration(Hook):
        priority = "LOWEST"

        def before_train(self, runner: Any) -> None:
            self.calls = _count_allreduces(runner.model)

        def before_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
            self._before = self.calls[0]

        def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None,
                             outputs: Any = None) -> None:
            per_iter.append(self.calls[0] - self._before)

    runner.register_hook(CountPerIteration())
    runner.train()
    return {
        "model_type": type(runner.model).__name__,
        "optim_wrapper_type": f"{type(runner.optim_wrapper).__module__}.{type(runner.optim_wrapper).__name__}",
        "collectives": per_iter,
        "params": params_of(runner.model),
    }


def _dist_items(rank: int, workdir: Path) -> dict[str, Any]:
    """ItemNet under the Runner with hwoptim's item-weighted DDP wrapper."""
    from mmengine.runner import Runner

    _as_launched(rank)
    runner = Runner(**runner_kwargs(
        workdir / "items",
        model=ItemNet(),
        train_dataloader=dataloader(batch_size=BATCH // WORLD_SIZE, dataset=ItemData()),
        train_cfg=dict(by_epoch=False, max_iters=DIST_ITERS),
        optim_wrapper=dist_optim_wrapper(),
        launcher="pytorch",
        cfg=dict(model_wrapper_cfg=dict(type="hwoptim.ItemWeightedDistributedDataParallel",
                                        device_ids=None)),
        experiment_name="dist-items",
    ))
    calls = _count_allreduces(runner.model)
    hook, per_iter = _record_collectives(calls)
    runner.register_hook(hook)
    runner.train()
    return {
        "model_type": type(runner.model).__name__,
        "collectives": per_iter,
        "params": params_of(runner.model),
        "item_loss": runner.message_hub.get_scalar("train/item_loss").data[0].tolist(),
    }


def _dist_items_flexible(rank: int, workdir: Path) -> dict[str, Any]:
    """ItemNet under FlexibleRunner's DDPStrategy with hwoptim's item-weighted DDP wrapper."""
    from mmengine.runner import FlexibleRunner

    _as_launched(rank)
    runner = FlexibleRunner(
        model=ItemNet(),
        work_dir=str(workdir / "items-flexible"),
        experiment_name="dist-items-flexible",
        train_dataloader=dataloader(batch_size=BATCH // WORLD_SIZE, dataset=ItemData()),
        train_cfg=dict(by_epoch=False, max_iters=DIST_ITERS),
        optim_wrapper=dist_optim_wrapper(),
        strategy=dict(type="DDPStrategy", model_wrapper=dict(
            type="hwoptim.ItemWeightedDistributedDataParallel", device_ids=None)),
        launcher="pytorch",
        default_hooks=dict(logger=None, checkpoint=None),
        log_level="ERROR",
    )
    runner.train()
    return {
        "model_type": type(runner.model).__name__,
        "params": params_of(runner.model),
        "item_loss": runner.message_hub.get_scalar("train/item_loss").data[0].tolist(),
    }


SCENARIOS = {"runner": _dist_runner, "flexible": _dist_flexible, "items": _dist_items,
             "items-flexible": _dist_items_flexible}


class StopAfter(Hook):
    """Ends a run after ``iters`` iterations, after the checkpoint of that iteration."""

    priority = "LOWEST"

    def __init__(self, iters: int) -> None:
        self.iters = iters

    def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None,
                         outputs: Any = None) -> None:
        if runner.iter + 1 == self.iters:
            raise KeyboardInterrupt("stopped on purpose")
