"""What each rank of tests/test_grad_norm_dist.py runs: gradient norms over DTensors on
several meshes, 4 gloo ranks (tests/_dist_harness.py starts them).

- ``layouts``: gradients built from full tensors the same on every rank (one seed), laid
  out in every placement -- FSDP2's Shard(0) (uneven: one rank's shard is empty), experts'
  [Shard(1), Shard(0)] on a (2, 2) mesh, HSDP's [Replicate, Shard], [Shard, Partial], a
  sub-mesh of 2 ranks, a plain tensor, an empty group -- their norms by ``grad_norms``
  next to the full tensors' (the reference each rank computes), and the all-reduces.
- ``moe``: the issue's model: a Linear under fully_shard on 4 ranks, an expert weight
  [Shard(1), Shard(0)] on a (2, 2) mesh and a plain nn.Parameter, trained with clipping.
- ``hsdp_tp``: an HSDP Linear on a (replicate, shard) mesh, a column- then row-wise
  tensor-parallel pair under FSDP2 on a (dp, tp) mesh, and a plain nn.Parameter.

Every rank trains on the same global batch, so that one process on it is the reference
(the data-parallel averages of identical gradients are those gradients).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _dist_harness import counting
from test_host_sync import HostSyncDetector
from torch import nn
from torch.nn import functional as F

from hwoptim import OptimWrapper
from hwoptim._grad_norm import grad_norms

WORLD_SIZE = 4
NORM_TYPES = (2.0, 3.0, math.inf)
IN, HIDDEN, OUT, BATCH = 4, 6, 3, 8
ITERS = 4
CLIP = dict(max_norm=0.3)


# -- layouts -------------------------------------------------------------------------------------


def full_grads() -> list[list[torch.Tensor]]:
    """The full gradients, grouped as in ``laid_out``: the same on every rank."""
    g = torch.Generator().manual_seed(7)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    return [
        [r(8, 4), r(3, 5)],  # FSDP2 on 4 ranks; 3 rows over 4 ranks: rank 3's shard is empty
        [r(4, 6), r(4, 6), r(6, 2)],  # experts [S1, S0]; HSDP [R, S0]; [S0, R]
        [r(4, 4), r(5), r(4, 2)],  # [S0, Partial]; Replicate and Shard on a 2-rank sub-mesh
        [r(3)],  # a plain tensor, whole on every rank
        [],  # an empty group
    ]


def laid_out(full: list[list[torch.Tensor]], rank: int) -> list[list[torch.Tensor]]:
    from torch.distributed.device_mesh import init_device_mesh
    try:
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    except ImportError:  # torch before 2.5
        from torch.distributed._tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    flat = init_device_mesh("cpu", (4,))
    square = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    sub = square["ep"]  # ranks {0, 1} or {2, 3}
    dense, experts, tp, plain, empty = full
    # [Shard(0), Partial]: the ranks of an "ep" pair hold parts that sum to the shard
    row = distribute_tensor(tp[0], square, [Shard(0), Replicate()]).to_local()
    part = row * (0.25 if rank % 2 == 0 else 0.75)
    partial = DTensor.from_local(part, square, [Shard(0), Partial()], run_check=False)
    return [
        [distribute_tensor(t, flat, [Shard(0)]) for t in dense],
        [
            distribute_tensor(experts[0], square, [Shard(1), Shard(0)]),
            distribute_tensor(experts[1], square, [Replicate(), Shard(0)]),
            distribute_tensor(experts[2], square, [Shard(0), Replicate()]),
        ],
        [partial, distribute_tensor(tp[1], sub, [Replicate()]), distribute_tensor(tp[2], sub, [Shard(1)])],
        list(plain),
        list(empty),
    ]


def reference_norms(full: list[list[torch.Tensor]], p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The norms of the full tensors, in float64."""
    per_group = torch.stack([
        torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in group]), p)
        if group else torch.zeros((), dtype=torch.float64)
        for group in full
    ])
    return torch.linalg.vector_norm(per_group, p), per_group


def _layouts(rank: int, workdir: Path) -> dict[str, Any]:
    full = full_grads()
    grads = laid_out(full, rank)
    out: dict[str, Any] = {}
    for p in NORM_TYPES:
        for foreach in (None, False):
            with counting("all_reduce") as calls:
                total, per_group = grad_norms(grads, p, foreach)
            out[p, foreach] = (total, per_group, calls[0])
        out[p, "reference"] = reference_norms(full, p)
        with HostSyncDetector() as detector:
            grad_norms(grads, p)
        out[p, "syncs"] = [str(call) for call in detector.by("hwoptim")]
    # one rank's copy of a replicated shard goes bad: every rank sees the same non-finite
    for value in (math.inf, math.nan):
        bad = [list(group) for group in grads]
        if rank == 3:
            local = bad[1][1].to_local().clone()  # HSDP [R, S0]: rank 3 is replica 1
            local.view(-1)[0] = value
            bad[1][1] = type(bad[1][1]).from_local(local, bad[1][1].device_mesh, bad[1][1].placements)
        out["bad", str(value)] = grad_norms(bad, 2.0)
    return out


# -- training --------------------------------------------------------------------------------


class Moe(nn.Module):
    """A dense layer, one expert weight and a plain scale: out = dense(x) + tanh(x) @ w * s."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.dense = nn.Linear(IN, OUT)
        self.expert = nn.Parameter(torch.randn(IN, OUT) * 0.5)
        self.scale = nn.Parameter(torch.tensor([1.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expert = self.expert
        full = getattr(expert, "full_tensor", None)  # a DTensor: gathered for the forward
        weight = full() if full is not None else expert
        return self.dense(x) + torch.tanh(x) @ weight * self.scale


class HsdpTp(nn.Module):
    """An HSDP layer, a column- then row-wise tensor-parallel pair, a plain scale."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(IN, HIDDEN)
        self.up = nn.Linear(HIDDEN, 2 * HIDDEN)
        self.down = nn.Linear(2 * HIDDEN, OUT)
        self.scale = nn.Parameter(torch.tensor([0.8]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(torch.tanh(self.first(x))))) * self.scale


def moe_model(distributed: bool) -> nn.Module:
    model = Moe()
    if distributed:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Shard, distribute_tensor

        fully_shard(model.dense, mesh=init_device_mesh("cpu", (4,)))
        experts = init_device_mesh("cpu", (2, 2), mesh_dim_names=("efsdp", "ep"))
        model.expert = nn.Parameter(distribute_tensor(model.expert.data, experts, [Shard(1), Shard(0)]))
    return model


def hsdp_tp_model(distributed: bool) -> nn.Module:
    model = HsdpTp()
    if distributed:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        hsdp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        fully_shard(model.first, mesh=hsdp)
        tp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, tp["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
        for module in (model.up, model.down):
            fully_shard(module, mesh=tp["dp"])
    return model


MODELS: dict[str, Callable[[bool], nn.Module]] = {"moe": moe_model, "hsdp_tp": hsdp_tp_model}


def global_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(BATCH, IN, generator=g) * 2, torch.randn(BATCH, OUT, generator=g)


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """Two param groups: the scale in a group of its own."""
    scale = [p for n, p in model.named_parameters() if n == "scale"]
    rest = [p for n, p in model.named_parameters() if n != "scale"]
    return torch.optim.SGD([{"params": rest}, {"params": scale, "lr": 0.05}], lr=0.2, momentum=0.5)


def full_params(model: nn.Module) -> list[torch.Tensor]:
    out = []
    for p in model.parameters():
        full = getattr(p, "full_tensor", None)
        out.append((full() if full is not None else p).detach().clone())
    return out


def train(name: str, distributed: bool, per_group: bool = False) -> dict[str, Any]:
    """ITERS updates with clipping (each group by its own norm with ``per_group``); the
    norms, per-group norms (by hand and the wrapper's), all-reduces and parameters."""
    model = MODELS[name](distributed)
    wrapper = OptimWrapper(optimizer(model), clip_grad=dict(CLIP, per_group=per_group))
    norms, group_norms, all_reduces, syncs, wrapper_groups = [], [], [], [], []
    for i in range(ITERS):
        x, y = global_batch(i)
        with wrapper.optim_context(model):
            loss = F.mse_loss(model(x), y)
        wrapper.backward(loss)
        groups = [[p.grad for p in g["params"] if p.grad is not None] for g in wrapper.param_groups]
        group_norms.append({p: grad_norms(groups, p) for p in NORM_TYPES})
        with counting("all_reduce") as calls, HostSyncDetector() as detector:
            wrapper.step()
        all_reduces.append(calls[0])
        syncs.extend(str(call) for call in detector.by("hwoptim"))
        wrapper.zero_grad()
        assert wrapper.last_grad_norm is not None
        norms.append(wrapper.last_grad_norm.detach().clone())
        wrapper_groups.append(torch.stack([
            *wrapper.last_grad_norms.values(), *map(torch.Tensor.float, wrapper.nonfinite_groups.values())
        ]))
    return {
        "wrapper_groups": wrapper_groups,
        "norms": norms,
        "norm_types": [type(n).__name__ for n in norms],
        "group_norms": group_norms,
        "all_reduces": all_reduces,
        "syncs": syncs,
        "params": full_params(model),
    }


def _initialized(fn: Callable[[int, Path], dict[str, Any]]) -> Callable[[int, Path], dict[str, Any]]:
    def run(rank: int, workdir: Path) -> dict[str, Any]:
        assert dist.get_world_size() == WORLD_SIZE
        return fn(rank, workdir)

    return run


SCENARIOS: dict[str, Callable[[int, Path], dict[str, Any]]] = {
    "layouts": _initialized(_layouts),
    "fsdp2_moe": _initialized(lambda rank, _: train("moe", True)),
    "hsdp_tp": _initialized(lambda rank, _: train("hsdp_tp", True)),
    "fsdp2_moe_per_group": _initialized(lambda rank, _: train("moe", True, per_group=True)),
    "hsdp_tp_per_group": _initialized(lambda rank, _: train("hsdp_tp", True, per_group=True)),
}
