"""Gradient norms over any layout: plain tensors, DTensors on one mesh or on several.

``grad_norms`` computes the total norm of a set of gradients *and* the norm of each
group of them (an optimizer's param groups) in one pass: a norm per tensor (``_foreach_norm``
over each device and dtype), combined per group and then over the groups, on the device.

Plain tensors are whole on this rank (one process, or DDP's identical copies): nothing to
reduce. A DTensor's local shard holds part of it; which ranks hold the other parts is read
from its placements. Over a mesh dimension where it is ``Shard`` the ranks hold distinct
pieces, whose contributions add up; where it is ``Replicate`` they hold copies, each
counted once by weighting its contribution by 1/copies. ``Partial`` gradients (local
values still to be summed) have no norm until they are reduced, so they are redistributed
to ``Replicate`` first (a collective each; torch leaves FSDP2 and tensor-parallel gradients
``Shard`` or ``Replicate``, so this is rare). Every share is then reduced over the ranks of
its mesh -- one all-reduce of a vector with one entry per group, for all the meshes that
span the same ranks, and for the plain tensors beside them -- so every rank holds the
same numbers, its non-finite ones included. docs/distributed.md explains why the result
is the global norm.

No host sync: every step is a device op or a collective.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._foreach_utils import (
    _device_has_foreach_support,
    _group_tensors_by_device_and_dtype,
    _has_foreach_support,
)

#: the key of the gradients reduced over all ranks (the default process group)
_WORLD = "world"
_PLAIN = {Tensor}


def grad_norms(
    groups: Sequence[Sequence[Tensor]],
    norm_type: float = 2.0,
    foreach: bool | None = None,
    *,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """The total norm of all the tensors of ``groups`` and the norm of each group.

    Args:
        groups: the gradients, grouped (an optimizer's param groups); plain tensors and
            DTensors on any meshes, mixed freely. A group may be empty (its norm is 0).
        norm_type: p of the p-norm (> 0), or ``math.inf`` for the largest magnitude.
        foreach: as torch's ``clip_grad_norm_``: None uses the foreach kernels where the
            device has them, True insists on them, False computes tensor by tensor.
        device: where the result goes when there is no tensor at all (default the CPU).

    Returns:
        ``(total, per_group)``: a 0-dim tensor and a 1-D tensor of ``len(groups)`` entries,
        plain tensors on the first tensor's device, the same on every rank. Over plain
        tensors on one device the total is what ``torch.nn.utils.get_total_norm`` returns,
        in its dtype; with DTensors the sums are done in float32 (float64 for float64
        gradients).

    .. note:: No host sync; with DTensors, one all-reduce per set of ranks spanned by a
       mesh (one, when every mesh spans all ranks), plus one per ``Partial`` gradient.
    """
    p = float(norm_type)
    if not p > 0:
        raise ValueError(f"norm_type must be a positive number or inf; got {norm_type!r}")
    flat: list[Tensor] = []
    group_of: list[int] = []
    for index, group in enumerate(groups):
        flat.extend(group)
        group_of.extend([index] * len(group))
    return norms_by_group(flat, group_of, len(groups), p, foreach, device=device)


def norms_by_group(
    flat: Sequence[Tensor], group_of: Sequence[int], n_groups: int, p: float,
    foreach: bool | None = None, *, index: Tensor | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """``grad_norms`` for tensors given flat, ``group_of[i]`` the group of ``flat[i]``
    (groups need not be contiguous; with one group it may be empty): the clip's call, with
    ``index`` the same as a device tensor when the caller keeps one (built once, so no
    host-to-device copy per update)."""
    if not flat:
        return torch.zeros((), device=device), torch.zeros(n_groups, device=device)
    if set(map(type, flat)) == _PLAIN or not any(hasattr(t, "placements") for t in flat):
        return _local_norms(list(flat), group_of, n_groups, p, foreach, index)
    if n_groups == 1 and len(group_of) != len(flat):  # one group: ``group_of`` may be left empty
        group_of = [0] * len(flat)
    return _distributed_norms(list(flat), group_of, n_groups, p, foreach)


def by_mesh(params: Sequence[Tensor]) -> list[list[Tensor]]:
    """``params`` (those with a gradient) split by their gradient's mesh, plain ones apart:
    what one torch foreach call over gradients can take (it refuses mixed meshes)."""
    with_grads = [param for param in params if param.grad is not None]
    return _bucketed(with_grads, [param.grad for param in with_grads])


def grads_by_mesh(grads: Sequence[Tensor]) -> list[list[Tensor]]:
    """``grads`` split by their mesh, plain ones apart (``by_mesh`` for the gradients)."""
    return _bucketed(grads, grads)


def _bucketed(items: Sequence[Tensor], grads: Sequence[Any]) -> list[list[Tensor]]:
    """``items`` grouped by the mesh of the matching gradient in ``grads``, in first-seen order."""
    buckets: dict[Any, list[Tensor]] = {}
    for item, grad in zip(items, grads):
        buckets.setdefault(getattr(grad, "device_mesh", None), []).append(item)
    return list(buckets.values())


# -- plain tensors ----------------------------------------------------------------------------


def _local_norms(
    flat: list[Tensor], group_of: Sequence[int], n_groups: int, p: float, foreach: bool | None,
    index: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """All tensors whole on this rank: torch's get_total_norm, with the groups' norms.

    The total is ``vector_norm`` of the per-tensor norms, as torch's (bit for bit, however
    the tensors are grouped); each group's norm is one scatter of the same per-tensor norms
    (no second pass over the tensors, a few small kernels whatever the number of groups)."""
    first = flat[0].device
    norms, one_device = _per_tensor_norms(flat, p, foreach)
    stacked = torch.stack(norms if one_device else [n.to(first) for n in norms])
    total = torch.linalg.vector_norm(stacked, p)
    if n_groups == 1:
        return total, total.reshape(1)
    if index is None:
        index = torch.tensor(group_of, dtype=torch.long).to(first, non_blocking=True)
    zeros = stacked.new_zeros(n_groups)
    if p == math.inf:
        return total, zeros.scatter_reduce_(0, index, stacked, "amax")
    powered = stacked if p == 1.0 else stacked * stacked if p == 2.0 else stacked.pow(p)
    sums = zeros.index_add_(0, index, powered)
    per_group = sums if p == 1.0 else sums.sqrt_() if p == 2.0 else sums.pow_(1.0 / p)
    return total, per_group


def _per_tensor_norms(
    tensors: list[Tensor], p: float, foreach: bool | None
) -> tuple[list[Tensor], bool]:
    """The p-norm of each tensor, in order: one foreach kernel per device and dtype (as
    torch's get_total_norm), and whether they are all on one device. An empty tensor's
    norm is 0 (its max norm included)."""
    if p == math.inf and any(t.numel() == 0 for t in tensors):
        full = [t for t in tensors if t.numel()]
        if not full:
            return [t.new_zeros(()) for t in tensors], len({t.device for t in tensors}) == 1
        found_norms, _ = _per_tensor_norms(full, p, foreach)
        found = iter(found_norms)
        return [next(found) if t.numel() else t.new_zeros(()) for t in tensors], len(
            {t.device for t in tensors}
        ) == 1
    grouped = _group_tensors_by_device_and_dtype([tensors], with_indices=True)  # type: ignore[list-item]
    ordered: list[Tensor | None] = [None] * len(tensors)
    for (device, _), ([bucket], indices) in grouped.items():
        device_tensors: list[Tensor] = bucket  # type: ignore[assignment]
        if (foreach is None and _has_foreach_support(device_tensors, device)) or (
            foreach and _device_has_foreach_support(device)
        ):
            norms = list(torch._foreach_norm(device_tensors, p))
        elif foreach:
            raise RuntimeError(
                f"clip_grad foreach=True, but {device.type} tensors have no foreach kernels; "
                "pass foreach=None or False"
            )
        else:
            norms = [torch.linalg.vector_norm(t, p) for t in device_tensors]
        if len(grouped) == 1:
            return norms, True
        for index, norm in zip(indices, norms):
            ordered[index] = norm
    return ordered, len({device for device, _ in grouped}) == 1  # type: ignore[return-value]


# -- DTensors -----------------------------------------------------------------------------------


@torch.no_grad()  # a gradient's norm needs no graph; and to_local is a plain read without one
def _distributed_norms(
    flat: list[Tensor], group_of: Sequence[int], n_groups: int, p: float, foreach: bool | None
) -> tuple[Tensor, Tensor]:
    """Some tensors are DTensors: each mesh's share reduced over its ranks, then combined."""
    import torch.distributed as dist

    world = dist.get_world_size()
    locals_: list[Tensor] = []
    where: list[tuple[Any, int, int]] = []  # (reduction key, group, copies) of each local
    meshes: dict[int, Any] = {}  # reduction key -> mesh, for the meshes of fewer ranks
    seen: dict[tuple[int, Any], tuple[Any, int]] = {}  # (mesh, placements) -> (key, copies)
    for tensor, group in zip(flat, group_of):
        mesh = getattr(tensor, "device_mesh", None)
        if mesh is None:  # whole on every rank: the average of its copies
            locals_.append(tensor)
            where.append((_WORLD, group, world))
            continue
        tensor = _without_partial(tensor)
        layout = (id(mesh), tensor.placements)
        known = seen.get(layout)
        if known is None:
            copies = math.prod(
                mesh.size(dim) for dim, placement in enumerate(tensor.placements)
                if placement.is_replicate()
            )
            key: Any = _WORLD
            if mesh.size() != world:
                meshes.setdefault(id(mesh), mesh)
                key = id(mesh)
            known = seen[layout] = (key, copies)
        locals_.append(tensor.to_local())
        where.append((known[0], group, known[1]))
    norms, one_device = _per_tensor_norms(locals_, p, foreach)
    device = locals_[0].device
    dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32

    # (key, group, copies) -> norms; then per key a vector of one entry per group
    buckets: dict[tuple[Any, int, int], list[Tensor]] = {}
    for norm, key in zip(norms, where):
        buckets.setdefault(key, []).append(norm)
    shares: dict[Any, list[Tensor | None]] = {}
    for (key, group, copies), bucket in buckets.items():
        if one_device:  # one stack, then one conversion
            stacked = torch.stack(bucket).to(dtype)
        else:
            stacked = torch.stack([n.to(device, dtype) for n in bucket])
        if p == math.inf:
            part = stacked.amax()
        else:
            part = stacked.pow(p).sum()
            if copies > 1:
                part = part / copies
        slots = shares.setdefault(key, [None] * n_groups)
        old = slots[group]
        slots[group] = part if old is None else _combine(old, part, p)
    zero = torch.zeros((), device=device, dtype=dtype)
    op = dist.ReduceOp.MAX if p == math.inf else dist.ReduceOp.SUM
    total: Tensor | None = None
    for key, slots in shares.items():  # the same order on every rank: the gradients' order
        share = torch.stack([zero if s is None else s for s in slots])
        for process_group in _reduction_groups(meshes.get(key), world):
            dist.all_reduce(share, op=op, group=process_group)
        total = share if total is None else _combine(total, share, p)
    assert total is not None
    if p == math.inf:
        return total.amax(), total
    return total.sum().pow(1.0 / p), total.pow(1.0 / p)


def _combine(a: Tensor, b: Tensor, p: float) -> Tensor:
    return torch.maximum(a, b) if p == math.inf else a + b


def _without_partial(tensor: Any) -> Any:
    """A DTensor whose ``Partial`` mesh dimensions are reduced (to ``Replicate``): the norm
    of a sum is not a function of the parts' norms, so the sum must be taken first."""
    placements = tensor.placements
    if not any(placement.is_partial() for placement in placements):
        return tensor
    try:
        from torch.distributed.tensor import Replicate
    except ImportError:  # torch before 2.5
        from torch.distributed._tensor import Replicate  # type: ignore[attr-defined]

    resolved = [Replicate() if pl.is_partial() else pl for pl in placements]
    return tensor.redistribute(tensor.device_mesh, resolved)


def _reduction_groups(mesh: Any, world: int) -> tuple[Any, ...]:
    """The process groups an all-reduce over a mesh's ranks goes through, in turn: for all
    ranks (``mesh`` None) the default group, or none on one rank; for a mesh of fewer
    ranks each of its dimensions of more than one rank (together they span it)."""
    if mesh is None:
        return (None,) if world > 1 else ()
    return tuple(mesh.get_group(dim) for dim in range(mesh.ndim) if mesh.size(dim) > 1)
