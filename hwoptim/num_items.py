"""Item-weighted accumulation: what ``update_params(loss, num_items=n)`` needs besides the wrapper.

With ``num_items`` the loss of a micro-batch is the *sum* over its items (tokens, masked
positions, targets), and the update divides the gradients by the number of items of the
whole window summed over every data-parallel rank. This module owns that window
(``ItemWindow``: the item and loss sums, the division, windows without items, their save
and restore), checks a count on the host (without reading a device tensor), finds the
process group(s) a model's gradients are averaged over together with the factor they are
divided by, and keeps a host copy of a device counter that can be read without waiting.
"""

from __future__ import annotations

import ctypes
import numbers
from collections.abc import Mapping
from typing import Any, Union

import torch
from torch import Tensor

from hwoptim._numbers import check_int
from hwoptim._warn import warn
from hwoptim.backends.base import unwrap_compiled

__all__ = [
    "LOCAL",
    "HostMirror",
    "ItemWindow",
    "ItemsGroup",
    "ItemsReduction",
    "all_reduce_sum",
    "check_items_group",
    "check_num_items",
    "fsdp2_reduction",
    "items_reduction",
]

#: what ``num_items_group`` accepts: "auto", "local" or a torch.distributed ProcessGroup
ItemsGroup = Union[str, Any]


def check_num_items(num_items: Any) -> int | Tensor:
    """``num_items`` as a host int or an integer tensor of one element; else a clear error.

    Only what can be seen without a host sync is checked: a Python int must be >= 0; a
    tensor must have an integer dtype and one element (its value stays on the device).
    """
    if type(num_items) is int:  # the common case first: no isinstance chain
        if num_items < 0:
            raise ValueError(f"num_items must be >= 0 (a count of items); got {num_items}")
        return num_items
    if isinstance(num_items, Tensor):
        if num_items.dtype.is_floating_point or num_items.dtype.is_complex or num_items.dtype == torch.bool:
            raise TypeError(
                f"num_items must be an integer count; got a {num_items.dtype} tensor, whose value "
                "cannot be checked for being a whole number without a host sync: pass "
                "(labels != ignore_index).sum() (int64) or convert with .long()"
            )
        if num_items.numel() != 1:
            raise ValueError(
                "num_items must be one count for the micro-batch; got a tensor of shape "
                f"{tuple(num_items.shape)}: sum it first, e.g. (labels != -100).sum()"
            )
        return num_items
    if isinstance(num_items, numbers.Integral) and not isinstance(num_items, bool):
        return check_num_items(int(num_items))  # numpy integers and the like
    raise TypeError(
        "num_items must be an int or an integer tensor (the number of items whose losses the "
        f"micro-batch's loss sums); got {type(num_items).__name__} {num_items!r}"
    )


class ItemsReduction:
    """How a window's item count becomes the global one, and what the gradients hold.

    ``groups``: the process groups to sum the count over, in turn (empty: this rank alone;
    ``None`` in it: the default group). ``divisor``: what the gradient collective already
    divided the summed gradients by (DDP: the group size; FSDP2: its gradient divide
    factor, by default the data-parallel size), so the update divides by
    ``items / divisor`` to get the sum over all ranks divided by all their items.
    """

    __slots__ = ("divisor", "groups")

    def __init__(self, groups: tuple[Any, ...] = (), divisor: float = 1.0) -> None:
        self.groups = groups
        self.divisor = divisor

    def __repr__(self) -> str:
        return f"ItemsReduction(groups={self.groups!r}, divisor={self.divisor})"


LOCAL = ItemsReduction()


def _dist_ready() -> bool:
    return bool(torch.distributed.is_available() and torch.distributed.is_initialized())


def items_reduction(model: Any, group: ItemsGroup = "auto") -> ItemsReduction:
    """Where to sum item counts for ``model``, decided once per model.

    ``group`` "local": this rank's count only. A ProcessGroup: that group, whose gradients
    are assumed averaged over it (as DDP and FSDP do). "auto": the group the model's
    gradients are averaged over -- DDP's (and FSDP1's) ``process_group``; FSDP2/HSDP's
    data-parallel groups (shard and replicate), with FSDP2's gradient divide factor --
    and for any other model the default group when torch.distributed is initialized with
    more than one process (a model hwoptim does not recognise may be averaged by code it
    cannot see; pass "local" when each rank trains on its own).
    """
    group = check_items_group(group)
    if isinstance(group, str):
        if group == "local" or not _dist_ready():
            return LOCAL
    elif not _dist_ready():
        raise RuntimeError(
            "num_items_group is a process group, but torch.distributed is not initialized; "
            "call init_process_group first, or pass num_items_group='local'"
        )
    else:
        return ItemsReduction((group,), float(torch.distributed.get_world_size(group)))
    found = None if model is None else _model_reduction(unwrap_compiled(model))
    if found is not None:
        return found
    world = torch.distributed.get_world_size()
    return LOCAL if world == 1 else ItemsReduction((None,), float(world))


def _model_reduction(root: Any) -> ItemsReduction | None:
    """The reduction of the first data-parallel module in ``root`` (itself included)."""
    modules = root.modules() if isinstance(root, torch.nn.Module) else (root,)
    for module in modules:
        get_state = getattr(module, "_get_fsdp_state", None)
        if callable(get_state):
            param_group = getattr(get_state(), "_fsdp_param_group", None)
            if param_group is not None:  # a root without parameters of its own has none
                return fsdp2_reduction(param_group)
            continue
        process_group = getattr(module, "process_group", None)
        if process_group is not None and callable(getattr(module, "no_sync", None)):
            # DDP and FSDP1; hybrid FSDP1 also all-reduces over its inter-node group
            groups = [process_group]
            inter_node = getattr(module, "_inter_node_pg", None)
            if inter_node is not None:
                groups.append(inter_node)
            return _combined(groups, None)
    return None


def fsdp2_reduction(param_group: Any) -> ItemsReduction:
    """FSDP2 (and HSDP): the shard and replicate groups it reduces gradients over."""
    mesh_info = param_group.mesh_info
    groups = [
        g
        for g in (
            getattr(mesh_info, "shard_process_group", None),
            getattr(mesh_info, "replicate_process_group", None),
        )
        if g is not None
    ]
    return _combined(groups, getattr(param_group, "gradient_divide_factor", None))


def _combined(groups: list[Any], factor: float | None) -> ItemsReduction:
    """One reduction over ``groups`` together: their product of sizes is the data-parallel
    size. Two groups that span every process are the default group (one collective);
    otherwise the count is summed over each in turn, which sums it over all of them."""
    sizes = [torch.distributed.get_world_size(g) for g in groups]
    size = 1
    for s in sizes:
        size *= s
    divisor = float(size if factor is None else factor)
    if size == 1:
        return ItemsReduction((), divisor)
    if len(groups) > 1 and size == torch.distributed.get_world_size():
        return ItemsReduction((None,), divisor)
    return ItemsReduction(tuple(g for g, s in zip(groups, sizes) if s > 1), divisor)


def all_reduce_sum(totals: Tensor, reduction: ItemsReduction) -> None:
    """Sum ``totals`` in place over the reduction's groups: a collective, not a host sync."""
    for group in reduction.groups:
        torch.distributed.all_reduce(totals, group=group)


class HostMirror:
    """A host copy of a device scalar, refreshed without waiting for the device.

    ``refresh()`` queues a copy into pinned host memory and returns the value the copy
    before it (or this one, on the CPU) left there: reading it costs no host sync, and on
    an accelerator it may be one refresh late. Where pinned memory is not available the
    mirror cannot be kept without a sync, and ``refresh()`` returns None.
    """

    __slots__ = ("_address", "_host")

    def __init__(self, device: torch.device) -> None:
        self._host: Tensor | None = None
        self._address = 0
        try:
            host = torch.zeros((), dtype=torch.float32, pin_memory=device.type != "cpu")
        except RuntimeError:  # no pinned-memory allocator for this device
            return
        self._host = host  # kept alive: the address below points into it
        # Read through ctypes, not a Tensor method: no torch call that could wait, and no
        # numpy needed (torch does not require it).
        self._address = host.data_ptr()

    def refresh(self, value: Tensor) -> float | None:
        if self._host is None:
            return None
        self._host.copy_(value.detach().reshape(()), non_blocking=True)
        return float(ctypes.c_float.from_address(self._address).value)


def check_items_group(group: Any) -> ItemsGroup:
    """``num_items_group`` checked: "auto", "local" or a ProcessGroup (not checked further)."""
    if isinstance(group, str) and group not in ("auto", "local"):
        raise ValueError(f"num_items_group must be 'auto', 'local' or a ProcessGroup; got {group!r}")
    return group


#: a saved window: (loss sum, device item count or None, host item count)
SavedWindow = tuple[Tensor, Union[Tensor, None], int]


def _mixed_window_message(kind: str) -> str:
    other = "without" if kind == "with" else "with"
    return (
        f"a micro-batch {kind} num_items in an accumulation window whose earlier "
        f"micro-batches were {other} it: give num_items for every micro-batch of a "
        "window (the loss summed over its items) or for none (the loss a mean)"
    )


class ItemWindow:
    """The ``num_items`` window: the item count and loss sum of the micro-batches so far.

    Int counts stay on the host and tensor counts on the device, so adding one is never a
    host sync. At an update ``divide`` sums the window over the data-parallel ranks (one
    all-reduce), divides the gradients by it and resets the window.
    """

    def __init__(self, group: ItemsGroup) -> None:
        self.group = group
        self.loss: Tensor | None = None
        self.items: Tensor | None = None
        self.host_items = 0
        #: the window has micro-batches without num_items
        self.plain = False
        #: where counts are summed for the bound model (found at its first update)
        self.reduction: ItemsReduction | None = None
        #: the item-weighted mean loss of the last update (None: it had no num_items)
        self.last_loss: Tensor | None = None
        self._empty_windows: Tensor | None = None
        self._empty_mirror: HostMirror | None = None
        self._warned_empty = False

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["reduction"] = state["_empty_mirror"] = None  # the model's, and pinned memory
        return state

    def check(self, loss: Tensor, num_items: Any) -> int | Tensor:
        """A micro-batch's count, checked on the host before its backward; the loss must
        be one number (of any shape, as for ``backward``)."""
        count = check_num_items(num_items)
        if self.plain:
            raise ValueError(_mixed_window_message("with"))
        if loss.numel() != 1:
            raise ValueError(
                "with num_items the loss must be one number, the sum of the micro-batch's "
                f"item losses; got a tensor of shape {tuple(loss.shape)}: sum it first"
            )
        return count

    def check_plain(self) -> None:
        """Refuse a micro-batch without num_items in a window of micro-batches with it."""
        if self.loss is not None:
            raise ValueError(_mixed_window_message("without"))

    def add(self, loss: Tensor, count: int | Tensor) -> None:
        """Add a micro-batch's count and summed loss, on the device (an int stays on the host)."""
        summed = loss.detach().float().reshape(())  # one element of any shape: its scalar
        if self.loss is not None:
            summed = self.loss + summed
        if isinstance(count, int):
            self.host_items += count
        else:
            count = count.to(summed.device, torch.float32, non_blocking=True).reshape(())
            if self.items is not None:
                count = self.items + count
            self.items = count
        self.loss = summed

    def reset(self) -> None:
        """Drop the window (an update, zero_grad, or an abandoned step)."""
        self.loss = self.items = None
        self.host_items = 0
        self.plain = False

    def divide(self, params: list[Tensor], model: Any) -> Tensor | None:
        """At an update: divide the gradients of ``params`` by the window's item count over all ranks.

        Returns None when the window gave no ``num_items``; else a float32 flag, 1.0 when
        the window held no item (its gradients stay zero and the update is skipped like a
        non-finite one). Resets the window; one all-reduce, no host sync.
        """
        loss_sum = self.loss
        if loss_sum is None:
            self.plain = False
            self.last_loss = None
            return None
        items, host_items = self.items, self.host_items
        self.reset()
        if items is None:
            items = torch.full_like(loss_sum, host_items)
        elif host_items:
            items = items + host_items
        reduction = self.reduction
        if reduction is None:
            reduction = self.reduction = items_reduction(model, self.group)
        if reduction.groups:
            totals = torch.stack([items, loss_sum])
            all_reduce_sum(totals, reduction)
            items, loss_sum = totals[0], totals[1]
        empty = items <= 0
        # Divide rather than multiply by a rounded reciprocal (float64 models stay exact);
        # an empty window divides by inf, so its zero gradients stay zero.
        per_item = torch.where(empty, torch.inf, items / reduction.divisor)
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_div_(grads, per_item)
        self.last_loss = loss_sum / items
        flag = empty.float()
        self._empty_windows = flag if self._empty_windows is None else self._empty_windows + flag
        return flag

    def check_empty_windows(self) -> None:
        """Warn once that windows without items were skipped, when the host can tell
        without waiting (called where the user reads the counters)."""
        empty = self._empty_windows
        if empty is None or self._warned_empty:
            return
        if self._empty_mirror is None:
            self._empty_mirror = HostMirror(empty.device)
        seen = self._empty_mirror.refresh(empty)
        if seen:
            self._warned_empty = True
            warn(
                f"{int(seen)} update(s) had no items (num_items summed to 0 over the window "
                "and every data-parallel rank): they were skipped (counted in skipped_steps) "
                "or, for a non-fused optimizer, stepped with zero gradients (zeroed_steps); "
                "check the data (all padding?) or the count you pass"
            )

    def saved(self) -> dict[str, Any] | None:
        """The window so far, for a checkpoint (None: no num_items in it)."""
        if self.loss is None:
            return None
        return {"loss": self.loss, "items": self.items, "host_items": self.host_items}

    @staticmethod
    def check_saved(window: Any, where: str) -> SavedWindow | None:
        """A saved window checked: (loss sum, device count or None, host count)."""
        if window is None:
            return None
        if not isinstance(window, Mapping) or not {"loss", "items", "host_items"} <= set(window):
            raise ValueError(f"{where} must be a dict with 'loss', 'items' and 'host_items'; got {window!r:.80}")
        loss, items = window["loss"], window["items"]
        for name, value in (("loss", loss), ("items", items)):
            if value is None and name == "items":
                continue
            if not isinstance(value, Tensor) or value.numel() != 1 or value.is_complex():
                raise ValueError(f"{where}.{name} must be a one-element real tensor; got {value!r:.80}")
        return loss, items, check_int(window["host_items"], f"{where}.host_items", 0)

    def restore(self, window: SavedWindow | None, device: torch.device | None) -> None:
        """Make ``window`` (from ``check_saved``) the current one, on ``device``."""
        self.reset()
        if window is None:
            return
        loss, items, host_items = window
        device = loss.device if device is None else device
        self.loss = loss.to(device, torch.float32, copy=True).reshape(())
        self.items = None if items is None else items.to(device, torch.float32, copy=True).reshape(())
        self.host_items = host_items
