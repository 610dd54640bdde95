"""What each rank of tests/test_distributed.py runs: training scenarios under real
torch.distributed (gloo on CPU, 2 ranks), and the model, data and reference the tests
share. tests/_dist_harness.py starts the ranks and runs the scenarios, each on its own.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from _dist_harness import (
    REDUCE_SCATTER,
    counting,
    counting_reduce_scatter,
    ddp_with_counter,
    launch,
    runnable,
)
from torch import nn
from torch.nn import functional as F

from hwoptim import AmpOptimWrapper, OptimWrapper, get_backend

WORLD_SIZE = 2
IN, HIDDEN, OUT, BATCH = 4, 8, 3, 4
#: iterations and window: 7 is not a multiple of 3, so the last window holds one micro-batch
N_ITERS, ACC = 7, 3
#: micro-batches that end a window (and so must synchronise): 3, 6 and the last, 7
SYNCED = [False, False, True, False, False, True, True]
CLIP = dict(max_norm=0.5)
#: the iteration at which one rank's gradient shard is made inf in the overflow scenarios
INF_AT, INF_RANK, INF_ITERS = 2, 1, 4


# -- shared by the workers and the single-process references in the tests -----------------------


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))


def batch(i: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s micro-batch of iteration ``i`` (deterministic)."""
    g = torch.Generator().manual_seed(1000 * i + rank)
    return torch.randn(BATCH, IN, generator=g), torch.randn(BATCH, OUT, generator=g)


def items_batch(i: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch of 1 to 5 rows, its size varying with the iteration and the rank: the
    item-weighted (num_items) scenarios."""
    rows = 1 + (7 * i + 3 * rank) % 5
    g = torch.Generator().manual_seed(5000 + 1000 * i + rank)
    return torch.randn(rows, IN, generator=g), torch.randn(rows, OUT, generator=g)


def items_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The sum over rows (the items) of each row's mean squared error."""
    return F.mse_loss(out.float(), y, reduction="none").mean(dim=1).sum()


def global_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' micro-batches of iteration ``i``, concatenated: what one process sees."""
    xs, ys = zip(*(batch(i, r) for r in range(WORLD_SIZE)))
    return torch.cat(xs), torch.cat(ys)


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out.float(), y)


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def fused_adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)


def train(
    wrapper: OptimWrapper,
    model: Any,
    iters: Sequence[int],
    rank: int | None,
    pattern: str = "mmengine",
    collectives: Callable[[], int] | None = None,
) -> list[int]:
    """Train over ``iters``; ``rank=None`` means one process on the concatenated batches.

    pattern "mmengine": the forward inside ``optim_context``, ``update_params`` after it
    (how mmengine's models call it); "inside": the whole body inside the block. Returns
    how many collectives each micro-batch issued (when ``collectives`` counts them).
    """
    counts = []
    for i in iters:
        x, y = global_batch(i) if rank is None else batch(i, rank)
        before = collectives() if collectives else 0
        if pattern == "mmengine":
            with wrapper.optim_context(model):
                loss = loss_fn(model(x), y)
            wrapper.update_params(loss)
        elif pattern == "inside":
            with wrapper.optim_context(model):
                wrapper.update_params(loss_fn(model(x), y))
        else:
            raise ValueError(f"pattern must be 'mmengine' or 'inside'; got {pattern!r}")
        counts.append((collectives() if collectives else 0) - before)
    return counts


def params_of(model: nn.Module) -> list[torch.Tensor]:
    """Full (unsharded) copies of the parameters, DTensors gathered."""
    out = []
    for p in model.parameters():
        full = getattr(p, "full_tensor", None)
        out.append((full() if full is not None else p).detach().clone())
    return out


def fsdp2_model(shard_root: bool = True) -> nn.Sequential:
    """make_model() with each Linear fully_shard'ed, and the root too unless told not to."""
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    fully_shard(model[0])
    fully_shard(model[2])
    if shard_root:
        fully_shard(model)
    return model


def hsdp_model(shape: tuple[int, int] = (2, 2)) -> nn.Sequential:
    """make_model() under HSDP: replicated over the mesh's first dimension, sharded over
    its second (each Linear and the root)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
    model = make_model()
    for module in (model[0], model[2], model):
        fully_shard(module, mesh=mesh)
    return model


# -- scenarios: each returns what the tests assert on -------------------------------------------


def _ddp_accumulation(rank: int, pattern: str, compiled: bool = False) -> dict[str, Any]:
    ddp, calls = ddp_with_counter(make_model())
    runner = torch.compile(ddp, backend="eager") if compiled else ddp
    wrapper = OptimWrapper(sgd(ddp), accumulative_counts=ACC)
    wrapper.initialize_count_status(runner, 0, N_ITERS)
    counts = train(wrapper, runner, range(N_ITERS), rank, pattern, lambda: calls[0])
    return {"collectives": counts, "params": params_of(ddp.module)}


def _fsdp2_accumulation(
    rank: int, pattern: str, shard_root: bool = True, compiled: bool = False
) -> dict[str, Any]:
    model = fsdp2_model(shard_root)
    runner = torch.compile(model, backend="eager") if compiled else model
    wrapper = OptimWrapper(sgd(model), accumulative_counts=ACC, clip_grad=CLIP)
    wrapper.initialize_count_status(runner, 0, N_ITERS)
    norms = []
    with counting_reduce_scatter() as calls:
        counts = []
        for i in range(N_ITERS):
            counts += train(wrapper, runner, [i], rank, pattern, lambda: calls[0])
            if SYNCED[i]:
                norms.append(wrapper.last_grad_norm)
        params = params_of(model)
        # After the loop synchronisation is back on: a plain backward reduce-scatters.
        before = calls[0]
        x, y = batch(99, rank)
        loss_fn(runner(x), y).backward()
        after_loop = calls[0] - before
    return {
        "collectives": counts,
        "after_loop": after_loop,
        "params": params,
        "norm_types": [type(n).__name__ for n in norms],
        "norms": [n.detach().clone() for n in norms],
    }


def _fsdp2_error_inside_no_sync(rank: int) -> dict[str, Any]:
    """A user's error inside ``Backend.no_sync()`` (called directly, not by the wrapper):
    the next backward outside it must reduce-scatter again, for every shard."""
    model = fsdp2_model()
    with counting_reduce_scatter() as calls:
        x, y = batch(0, rank)
        try:
            with get_backend("cpu").no_sync(model):
                loss_fn(model(x), y).backward()
                raise RuntimeError("the user's error inside the skip")
        except RuntimeError:
            pass
        skipped = calls[0]
        x, y = batch(1, rank)
        loss_fn(model(x), y).backward()
    return {"inside": skipped, "after_error": calls[0] - skipped}


def _train_items(
    wrapper: OptimWrapper, model: Any, rank: int, as_int: bool,
    grad_collectives: Callable[[], int], all_reduces: list[int], one_element: bool = False,
) -> dict[str, Any]:
    """N_ITERS micro-batches of items_batch with num_items, mmengine's calling pattern;
    ``one_element``: the loss and the tensor count of shape (1,) instead of 0-dim."""
    wrapper.initialize_count_status(model, 0, N_ITERS)
    record: dict[str, Any] = {"grad_collectives": [], "all_reduces": [], "last_loss": []}
    for i in range(N_ITERS):
        x, y = items_batch(i, rank)
        grads_before, reduces_before = grad_collectives(), all_reduces[0]
        with wrapper.optim_context(model):
            loss = items_loss(model(x), y)
        count = torch.tensor([len(x)] if one_element else len(x))
        if one_element:
            loss = loss.reshape(1)
        wrapper.update_params(loss, num_items=len(x) if as_int else count)
        record["grad_collectives"].append(grad_collectives() - grads_before)
        record["all_reduces"].append(all_reduces[0] - reduces_before)
        if SYNCED[i]:
            record["last_loss"].append(wrapper.last_loss.detach().clone())
    return record


def _ddp_num_items(rank: int, one_element: bool = False) -> dict[str, Any]:
    ddp, calls = ddp_with_counter(make_model())
    wrapper = OptimWrapper(sgd(ddp), accumulative_counts=ACC, clip_grad=CLIP)
    with counting("all_reduce") as all_reduces:
        record = _train_items(
            wrapper, ddp, rank, not one_element, lambda: calls[0], all_reduces, one_element
        )
    record["params"] = params_of(ddp.module)
    return record


def _fsdp2_num_items(rank: int, hsdp: bool = False) -> dict[str, Any]:
    # HSDP: replicate over the 2 ranks, shard over 1: HSDP's two groups, on 2 processes
    model = hsdp_model((WORLD_SIZE, 1)) if hsdp else fsdp2_model()
    wrapper = OptimWrapper(sgd(model), accumulative_counts=ACC, clip_grad=CLIP)
    with counting_reduce_scatter() as scatters, counting("all_reduce") as all_reduces:
        record = _train_items(wrapper, model, rank, False, lambda: scatters[0], all_reduces)
    record["params"] = params_of(model)
    record["reduction"] = repr(wrapper._items.reduction)
    return record


def _fsdp2_fp16_num_items(rank: int) -> dict[str, Any]:
    """fp16 autocast and the sharded loss scaler: the division runs on scaled gradients,
    before the unscale and the clip."""
    model = fsdp2_model()
    wrapper = AmpOptimWrapper(
        sgd(model), device="cpu", dtype="float16", loss_scale=dict(init_scale=256.0),
        use_fsdp=True, accumulative_counts=ACC, clip_grad=CLIP,
    )
    with counting_reduce_scatter() as scatters, counting("all_reduce") as all_reduces:
        record = _train_items(wrapper, model, rank, False, lambda: scatters[0], all_reduces)
    record["params"] = params_of(model)
    record["skipped"] = float(wrapper.skipped_steps)
    return record


def _poison_local_shard(model: nn.Module) -> None:
    """Make one element of this rank's gradient shard inf, as an fp16 overflow would."""
    grad = next(model.parameters()).grad
    local = grad.to_local() if hasattr(grad, "to_local") else grad
    local.view(-1)[0] = float("inf")


def _step_with_overflow(
    wrapper: OptimWrapper, model: nn.Module, rank: int
) -> dict[str, list[Any]]:
    """INF_ITERS updates; at INF_AT, rank INF_RANK's gradient shard holds an inf."""
    record: dict[str, list[Any]] = {"changed": [], "scales": [], "norms": []}
    for i in range(INF_ITERS):
        x, y = batch(i, rank)
        with wrapper.optim_context(model):
            loss = loss_fn(model(x), y)
        wrapper.backward(wrapper.scale_loss(loss))
        if i == INF_AT and rank == INF_RANK:
            _poison_local_shard(model)
        before = params_of(model)
        wrapper.step()
        wrapper.zero_grad()
        after = params_of(model)
        record["changed"].append(any(not torch.equal(b, a) for b, a in zip(before, after)))
        scale = getattr(wrapper, "loss_scale", None)
        record["scales"].append(None if scale is None else float(scale))
        norm = wrapper.last_grad_norm
        record["norms"].append((type(norm).__name__, float(norm)))
    return record


def _fsdp2_fp16_sharded_scaler(rank: int) -> dict[str, Any]:
    model = fsdp2_model()
    wrapper = AmpOptimWrapper(
        torch.optim.SGD(model.parameters(), lr=0.1),
        device="cpu",
        dtype="float16",
        # Small enough that fp16 gradients never overflow by themselves: the only
        # overflow is the one this scenario makes on purpose.
        loss_scale=dict(init_scale=256.0),
        use_fsdp=True,
        clip_grad=dict(max_norm=1.0),
    )
    record = _step_with_overflow(wrapper, model, rank)
    scaler = type(wrapper.loss_scaler)
    record["scaler"] = f"{scaler.__module__}.{scaler.__name__}"
    record["skipped"] = float(wrapper.skipped_steps)
    return record


def _fsdp2_fused_overflow(rank: int) -> dict[str, Any]:
    model = fsdp2_model()
    wrapper = OptimWrapper(fused_adamw(model), clip_grad=dict(max_norm=1.0))
    record = _step_with_overflow(wrapper, model, rank)
    record["skipped"] = float(wrapper.skipped_steps)
    record["params"] = params_of(model)
    return record


# Resume: an uninterrupted run, and the same run checkpointed after RESUME_AT iterations
# and finished by fresh processes (a second launch).
RESUME_ITERS, RESUME_ACC, RESUME_AT = 8, 3, 3


def _resume_setup(
    rank: int, save_partial_grads: bool = False, seed: int = 0
) -> tuple[nn.Module, nn.Module, AmpOptimWrapper]:
    model = make_model(seed)
    ddp, _ = ddp_with_counter(model)
    wrapper = AmpOptimWrapper(
        torch.optim.AdamW(model.parameters(), lr=0.01),
        device="cpu",
        dtype="float16",  # a dynamic loss scaler, whose state must survive the resume too
        accumulative_counts=RESUME_ACC,
        clip_grad=dict(max_norm=1.0),
        save_partial_grads=save_partial_grads,
    )
    return model, ddp, wrapper


def _ddp_uninterrupted(rank: int) -> dict[str, Any]:
    model, ddp, wrapper = _resume_setup(rank)
    wrapper.initialize_count_status(ddp, 0, RESUME_ITERS)
    train(wrapper, ddp, range(RESUME_ITERS), rank)
    return {"params": params_of(model), "scale": float(wrapper.loss_scale)}


def _ddp_checkpoint(rank: int, workdir: Path) -> dict[str, Any]:
    model, ddp, wrapper = _resume_setup(rank)
    wrapper.initialize_count_status(ddp, 0, RESUME_ITERS)
    train(wrapper, ddp, range(RESUME_AT), rank)
    if rank == 0:
        checkpoint = {"model": model.state_dict(), "optim": wrapper.state_dict()}
        torch.save(checkpoint, workdir / "ckpt.pt")
    return {"inner_count": wrapper.inner_count}


def _ddp_resumed(rank: int, workdir: Path) -> dict[str, Any]:
    checkpoint = torch.load(workdir / "ckpt.pt", weights_only=True)
    model = make_model(seed=123)  # other weights: the checkpoint must bring them back
    model.load_state_dict(checkpoint["model"])
    ddp, _ = ddp_with_counter(model)
    wrapper = AmpOptimWrapper(
        torch.optim.AdamW(model.parameters(), lr=0.01),
        device="cpu",
        dtype="float16",
        accumulative_counts=RESUME_ACC,
        clip_grad=dict(max_norm=1.0),
    )
    wrapper.load_state_dict(checkpoint["optim"])  # the counters come back with it
    resumed_at = wrapper.inner_count
    train(wrapper, ddp, range(RESUME_AT, RESUME_ITERS), rank)
    scale = float(wrapper.loss_scale)
    return {"params": params_of(model), "scale": scale, "resumed_at": resumed_at}


# The same, checkpointed inside a window (micro-batch RESUME_MID_AT of the window 3-5), each
# rank saving its own file: its partial gradients are its own (DDP does not all-reduce them).
RESUME_MID_AT = 5


def _ddp_checkpoint_mid(rank: int, workdir: Path) -> dict[str, Any]:
    model, ddp, wrapper = _resume_setup(rank, save_partial_grads=True)
    wrapper.initialize_count_status(ddp, 0, RESUME_ITERS)
    train(wrapper, ddp, range(RESUME_MID_AT), rank)
    state = wrapper.state_dict()
    torch.save({"model": model.state_dict(), "optim": state}, workdir / f"ckpt_mid.rank{rank}.pt")
    return {"saved_grads": len(state["hwoptim"]["grads"]), "grads_rank": state["hwoptim"]["grads_rank"]}


def _ddp_resumed_mid(rank: int, workdir: Path) -> dict[str, Any]:
    own = torch.load(workdir / f"ckpt_mid.rank{rank}.pt", weights_only=True)
    model, ddp, wrapper = _resume_setup(rank, save_partial_grads=True, seed=123)
    model.load_state_dict(own["model"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapper.load_state_dict(own["optim"])
        wrapper.initialize_count_status(ddp, RESUME_MID_AT, RESUME_ITERS)  # as mmengine does
    train(wrapper, ddp, range(RESUME_MID_AT, RESUME_ITERS), rank)
    # what mmengine's CheckpointHook leaves: rank 0's file only, loaded by every rank
    rank0 = torch.load(workdir / "ckpt_mid.rank0.pt", weights_only=True)
    _, _, other = _resume_setup(rank, save_partial_grads=True)
    with warnings.catch_warnings(record=True) as rank0_caught:
        warnings.simplefilter("always")
        other.load_state_dict(rank0["optim"])
    return {
        "params": params_of(model),
        "scale": float(wrapper.loss_scale),
        "warnings": [str(w.message) for w in caught],
        "rank0_file_warnings": [str(w.message) for w in rank0_caught],
        "rank0_file_grads": [p.grad is not None for p in other.optimizer.param_groups[0]["params"]],
    }


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_STEPS = 6


def _run_example(rank: int, name: str) -> dict[str, Any]:
    """Run examples/<name> in this rank, in the process group the launch already made.

    The example is run as written; only its init_process_group (which would read
    torchrun's environment) and destroy_process_group are recorded instead of run, so CI
    does not pay for a third set of processes. By hand:
    ``HWOPTIM_DEVICE=cpu torchrun --standalone --nproc-per-node 2 examples/ddp.py``.
    """
    import contextlib
    import io
    import runpy
    from unittest import mock

    namespace = runpy.run_path(str(EXAMPLES / name), run_name="hwoptim_example")
    inits: list[tuple[Any, ...]] = []
    out = io.StringIO()
    with mock.patch.dict(os.environ, {"HWOPTIM_DEVICE": "cpu", "LOCAL_RANK": str(rank)}), \
            mock.patch.object(dist, "init_process_group", lambda *a, **k: inits.append(a)), \
            mock.patch.object(dist, "destroy_process_group", lambda *a, **k: None), \
            contextlib.redirect_stdout(out):
        namespace["main"](["--steps", str(EXAMPLE_STEPS)])
    return {"stdout": out.getvalue(), "init_args": inits}


def fsdp1_gpu_rank(rank: int, world_size: int, store: str, out: str) -> None:
    """One rank of the real-GPU FSDP1 test: counts FSDP1's collectives per micro-batch."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    backend = get_backend("cuda")
    backend.set_device(rank)
    dist.init_process_group(
        backend.dist_backend, init_method=f"file://{store}", rank=rank, world_size=world_size
    )
    try:
        fsdp = FullyShardedDataParallel(make_model().to(backend.device()))
        wrapper = OptimWrapper(sgd(fsdp), accumulative_counts=ACC, clip_grad=CLIP)
        wrapper.initialize_count_status(fsdp, 0, N_ITERS)
        # FSDP1 reduces gradients through the same functions as FSDP2
        # (torch/distributed/fsdp/_runtime_utils.py), and its clip_grad_norm_ all-reduces.
        counts = []
        with counting(*REDUCE_SCATTER, "all_reduce") as calls:
            for i in range(N_ITERS):
                x, y = (t.to(backend.device()) for t in batch(i, rank))
                before = calls[0]
                with wrapper.optim_context(fsdp):
                    loss = loss_fn(fsdp(x), y)
                wrapper.update_params(loss)
                counts.append(calls[0] - before)
        state = {k: v.detach().cpu().clone() for k, v in fsdp.state_dict().items()}
        torch.save({"collectives": counts, "state": state}, Path(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


SCENARIOS: dict[str, Callable[[int, Path], dict[str, Any]]] = {
    "ddp_mmengine": lambda rank, _: _ddp_accumulation(rank, "mmengine"),
    "ddp_inside": lambda rank, _: _ddp_accumulation(rank, "inside"),
    "ddp_compiled": lambda rank, _: _ddp_accumulation(rank, "mmengine", compiled=True),
    "fsdp2_mmengine": lambda rank, _: _fsdp2_accumulation(rank, "mmengine"),
    "fsdp2_inside": lambda rank, _: _fsdp2_accumulation(rank, "inside"),
    "fsdp2_submodules": lambda rank, _: _fsdp2_accumulation(rank, "mmengine", shard_root=False),
    "fsdp2_compiled": lambda rank, _: _fsdp2_accumulation(rank, "mmengine", compiled=True),
    "fsdp2_error_inside_no_sync": lambda rank, _: _fsdp2_error_inside_no_sync(rank),
    "fsdp2_fp16_sharded_scaler": lambda rank, _: _fsdp2_fp16_sharded_scaler(rank),
    "fsdp2_fused_overflow": lambda rank, _: _fsdp2_fused_overflow(rank),
    "ddp_num_items": lambda rank, _: _ddp_num_items(rank),
    "ddp_num_items_one_element": lambda rank, _: _ddp_num_items(rank, one_element=True),
    "fsdp2_num_items": lambda rank, _: _fsdp2_num_items(rank),
    "hsdp_num_items": lambda rank, _: _fsdp2_num_items(rank, hsdp=True),
    "fsdp2_fp16_num_items": lambda rank, _: _fsdp2_fp16_num_items(rank),
    "example_ddp": lambda rank, _: _run_example(rank, "ddp.py"),
    "example_fsdp2": lambda rank, _: _run_example(rank, "fsdp2.py"),
    "ddp_uninterrupted": lambda rank, _: _ddp_uninterrupted(rank),
    "ddp_checkpoint": _ddp_checkpoint,
    "ddp_resumed": _ddp_resumed,
    "ddp_checkpoint_mid": _ddp_checkpoint_mid,
    "ddp_resumed_mid": _ddp_resumed_mid,
}

#: the scenarios that resume in fresh processes: a second launch runs them
RESUMED = ["ddp_resumed", "ddp_resumed_mid"]
#: every scenario the first launch runs (those this torch can)
FIRST_LAUNCH = runnable([name for name in SCENARIOS if name not in RESUMED])

if __name__ == "__main__":  # for debugging a scenario by hand: python tests/_dist_worker.py NAME
    import sys
    import tempfile

    folder = Path(tempfile.mkdtemp())
    launch(folder, "_dist_worker", sys.argv[1:] or FIRST_LAUNCH, WORLD_SIZE)
    for path in sorted(folder.glob("*.err")):
        print(path.name, path.read_text())
    for path in sorted(folder.glob("*.pt")):
        print(path.name, torch.load(path, weights_only=False))
    print("results in", folder, os.linesep)
