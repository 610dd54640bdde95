"""What each rank of tests/test_distributed_mesh.py runs: 4 gloo ranks, the meshes and the
DDP set-ups that 2 ranks cannot show (tests/_dist_harness.py runs them).

- HSDP on a (replicate 2, shard 2) mesh and FSDP2 + tensor parallel on a (dp 2, tp 2) mesh:
  gradient collectives per micro-batch, parameters and the global norm.
- HSDP with a fault on one replica after the gradients were reduced: every rank skips.
- DDP with a frozen layer and an unused one (find_unused_parameters=True), and DDP with
  static_graph=True over many windows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _dist_harness import counting, counting_reduce_scatter, ddp_with_counter
from _dist_worker import IN, OUT, batch, fused_adamw, hsdp_model, loss_fn, make_model, params_of, sgd
from torch import nn

from hwoptim import OptimWrapper

WORLD_SIZE = 4
#: 7 micro-batches in windows of 3: updates at 3, 6 and 7
N_ITERS, ACC = 7, 3
SYNCED = [False, False, True, False, False, True, True]
CLIP = dict(max_norm=0.5)
#: the static-graph run: many windows of 3 and a last one of 2
STATIC_ITERS = 20
#: the overflow run: at INF_AT the gradient of INF_RANK (replica 1 of the HSDP mesh) is
#: made inf after every collective of the backward has run
INF_AT, INF_RANK, INF_ITERS = 2, 3, 4


def global_batch(i: int, dp_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What one process sees: the micro-batches of all ``dp_size`` data-parallel ranks."""
    xs, ys = zip(*(batch(i, r) for r in range(dp_size)))
    return torch.cat(xs), torch.cat(ys)


def train(
    wrapper: OptimWrapper,
    model: Any,
    iters: Sequence[int],
    data: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    pattern: str,
    counters: Sequence[list[int]] = (),
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Train in one calling pattern; (collectives of each counter per micro-batch, norms)."""
    counts: list[list[int]] = [[] for _ in counters]
    norms = []
    for i in iters:
        x, y = data(i)
        before = [c[0] for c in counters]
        if pattern == "mmengine":
            with wrapper.optim_context(model):
                loss = loss_fn(model(x), y)
            wrapper.update_params(loss)
        else:
            with wrapper.optim_context(model):
                wrapper.update_params(loss_fn(model(x), y))
        for count, counter, b in zip(counts, counters, before):
            count.append(counter[0] - b)
        if wrapper.should_update() and wrapper.last_grad_norm is not None:
            norms.append(wrapper.last_grad_norm)
    return counts, norms


def reference(
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    iters: Sequence[int],
    dp_size: int,
    accumulative_counts: int = 1,
    clip_grad: dict[str, Any] | None = None,
    model: nn.Module | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(params, norm at each update) of one process on the data-parallel ranks' batches."""
    model = make_model() if model is None else model
    wrapper = OptimWrapper(make_optimizer(model), accumulative_counts, clip_grad)
    wrapper.initialize_count_status(model, 0, len(iters))
    _, norms = train(wrapper, model, iters, lambda i: global_batch(i, dp_size), "mmengine")
    return params_of(model), [n.clone() for n in norms]


# -- meshes ------------------------------------------------------------------------------------


def plain_sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1)


def fsdp2_tp_model() -> nn.Module:
    """Column- then row-wise tensor parallel over "tp", FSDP2 over "dp"."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = make_model()
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    for module in (model[0], model[2], model):
        fully_shard(module, mesh=mesh["dp"])
    return model


def _mesh_accumulation(rank: int, kind: str, pattern: str) -> dict[str, Any]:
    if kind == "hsdp":
        model, data = hsdp_model(), (lambda i: batch(i, rank))  # 4 data-parallel ranks
    else:  # the two ranks of a tp group see the same batch
        model, data = fsdp2_tp_model(), (lambda i: batch(i, rank // 2))
    wrapper = OptimWrapper(sgd(model), accumulative_counts=ACC, clip_grad=CLIP)
    wrapper.initialize_count_status(model, 0, N_ITERS)
    with counting_reduce_scatter() as scatters, counting("all_reduce") as all_reduces:
        (rs, ar), norms = train(wrapper, model, range(N_ITERS), data, pattern, [scatters, all_reduces])
    return {
        "reduce_scatters": rs,
        "all_reduces": ar,
        "params": params_of(model),
        "norm_types": [type(n).__name__ for n in norms],
        "norms": [n.detach().clone() for n in norms],
    }


def _poison_local_grad(model: nn.Module) -> None:
    grad = next(model.parameters()).grad
    local = grad.to_local() if hasattr(grad, "to_local") else grad
    local.view(-1)[0] = float("inf")


#: the fault scenarios: name -> (optimizer, clip_grad)
FAULT_RUNS: dict[str, tuple[Callable[[nn.Module], torch.optim.Optimizer], dict[str, Any]]] = {
    "fused": (fused_adamw, dict(max_norm=1.0)),
    "sgd": (plain_sgd, dict(max_norm=1.0)),
    "sgd_value": (plain_sgd, dict(type="value", clip_value=0.05)),
}


def _hsdp_fault_on_one_replica(rank: int, run: str) -> dict[str, Any]:
    make_optimizer, clip_grad = FAULT_RUNS[run]
    model = hsdp_model()
    wrapper = OptimWrapper(make_optimizer(model), clip_grad=clip_grad)
    changed, norms = [], []
    for i in range(INF_ITERS):
        x, y = batch(i, rank)
        with wrapper.optim_context(model):
            loss = loss_fn(model(x), y)
        wrapper.backward(loss)
        if i == INF_AT and rank == INF_RANK:  # the replicas' all-reduce is over by now
            _poison_local_grad(model)
        before = params_of(model)
        wrapper.step()
        wrapper.zero_grad()
        changed.append(any(not torch.equal(b, a) for b, a in zip(before, params_of(model))))
        assert wrapper.last_grad_norm is not None
        norms.append(float(wrapper.last_grad_norm))
    return {
        "changed": changed,
        "norms": norms,
        "skipped": float(wrapper.skipped_steps),  # type: ignore[arg-type]
        "zeroed": float(wrapper.zeroed_steps),  # type: ignore[arg-type]
        "params": params_of(model),
    }


# -- DDP -------------------------------------------------------------------------------------------


class FrozenAndUnused(nn.Module):
    """A frozen input layer, the shared model, and a head the forward never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.body = make_model()
        self.frozen = nn.Linear(IN, IN)
        self.frozen.requires_grad_(False)
        self.unused = nn.Linear(IN, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(torch.tanh(self.frozen(x)))


def _ddp_frozen_and_unused(rank: int, pattern: str) -> dict[str, Any]:
    model = FrozenAndUnused()
    ddp, calls = ddp_with_counter(model, find_unused_parameters=True)
    wrapper = OptimWrapper(sgd(model), accumulative_counts=ACC)
    wrapper.initialize_count_status(ddp, 0, N_ITERS)
    (counts,), _ = train(wrapper, ddp, range(N_ITERS), lambda i: batch(i, rank), pattern, [calls])
    return {"collectives": counts, "params": params_of(model)}


def _ddp_static_graph(rank: int, pattern: str) -> dict[str, Any]:
    model = make_model()
    ddp, calls = ddp_with_counter(model, static_graph=True)
    wrapper = OptimWrapper(sgd(model), accumulative_counts=ACC)
    wrapper.initialize_count_status(ddp, 0, STATIC_ITERS)
    data = lambda i: batch(i, rank)  # noqa: E731
    (counts,), _ = train(wrapper, ddp, range(STATIC_ITERS), data, pattern, [calls])
    return {"collectives": counts, "params": params_of(model)}


# -- the harness itself ------------------------------------------------------------------------------


def _fails_on_one_rank(rank: int, workdir: Path) -> dict[str, Any]:
    """Rank 1 raises while the others wait for it in a collective."""
    if rank == 1:
        raise RuntimeError("a deliberate failure on rank 1")
    dist.all_reduce(torch.ones(1))
    return {}


SCENARIOS: dict[str, Callable[[int, Path], dict[str, Any]]] = {
    "fails_on_one_rank": _fails_on_one_rank,
    **{
        f"{kind}_{pattern}": (lambda k, p: lambda rank, _: _mesh_accumulation(rank, k, p))(
            kind, pattern
        )
        for kind in ("hsdp", "fsdp2_tp")
        for pattern in ("mmengine", "inside")
    },
    **{
        f"hsdp_fault_{run}": (lambda r: lambda rank, _: _hsdp_fault_on_one_replica(rank, r))(run)
        for run in FAULT_RUNS
    },
    **{
        f"ddp_{name}_{pattern}": (lambda f, p: lambda rank, _: f(rank, p))(fn, pattern)
        for name, fn in (("frozen_unused", _ddp_frozen_and_unused), ("static_graph", _ddp_static_graph))
        for pattern in ("mmengine", "inside")
    },
}
