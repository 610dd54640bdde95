"""What each rank of tests/test_distributed_checkpoint.py runs: sharded (DCP) checkpoints
under FSDP2 and HSDP on gloo (tests/_dist_harness.py starts the ranks).

Three launches share one folder: 2 ranks (``SCENARIOS_2``), then 4 (``SCENARIOS_4``: they
load what the 2 ranks saved), then 2 again (``SCENARIOS_2_AFTER``: they load what the 4
saved). A mid-window scenario trains three runs of the same model and data:

- ``saver``: checkpoints after micro-batch ``SAVE_AT`` (inside a window) and trains on;
- ``resumed``: a fresh model, optimizer and wrapper loading that checkpoint, trained on;
- ``plain``: the same micro-batches, no checkpoint.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from _dist_worker import batch, hsdp_model, items_batch, items_loss, loss_fn, make_model, params_of
from torch import nn

from hwoptim import AmpOptimWrapper, OptimWrapper

#: 11 micro-batches in windows of 3; the checkpoint after 4 falls inside the second window
N_ITERS, ACC, SAVE_AT = 11, 3, 4
#: the resharding runs: a checkpoint at the end of the window after micro-batch 6
RESHARD_AT = 6
#: rows of a global micro-batch, split over the ranks in the resharding runs
GLOBAL_ROWS = 8


def fsdp2_model() -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for module in (model[0], model[2], model):
        fully_shard(module)
    return model


def make_wrapper(model: nn.Module, precision: str, acc: int = ACC) -> OptimWrapper:
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    if precision == "fp16":
        # a high first scale: the first update(s) overflow and are skipped, then it backs off
        return AmpOptimWrapper(
            optimizer, device="cpu", dtype=torch.float16, use_fsdp=True, accumulative_counts=acc,
            clip_grad=dict(max_norm=0.5), save_partial_grads=True, loss_scale=dict(init_scale=2.0**19),
        )
    return OptimWrapper(optimizer, accumulative_counts=acc, clip_grad=dict(max_norm=0.5), save_partial_grads=True)


def step(wrapper: OptimWrapper, model: nn.Module, i: int, rank: int, items: bool) -> None:
    if items:
        x, y = items_batch(i, rank)
        with wrapper.optim_context(model):
            loss = items_loss(model(x), y)
        wrapper.update_params(loss, num_items=len(x))
    else:
        x, y = batch(i, rank)
        with wrapper.optim_context(model):
            loss = loss_fn(model(x), y)
        wrapper.update_params(loss)


def state_of(model: nn.Module, wrapper: OptimWrapper) -> dict[str, Any]:
    scale = wrapper.loss_scale
    skipped = wrapper.skipped_steps
    return {
        "params": params_of(model),
        "inner": wrapper.inner_count,
        "scale": None if scale is None else float(scale),
        "skipped": None if skipped is None else float(skipped),
    }


def mid_window(make: Callable[[], nn.Module], precision: str, items: bool, folder: Path, name: str,
               async_save: bool = False) -> dict[str, Any]:
    rank = dist.get_rank()
    path = folder / f"ckpt-{name}"
    # the saver: train, checkpoint inside the window, train on
    model = make()
    wrapper = make_wrapper(model, precision)
    wrapper.initialize_count_status(model, 0, N_ITERS)
    for i in range(SAVE_AT):
        step(wrapper, model, i, rank, items)
    saved = wrapper.save_sharded(path, model, async_save=async_save)
    for i in range(SAVE_AT, N_ITERS):  # an async save is written meanwhile
        step(wrapper, model, i, rank, items)
    if async_save:
        assert saved is not None
        saved.result(timeout=60)
    saver = state_of(model, wrapper)
    # the resumed run: a fresh process would build the same and load
    model = make()
    wrapper = make_wrapper(model, precision)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapper.load_sharded(path, model)
        wrapper.initialize_count_status(model, SAVE_AT, N_ITERS)
    for i in range(SAVE_AT, N_ITERS):
        step(wrapper, model, i, rank, items)
    resumed = state_of(model, wrapper)
    # the same micro-batches without a checkpoint
    model = make()
    wrapper = make_wrapper(model, precision)
    wrapper.initialize_count_status(model, 0, N_ITERS)
    for i in range(N_ITERS):
        step(wrapper, model, i, rank, items)
    return {"saver": saver, "resumed": resumed, "plain": state_of(model, wrapper),
            "warnings": [str(w.message) for w in caught]}


def _error(call: Callable[[], Any]) -> str:
    try:
        call()
    except (ValueError, FileNotFoundError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def bad_checkpoints(folder: Path) -> dict[str, Any]:
    """Damaged and foreign checkpoints: each refused, the model and wrapper untouched."""
    import torch.distributed.checkpoint as dcp

    rank = dist.get_rank()
    model = fsdp2_model()
    wrapper = make_wrapper(model, "fp32")
    wrapper.initialize_count_status(model, 0, N_ITERS)
    for i in range(SAVE_AT):
        step(wrapper, model, i, rank, False)
    good = folder / "bad-good"
    wrapper.save_sharded(good, model)
    # a DCP checkpoint of the model alone
    foreign = folder / "bad-foreign"
    dcp.save({"model": model.state_dict()}, checkpoint_id=foreign)
    # copies of the good one, damaged by rank 0
    import shutil

    corrupted, truncated = folder / "bad-corrupted", folder / "bad-truncated"
    if rank == 0:
        for copy in (corrupted, truncated):
            shutil.copytree(good, copy)
        shard = corrupted / "__1_0.distcp"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x40
        shard.write_bytes(bytes(data))
        shard = truncated / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[:-100])
    dist.barrier()

    model2 = fsdp2_model()
    fresh = make_wrapper(model2, "fp32")
    before = params_of(model2)
    errors = {
        "corrupted": _error(lambda: fresh.load_sharded(corrupted, model2)),
        "truncated": _error(lambda: fresh.load_sharded(truncated, model2)),
        "foreign": _error(lambda: fresh.load_sharded(foreign, model2)),
        "no_checkpoint": _error(lambda: fresh.load_sharded(folder / "bad-nothing", model2)),
    }
    other_acc = make_wrapper(model2, "fp32", acc=2)
    errors["other_acc"] = _error(lambda: other_acc.load_sharded(good, model2))
    unchanged = all(torch.equal(a, b) for a, b in zip(before, params_of(model2)))
    # another model: one more layer (2 parameters, 6 AdamW states), refused once its
    # template is built (torch made a state for the fresh optimizer: undone)
    from torch.distributed.fsdp import fully_shard

    bigger = nn.Sequential(*make_model(), nn.Tanh(), nn.Linear(3, 3))
    for module in (bigger[0], bigger[2], bigger[4], bigger):
        fully_shard(module)
    other_model = make_wrapper(bigger, "fp32")
    errors["other_model"] = _error(lambda: other_model.load_sharded(good, bigger))
    return {"errors": errors, "unchanged": unchanged, "inner": fresh.inner_count,
            "optimizer_state": len(fresh.optimizer.state) + len(other_model.optimizer.state),
            "grads": [p.grad is None for p in [*model2.parameters(), *bigger.parameters()]]}


# -- resharding: a window-end checkpoint on one number of ranks, loaded on another ----------


def global_step(wrapper: OptimWrapper, model: nn.Module, i: int) -> None:
    """This rank's share of global micro-batch ``i``: the same data on any number of ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(7000 + i)
    x, y = torch.randn(GLOBAL_ROWS, 4, generator=g), torch.randn(GLOBAL_ROWS, 3, generator=g)
    rows = GLOBAL_ROWS // world
    x, y = x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]
    with wrapper.optim_context(model):
        loss = loss_fn(model(x), y)
    wrapper.update_params(loss)


def reshard_save(folder: Path) -> dict[str, Any]:
    """Train to the window's end, checkpoint, train a window on; checkpoint mid-window too."""
    world = dist.get_world_size()
    model = fsdp2_model()
    wrapper = make_wrapper(model, "fp32")
    wrapper.initialize_count_status(model, 0, N_ITERS)
    for i in range(RESHARD_AT):
        global_step(wrapper, model, i)
    wrapper.save_sharded(folder / f"reshard-{world}", model)
    at_save = params_of(model)
    global_step(wrapper, model, RESHARD_AT)
    wrapper.save_sharded(folder / f"reshard-mid-{world}", model)
    for i in range(RESHARD_AT + 1, RESHARD_AT + ACC):
        global_step(wrapper, model, i)
    return {"at_save": at_save, "after": params_of(model)}


def reshard_load(folder: Path, saved_on: int) -> dict[str, Any]:
    model = fsdp2_model()
    wrapper = make_wrapper(model, "fp32")
    wrapper.load_sharded(folder / f"reshard-{saved_on}", model)
    loaded = params_of(model)
    exp_avg = [s["exp_avg"].full_tensor() for s in wrapper.optimizer.state.values()]
    wrapper.initialize_count_status(model, RESHARD_AT, N_ITERS)
    inner = wrapper.inner_count
    for i in range(RESHARD_AT, RESHARD_AT + ACC):
        global_step(wrapper, model, i)
    fresh = make_wrapper(fsdp2_model(), "fp32")
    mid = _error(lambda: fresh.load_sharded(folder / f"reshard-mid-{saved_on}", model))
    return {"loaded": loaded, "after": params_of(model), "inner": inner, "exp_avg": exp_avg, "mid_error": mid}


def reshard_reference(folder: Path) -> dict[str, Any]:
    """The optimizer state at the save, as the saving ranks see it (for the loaders)."""
    model = fsdp2_model()
    wrapper = make_wrapper(model, "fp32")
    wrapper.load_sharded(folder / f"reshard-{dist.get_world_size()}", model)
    return {"exp_avg": [s["exp_avg"].full_tensor() for s in wrapper.optimizer.state.values()]}


SCENARIOS_2: dict[str, Callable[[int, Path], Any]] = {
    "fsdp2_fp32": lambda r, f: mid_window(fsdp2_model, "fp32", False, f, "fsdp2_fp32"),
    "fsdp2_fp16": lambda r, f: mid_window(fsdp2_model, "fp16", False, f, "fsdp2_fp16"),
    "fsdp2_items": lambda r, f: mid_window(fsdp2_model, "fp32", True, f, "fsdp2_items"),
    "fsdp2_async": lambda r, f: mid_window(fsdp2_model, "fp32", False, f, "fsdp2_async", async_save=True),
    "fsdp2_bad": lambda r, f: bad_checkpoints(f),
    "fsdp2_reshard_save_2": lambda r, f: reshard_save(f),
    "fsdp2_reshard_ref_2": lambda r, f: reshard_reference(f),
}
SCENARIOS_4: dict[str, Callable[[int, Path], Any]] = {
    "hsdp_fp32": lambda r, f: mid_window(hsdp_model, "fp32", False, f, "hsdp_fp32"),
    "hsdp_fp16": lambda r, f: mid_window(hsdp_model, "fp16", False, f, "hsdp_fp16"),
    "fsdp2_items_4": lambda r, f: mid_window(fsdp2_model, "fp32", True, f, "fsdp2_items_4"),
    "fsdp2_reshard_load_2to4": lambda r, f: reshard_load(f, 2),
    "fsdp2_reshard_save_4": lambda r, f: reshard_save(f),
    "fsdp2_reshard_ref_4": lambda r, f: reshard_reference(f),
}
SCENARIOS_2_AFTER: dict[str, Callable[[int, Path], Any]] = {
    "fsdp2_reshard_load_4to2": lambda r, f: reshard_load(f, 4),
}
SCENARIOS = {**SCENARIOS_2, **SCENARIOS_4, **SCENARIOS_2_AFTER}
