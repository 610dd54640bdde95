"""Every place hwoptim touches torch internals, in one module.

Written for torch 2.4 to 2.13 (pyproject's floor and the newest version CI runs; the
``.ci/compat`` job runs the suite on the floor). Each helper names the private member it
reads; when torch changes one, this is the only file to change.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = [
    "add_to_scaler_found_inf",
    "forget_scaler_step",
    "fsdp2_unreduced_grads",
    "has_batch_norm",
    "note_scheduler_call",
    "scaler_found_inf",
    "scaler_scale",
    "takes_found_inf",
    "unpatched_step",
]


def takes_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` skips itself on the device when given ``found_inf``.

    Fused torch optimizers (``_step_supports_amp_scaling``, without the older
    ``grad_scaler`` argument) read ``optimizer.found_inf``.
    """
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    try:
        return "grad_scaler" not in inspect.signature(optimizer.step).parameters
    except (TypeError, ValueError):
        return False


def unpatched_step(optimizer: torch.optim.Optimizer) -> Callable[..., Any]:
    """``optimizer.step`` without the LR scheduler's wrapper (``_wrapped_by_lr_sched``,
    ``__wrapped__``), which torch.compile cannot trace; see ``note_scheduler_call``."""
    step = optimizer.step
    wrapped = getattr(step, "__wrapped__", None)
    if getattr(step, "_wrapped_by_lr_sched", False) and wrapped is not None:
        return wrapped.__get__(optimizer, type(optimizer))  # type: ignore[no-any-return]
    return step


def note_scheduler_call(optimizer: torch.optim.Optimizer) -> None:
    """Note a step made through ``unpatched_step`` as the scheduler's wrapper would (``_opt_called``)."""
    if getattr(optimizer.step, "_wrapped_by_lr_sched", False):
        optimizer._opt_called = True  # type: ignore[attr-defined]


def _found_per_device(scaler: Any, optimizer: torch.optim.Optimizer) -> dict[Any, Tensor]:
    """GradScaler's ``_per_optimizer_states[id(optimizer)]["found_inf_per_device"]``."""
    states = getattr(scaler, "_per_optimizer_states", None)
    if not isinstance(states, dict) or id(optimizer) not in states:
        return {}
    return states[id(optimizer)].get("found_inf_per_device", {})  # type: ignore[no-any-return]


def scaler_found_inf(scaler: Any, optimizer: torch.optim.Optimizer) -> Tensor | None:
    """The scaler's found_inf for ``optimizer`` after ``unscale_``, summed over devices
    (> 0: skip; a sharded scaler's is all-reduced, so it may exceed 1); None before."""
    found = list(_found_per_device(scaler, optimizer).values())
    if not found:
        return None
    total: Tensor = found[0]
    for other in found[1:]:
        total = total + other.to(total.device, non_blocking=True)
    return total


def add_to_scaler_found_inf(scaler: Any, optimizer: torch.optim.Optimizer, flag: Tensor) -> None:
    """Add ``flag`` to the scaler's found_inf of ``optimizer``: the scaler then skips the step."""
    for found in _found_per_device(scaler, optimizer).values():
        found.add_(flag.to(found.device, non_blocking=True))


def forget_scaler_step(scaler: Any, optimizer: torch.optim.Optimizer) -> None:
    """Put the scaler back to the start of a step for ``optimizer`` after a failed one.

    Drops its per-step record (else the next ``unscale_`` raises "already been called")
    and the ``grad_scale`` / ``found_inf`` attributes it hands a fused optimizer.
    """
    states = getattr(scaler, "_per_optimizer_states", None)
    if isinstance(states, dict):
        states.pop(id(optimizer), None)
    optimizer.__dict__.pop("grad_scale", None)
    optimizer.__dict__.pop("found_inf", None)


def scaler_scale(scaler: Any) -> Tensor | None:
    """The scaler's scale tensor without a host sync (``_get_scale_async``); None before use."""
    get_scale = getattr(scaler, "_get_scale_async", None)
    return None if get_scale is None else get_scale()


def has_batch_norm(model: Any) -> bool:
    """Whether ``model`` has batch norm layers (torch's ``_BatchNorm`` base)."""
    batch_norm = torch.nn.modules.batchnorm._BatchNorm
    return isinstance(model, torch.nn.Module) and any(isinstance(m, batch_norm) for m in model.modules())


def fsdp2_unreduced_grads(
    model: torch.nn.Module,
) -> list[tuple[Tensor, Tensor, float | None, Callable[[], None]]]:
    """FSDP2's gradients kept unsharded while it skipped the reduce-scatter.

    One ``(sharded parameter, unsharded gradient, divide factor, drop)`` per parameter
    that has one; the factor is the group's ``gradient_divide_factor`` (None: FSDP2's
    default, the data-parallel size); ``drop()`` forgets the gradient, so FSDP2 does not
    reduce it again. Reads ``_get_fsdp_state``,
    ``_fsdp_param_group.fsdp_params`` and each ``FSDPParam``'s ``_unsharded_param`` and
    ``unsharded_accumulated_grad`` (torch 2.6 to 2.13).
    """
    found: list[tuple[Tensor, Tensor, float | None, Callable[[], None]]] = []
    for module in model.modules():
        get_state = getattr(module, "_get_fsdp_state", None)
        group = getattr(get_state(), "_fsdp_param_group", None) if callable(get_state) else None
        for fsdp_param in getattr(group, "fsdp_params", ()):
            accumulated = getattr(fsdp_param, "unsharded_accumulated_grad", None)
            unsharded = getattr(fsdp_param, "_unsharded_param", None)
            grad = accumulated if accumulated is not None else getattr(unsharded, "grad", None)
            if grad is None:
                continue

            def drop(fsdp_param: Any = fsdp_param, unsharded: Any = unsharded) -> None:
                fsdp_param.unsharded_accumulated_grad = None
                if unsharded is not None:
                    unsharded.grad = None

            factor = getattr(group, "gradient_divide_factor", None)
            found.append((fsdp_param.sharded_param, grad, factor, drop))
    return found
