"""Checkpoints: what a wrapper's state dict holds, and loading it all or nothing.

``save`` builds the state dict: the optimizer's, plus ``"hwoptim"`` (the counters; with
``save_partial_grads`` inside a window, the gradients so far and the num_items window) and
the precision policy's ``"loss_scaler"``. ``plan`` checks a state dict against the wrapper
and returns a frozen ``LoadPlan``; only then does ``apply`` change anything. The layout is
in docs/checkpoints.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from hwoptim._numbers import check_int
from hwoptim._precision import NoScaling
from hwoptim._warn import warn
from hwoptim._window import STATE_KEY, AccumulationWindow
from hwoptim.backends.base import unwrap_compiled
from hwoptim.num_items import ItemWindow, SavedWindow

__all__ = ["STATE_KEY", "LoadPlan", "apply", "apply_window", "copy_state", "give_grads", "plan", "restore_copy", "save"]

#: keys of a wrapper checkpoint that are not the optimizer's
_WRAPPER_KEYS = frozenset({STATE_KEY, "loss_scaler", "base_param_settings"})


@dataclass(frozen=True)
class LoadPlan:
    """A checked state dict: everything ``apply`` needs, nothing left to check."""

    #: the optimizer's own state dict (the wrapper's keys removed)
    optimizer_state: dict[str, Any]
    #: (inner_count, max_counts, end_unknown), or None for a bare optimizer state dict
    counters: Optional[tuple[int, int, bool]] = None
    #: saved partial gradients, one per parameter (None: no gradient), or None for none usable
    grads: Optional[tuple[Optional[Tensor], ...]] = None
    #: the num_items window the gradients belong to (with ``grads`` only)
    items_window: Optional[SavedWindow] = None
    #: the checked loss scaler state, or None to keep the current one
    scaler_state: Optional[dict[str, Any]] = None


def _rank() -> int:
    """This process's rank in the default process group; 0 outside torch.distributed."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _keeps_own_grads(model: Any) -> bool:
    """Whether ``model`` holds FSDP1/FSDP2 modules, which keep a window's unreduced
    gradients outside the parameters' ``.grad``."""
    root = unwrap_compiled(model)
    if not isinstance(root, torch.nn.Module):
        return False
    fsdp1: tuple[type, ...] = ()
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FullyShardedDataParallel

        fsdp1 = (FullyShardedDataParallel,)
    return any(
        isinstance(m, fsdp1) or callable(getattr(m, "set_requires_gradient_sync", None))
        for m in root.modules()
    )


def save(
    optimizer: torch.optim.Optimizer,
    window: AccumulationWindow,
    items: ItemWindow,
    precision: NoScaling,
    params: list[Tensor],
    *,
    partial_grads: bool,
    model: Any,
) -> dict[str, Any]:
    """The wrapper's state dict (live tensors, not copies)."""
    state = optimizer.state_dict()
    counters = window.state()
    if partial_grads and not window.should_update():
        if _keeps_own_grads(model):
            warn(
                "save_partial_grads: this model is FSDP-sharded and FSDP keeps the window's "
                "gradients inside itself, not in the parameters' .grad, so they are not saved "
                "and a resume from this checkpoint misses the window's earlier micro-batches; "
                "checkpoint at the end of a window, or use save_sharded(), which saves the window "
                "under FSDP2 (docs/checkpoints.md)"
            )
        else:
            counters["grads"] = {i: p.grad.detach() for i, p in enumerate(params) if p.grad is not None}
            counters["grads_rank"] = _rank()
            saved_items = items.saved()
            if saved_items is not None:
                counters["items_window"] = saved_items
    state[STATE_KEY] = counters
    scaler_state = precision.state_dict()
    if scaler_state is not None:
        state["loss_scaler"] = scaler_state
    return state


def _check_groups(state_dict: Mapping[str, Any], optimizer: torch.optim.Optimizer) -> None:
    for key in ("state", "param_groups"):
        if key not in state_dict:
            raise ValueError(
                f"not an optimizer state dict: it has no {key!r} key (keys: {sorted(map(str, state_dict))})"
            )
    saved_groups, groups = state_dict["param_groups"], optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise ValueError(
            f"the state dict has {len(saved_groups)} parameter group(s), the optimizer has {len(groups)}"
        )
    for i, (saved, group) in enumerate(zip(saved_groups, groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"parameter group {i}: the state dict has {len(saved['params'])} parameter(s), "
                f"the optimizer has {len(group['params'])}"
            )


def _check_grads(grads: Any, rank: Any, params: list[Tensor]) -> tuple[Tensor | None, ...] | None:
    """Saved partial gradients, one per parameter; None when another rank saved them."""
    where = f"state dict entry {STATE_KEY}.grads"
    if not isinstance(grads, Mapping):
        raise ValueError(f"{where} must be a dict {{index: tensor}}; got {type(grads).__name__}")
    rank = check_int(rank, f"state dict entry {STATE_KEY}.grads_rank", 0)
    restored: list[Tensor | None] = [None] * len(params)
    for index, grad in grads.items():
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(params):
            raise ValueError(f"{where}: {index!r} is not a parameter index of this optimizer (0 to {len(params) - 1})")
        if not isinstance(grad, Tensor) or not grad.is_floating_point():
            raise ValueError(f"{where}[{index}] must be a floating-point tensor; got {grad!r:.80}")
        if grad.shape != params[index].shape:
            raise ValueError(
                f"{where}[{index}] has shape {tuple(grad.shape)}, the parameter {tuple(params[index].shape)}"
            )
        restored[index] = grad
    here = _rank()
    if rank != here:
        warn(
            f"the checkpoint's partial gradients were saved by data-parallel rank {rank}, "
            f"this is rank {here}, so they are not loaded and this rank's first window after "
            "resuming misses its earlier micro-batches; save and load each rank's own "
            "state_dict() for an exact resume (docs/checkpoints.md)"
        )
        return None
    return tuple(restored)


def plan(
    state_dict: Any,
    optimizer: torch.optim.Optimizer,
    window: AccumulationWindow,
    precision: NoScaling,
    params: list[Tensor],
) -> LoadPlan:
    """Check ``state_dict`` against the wrapper; raise before anything changes."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a dict; got {type(state_dict).__name__}")
    _check_groups(state_dict, optimizer)
    counters = state_dict.get(STATE_KEY)
    checked_counters = grads = items_window = None
    if counters is not None:
        checked_counters = window.check_saved(counters)
        if "grads" in counters:
            grads = _check_grads(counters["grads"], counters.get("grads_rank", 0), params)
            if grads is not None:
                items_window = ItemWindow.check_saved(
                    counters.get("items_window"), f"state dict entry {STATE_KEY}.items_window"
                )
    return LoadPlan(
        optimizer_state={k: v for k, v in state_dict.items() if k not in _WRAPPER_KEYS},
        counters=checked_counters,
        grads=grads,
        items_window=items_window,
        scaler_state=precision.check_saved(state_dict.get("loss_scaler")),
    )


def apply(
    load_plan: LoadPlan,
    optimizer: torch.optim.Optimizer,
    window: AccumulationWindow,
    items: ItemWindow,
    precision: NoScaling,
    params: list[Tensor],
) -> None:
    """Apply a plan. The optimizer loads first: its load is the one that checks more than
    ``plan`` did, and it changes nothing when it fails."""
    optimizer.load_state_dict(load_plan.optimizer_state)
    apply_window(load_plan, optimizer, window, items, precision, params)


def apply_window(
    load_plan: LoadPlan,
    optimizer: torch.optim.Optimizer,
    window: AccumulationWindow,
    items: ItemWindow,
    precision: NoScaling,
    params: list[Tensor],
) -> None:
    """Apply everything of a plan but the optimizer's state (loaded by the caller): the
    counters, the window's gradients and item count, the loss scaler."""
    if load_plan.counters is not None:
        window.load(*load_plan.counters)
    # The window becomes the checkpoint's: its saved gradients and item count, else none;
    # the live window's must not leak into the next update of a rollback in this process.
    if load_plan.grads is not None:
        for param, grad in zip(params, load_plan.grads):
            param.grad = None if grad is None else grad.to(param.device, param.dtype, copy=True)
        window.grads_restored_at = window.inner
        items.restore(load_plan.items_window, params[0].device if params else None)
    else:
        optimizer.zero_grad(set_to_none=True)
        items.reset()
        window.grads_restored_at = -1
    if load_plan.scaler_state is not None:
        precision.load(load_plan.scaler_state)


# -- copies: pickle, torch.save, copy.deepcopy (docs/architecture.md, "Checkpoints and copies")

#: where a copy's state holds the parameters' gradients (torch's Parameter drops them)
_COPIED_GRADS = "_copied_grads"


def copy_state(attributes: dict[str, Any], params: list[Tensor]) -> dict[str, Any]:
    """A wrapper's ``__dict__`` for a copy, with the parameters' gradients when there are any."""
    state = attributes.copy()
    grads = [p.grad for p in params]
    if any(grad is not None for grad in grads):
        state[_COPIED_GRADS] = grads
    return state


def restore_copy(attributes: dict[str, Any], state: dict[str, Any]) -> list[Tensor | None] | None:
    """Fill a copy's ``__dict__`` from ``state``; the copied gradients, if any, for ``give_grads``."""
    state = dict(state)
    grads: list[Tensor | None] | None = state.pop(_COPIED_GRADS, None)
    attributes.update(state)
    return grads


def give_grads(params: list[Tensor], grads: list[Tensor | None] | None) -> None:
    """Give the copied parameters their copied gradients (the copied model's, in order)."""
    if grads is not None:
        for param, grad in zip(params, grads):
            param.grad = grad
