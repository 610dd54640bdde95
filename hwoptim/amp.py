"""AmpOptimWrapper: OptimWrapper plus autocast and loss scaling, on any backend.

The wrapper asks its Backend for autocast and for the grad scaler, and never looks at the
device type itself. A scaler is made only where it does something: fp16 with
``loss_scale="dynamic"``, or any explicit scale. bf16 and fp32 have fp32's exponent range,
so "dynamic" means no scaler there, and no per-step sync for it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any, Callable, Union

import torch
from torch import Tensor

from hwoptim import _warnings as warnings  # Python warnings, also in mmengine's log (_warnings.py)
from hwoptim._numbers import as_float, check_int, check_real, given
from hwoptim.backends.base import Backend, dtype_name
from hwoptim.backends.registry import DeviceSpec, get_backend
from hwoptim.compile import CompileStep
from hwoptim.num_items import ItemsGroup
from hwoptim.wrapper import OptimWrapper

LossScale = Union[str, float, int, Mapping[str, Any], None]

_LOSS_SCALE_HELP = (
    "loss_scale must be of type float (or int) for a fixed scale, dict of GradScaler "
    "arguments, None (off) or 'dynamic'"
)


# Each GradScaler argument, and each value of its state dict, with what it must be: torch
# checks none of these, so a bad one writes NaN into the weights (a scale of 0), skips every
# step (inf/nan) or fails only at the first step.
def _check_scale(value: Any, what: str) -> float:
    return check_real(value, what, "a positive finite number", lambda x: math.isfinite(x) and x > 0)


def _check_growth_factor(value: Any, what: str) -> float:
    return check_real(value, what, "a finite number > 1 (the scale grows by it)",
                      lambda x: math.isfinite(x) and x > 1)


def _check_backoff_factor(value: Any, what: str) -> float:
    return check_real(value, what, "a number between 0 and 1, both excluded (the scale "
                      "shrinks by it after an overflow)", lambda x: 0 < x < 1)


def _check_growth_interval(value: Any, what: str) -> int:
    return check_int(value, what, 1)


def _check_enabled(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be True or False; got {given(value)}")
    return value


_SCALER_ARGS: dict[str, Callable[[Any, str], Any]] = {
    "init_scale": _check_scale,
    "growth_factor": _check_growth_factor,
    "backoff_factor": _check_backoff_factor,
    "growth_interval": _check_growth_interval,
    "enabled": _check_enabled,
}
_SCALER_STATE: dict[str, Callable[[Any, str], Any]] = {
    "scale": _check_scale,
    "growth_factor": _check_growth_factor,
    "backoff_factor": _check_backoff_factor,
    "growth_interval": _check_growth_interval,
    "_growth_tracker": lambda value, what: check_int(value, what, 0),
}


def parse_loss_scale(
    loss_scale: LossScale, dtype: torch.dtype
) -> tuple[dict[str, Any] | None, float | None]:
    """(GradScaler kwargs or None for no scaler, the fixed scale or None for dynamic).

    Every value is checked here, once: a number of any real type (numpy scalars too) is
    turned into a plain float or int, so the scaler never sees a value it would choke on
    at the first step.
    """
    if loss_scale is None:
        return None, None
    if isinstance(loss_scale, str):
        if loss_scale != "dynamic":
            raise TypeError(f"{_LOSS_SCALE_HELP}, but got {loss_scale!r}")
        return ({} if dtype == torch.float16 else None), None
    if isinstance(loss_scale, Mapping):
        unknown = sorted(map(repr, set(loss_scale) - set(_SCALER_ARGS)))
        if unknown:
            raise ValueError(
                f"loss_scale dict has unknown key(s) {', '.join(unknown)}; "
                f"GradScaler takes {', '.join(_SCALER_ARGS)}"
            )
        kwargs = {
            key: _SCALER_ARGS[key](value, f"loss_scale[{key!r}]")
            for key, value in loss_scale.items()
        }
        if kwargs.get("enabled", True) is False:
            return None, None
        return kwargs, None
    if as_float(loss_scale) is None:
        raise TypeError(f"{_LOSS_SCALE_HELP}, but got {given(loss_scale)}")
    scale = _check_scale(loss_scale, "a fixed loss_scale")
    return {"init_scale": scale}, scale


def check_scaler_state(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A GradScaler state dict from a checkpoint, every value checked: a copy with plain
    numbers, ready for ``load_state_dict``; or a ValueError naming the bad entry.

    torch's ``GradScaler.load_state_dict`` checks nothing: a scale of "abc", 0, nan or None
    loads silently and fails (or turns the weights NaN) steps later.
    """
    missing = [k for k in _SCALER_STATE if k not in saved]
    if missing:
        raise ValueError(f"state dict entry 'loss_scaler' lacks {', '.join(map(repr, missing))}")
    state = dict(saved)  # vendor scalers may keep more keys: passed on as they are
    for key, check in _SCALER_STATE.items():
        state[key] = check(saved[key], f"state dict entry loss_scaler[{key!r}]")
    # The scaler counts in an int32 tensor and grows the scale when the count reaches
    # growth_interval: a count at or past it would never grow the scale again.
    limit = min(state["growth_interval"], 2**31 - 1)
    if state["_growth_tracker"] >= limit:
        raise ValueError(
            "state dict entry loss_scaler['_growth_tracker'] must be below its "
            f"growth_interval ({state['growth_interval']}) and 2**31 - 1; "
            f"got {state['_growth_tracker']}"
        )
    return state


class AmpOptimWrapper(OptimWrapper):
    """OptimWrapper with mixed precision: autocast in ``optim_context`` and loss scaling.

    Args:
        optimizer: the torch optimizer (also accepted by keyword, as mmengine configs pass it).
        device: "auto", a backend name ("cuda", "npu", "cuda:1"), a torch.device or a Backend.
        dtype: None (the device's default), "float16", "bfloat16", "float32", "float64" or a
            torch.dtype. A dtype the device cannot autocast to is a ValueError naming those
            it can.
        loss_scale: "dynamic" (a dynamic scaler for fp16, none otherwise), a number (a fixed
            scale), a dict of GradScaler arguments, or None (no scaling).
        use_fsdp: use the backend's sharded scaler (FSDP): the same scale and the same
            skipped steps on every rank.
        accumulative_counts, clip_grad, num_items_group, save_partial_grads, exact_skip: as
            for OptimWrapper (exact_skip acts where no scaler is on: a scaler skips for
            real). Gradients are unscaled before clipping; a step with inf/nan gradients is
            skipped and the scale backs off. Saved partial gradients are still multiplied by
            the loss scale, which is saved with them.
        compile_step: as for OptimWrapper. With a scaler, its ``unscale_`` and ``update``
            run outside the compiled function, and so does its ``step`` for a non-fused
            optimizer (torch decides that skip on the host); a fused optimizer is stepped
            inside it with the scaler's found_inf, with no host sync.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | None = None,
        device: DeviceSpec = "auto",
        dtype: str | torch.dtype | None = None,
        loss_scale: LossScale = "dynamic",
        use_fsdp: bool = False,
        accumulative_counts: int = 1,
        clip_grad: Mapping[str, Any] | None = None,
        *,
        num_items_group: ItemsGroup = "auto",
        save_partial_grads: bool = False,
        exact_skip: bool = False,
        compile_step: CompileStep = False,
    ) -> None:
        if optimizer is None:
            raise TypeError("AmpOptimWrapper needs an optimizer, e.g. AmpOptimWrapper(optimizer=opt)")
        if not isinstance(use_fsdp, bool):
            raise TypeError(f"use_fsdp must be True or False; got {use_fsdp!r}")
        backend = get_backend(device)
        cast_dtype = backend.resolve_dtype(dtype)
        scaler_kwargs, fixed_scale = parse_loss_scale(loss_scale, cast_dtype)
        super().__init__(
            optimizer,
            accumulative_counts,
            clip_grad,
            num_items_group=num_items_group,
            save_partial_grads=save_partial_grads,
            exact_skip=exact_skip,
            compile_step=compile_step,
        )

        self.backend = backend
        self.device: torch.device = backend.device()
        self.cast_dtype: torch.dtype = cast_dtype
        self.loss_scaler = (
            None if scaler_kwargs is None else backend.grad_scaler(sharded=use_fsdp, **scaler_kwargs)
        )
        self._scale_update_param = fixed_scale
        self._scaler_steps = self.loss_scaler is not None and not self._takes_found_inf
        self._no_sync = backend.no_sync
        self._custom_no_sync = type(backend).no_sync is not Backend.no_sync
        self._rebuild_clip_fn()  # a scaler changes what a non-finite norm means

    def _scaled(self, loss: Tensor) -> Tensor:
        """Backward runs on the scaled loss (on the loss itself when no scaler is on)."""
        scaler = self.loss_scaler
        return loss if scaler is None else scaler.scale(loss)

    def step(self, **kwargs: Any) -> None:
        """Divide by the window's item count (with ``num_items``), unscale, clip, then step
        through the scaler, which skips a step with inf/nan gradients, and update the scale.

        If anything in here raises, the scaler is put back to the start of a step (its
        per-step record of this optimizer is dropped; the scale is left as it was, not
        updated) and the window's gradients, which may be half unscaled, are dropped (set
        to None), so the next window starts clean.
        """
        scaler = self.loss_scaler
        if scaler is None:
            super().step(**kwargs)
            return
        optimizer = self.optimizer
        try:
            empty = self._divide_by_items()
            if self._compiled is not None:
                self._compiled_scaler_step(scaler, empty, kwargs)
                return
            if self._clip_fn is not None or empty is not None:
                scaler.unscale_(optimizer)
                if empty is not None:
                    self._skip_empty_window(scaler, empty)
                if self._clip_fn is not None:
                    self._clip_grads()
            scaler.step(optimizer, **kwargs)
        except BaseException:
            self._abandon_step()
            raise
        self._count_scaler_skip(scaler)
        scaler.update(self._scale_update_param)

    def _compiled_scaler_step(self, scaler: Any, empty: Tensor | None, kwargs: dict[str, Any]) -> None:
        """compile_step under a scaler: unscale eagerly (torch's own, all-reduced by a
        sharded scaler), the compiled update with the scaler's found_inf, then the scaler's
        step for a non-fused optimizer and its update."""
        optimizer = self.optimizer
        scaler.unscale_(optimizer)
        if empty is not None:
            self._skip_empty_window(scaler, empty)
        self._compiled_step(self._scaler_found_inf(scaler), None, kwargs)
        if self._scaler_steps:
            scaler.step(optimizer, **kwargs)
        scaler.update(self._scale_update_param)

    def _placement_device(self) -> torch.device:
        return self.device

    def _abandon_step(self) -> None:
        """OptimWrapper's, plus the scaler's per-step state: without this the next
        ``unscale_`` raises "unscale_() has already been called", or, without clipping, the
        next step takes still-scaled gradients for unscaled ones and skips the inf check."""
        states = getattr(self.loss_scaler, "_per_optimizer_states", None)
        if isinstance(states, dict):
            states.pop(id(self.optimizer), None)
        # GradScaler hands a fused optimizer its scale and found_inf as attributes and
        # removes them only after a step that returned
        self.optimizer.__dict__.pop("grad_scale", None)
        super()._abandon_step()

    def _forward_context(self) -> AbstractContextManager[Any]:
        """``optim_context`` runs the forward in autocast to ``cast_dtype``."""
        return self.backend.autocast(self.cast_dtype)

    @property
    def loss_scale(self) -> Tensor | None:
        """The current loss scale as a device tensor (None without a scaler or before the
        first step). Reading its value is a host sync: log it every N steps."""
        get_scale = getattr(self.loss_scaler, "_get_scale_async", None)
        return None if get_scale is None else get_scale()

    def _skip_empty_window(self, scaler: Any, empty: Tensor) -> None:
        """Make the scaler skip a window without items: its found_inf, which the scaler's
        step (and a fused optimizer) reads, gets the flag added. The scaler cannot tell
        this from an overflow, so its scale backs off once too."""
        states = getattr(scaler, "_per_optimizer_states", {}).get(id(self.optimizer), {})
        for found in states.get("found_inf_per_device", {}).values():
            found.add_(empty.to(found.device, non_blocking=True))

    def _count_scaler_skip(self, scaler: Any) -> None:
        found = self._scaler_found_inf(scaler)
        if found is not None:
            self._count_skipped(found)

    def _scaler_found_inf(self, scaler: Any) -> Tensor | None:
        """The scaler's found_inf for this optimizer after unscale_, over all devices."""
        states = getattr(scaler, "_per_optimizer_states", None)
        if not isinstance(states, dict) or id(self.optimizer) not in states:
            return None
        found = list(states[id(self.optimizer)].get("found_inf_per_device", {}).values())
        if not found:
            return None
        total: Tensor = found[0]
        for other in found[1:]:  # parameters on several devices: any inf skips the step
            total = total + other.to(total.device, non_blocking=True)
        # Skipped when > 0: found_inf sums over devices, and the sharded scaler all-reduces
        # it, so it can exceed 1 (and has shape (1,) there).
        return total

    # -- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """OptimWrapper's state dict plus mmengine's "loss_scaler" when a scaler is on.

        Without a scaler (bf16, fp32) the key is left out rather than saved empty:
        mmengine's AmpOptimWrapper loads a checkpoint without it, but not one with ``{}``.
        """
        state = super().state_dict()
        if self.loss_scaler is not None:
            state["loss_scaler"] = self.loss_scaler.state_dict()
        return state

    def _check_state_dict(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        plan = super()._check_state_dict(state_dict)
        saved = state_dict.get("loss_scaler")
        if saved is None or (isinstance(saved, Mapping) and not saved):
            return plan  # an fp32/bf16 or plain optimizer checkpoint: keep the current scale
        if not isinstance(saved, Mapping):
            raise ValueError(f"state dict entry 'loss_scaler' must be a dict; got {type(saved).__name__}")
        if self.loss_scaler is None:
            warnings.warn(
                "the checkpoint holds a loss scaler state, but this wrapper scales no loss "
                f"(dtype {dtype_name(self.cast_dtype)}); the saved scale is ignored",
                UserWarning,
                stacklevel=3,
            )
            return plan
        plan["loss_scaler"] = check_scaler_state(saved)
        return plan

    def _apply_state_dict(self, state_dict: Mapping[str, Any], plan: dict[str, Any]) -> None:
        # The optimizer loads first: it is the one part whose load checks more than
        # _check_state_dict did, and it changes nothing when it fails. The scaler's values
        # are checked and plain numbers by now, so loading them cannot fail half-way.
        super()._apply_state_dict(state_dict, plan)
        if "loss_scaler" in plan:
            self.loss_scaler.load_state_dict(plan["loss_scaler"])

    def _repr_extra(self) -> list[str]:
        if self.loss_scaler is None:
            scale = "None"
        elif self._scale_update_param is not None:
            scale = f"fixed {self._scale_update_param}"
        else:
            scale = type(self.loss_scaler).__name__
        return [
            f"  device={self.device!s} ({self.backend.name}),",
            f"  dtype={dtype_name(self.cast_dtype)},",
            f"  loss_scaler={scale},",
        ]
