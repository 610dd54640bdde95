"""The precision policy: no scaling, or gradient scaling by a GradScaler.

The update core calls the policy at fixed points and never asks which one it holds (the
shape of Lightning's precision plugins): ``scale`` the loss before backward, ``unscale``
before the update (returning the scaler's found_inf, or None where the guard decides),
``step`` the optimizer, ``finish`` after the update, ``abandon`` after a failed one.
Autocast is the AmpOptimWrapper's business (its forward context), not the policy's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable, Union

import torch
from torch import Tensor

from hwoptim import _torch_compat
from hwoptim._numbers import as_float, check_flag, check_int, check_real, given
from hwoptim._warn import warn

__all__ = ["GradScaling", "LossScale", "NoScaling", "check_scaler_state", "parse_loss_scale"]

LossScale = Union[str, float, int, Mapping[str, Any], None]

# mmengine's words (configs and tests written for mmengine match on them)
_LOSS_SCALE_HELP = (
    "loss_scale must be of type float (or int) for a fixed scale, dict of GradScaler "
    "arguments, None (off) or 'dynamic'"
)


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


# torch checks none of these: a bad one writes NaN into the weights (a scale of 0), skips
# every step (inf/nan) or fails only at the first step
_SCALER_ARGS: dict[str, Callable[[Any, str], Any]] = {
    "init_scale": _check_scale,
    "growth_factor": _check_growth_factor,
    "backoff_factor": _check_backoff_factor,
    "growth_interval": _check_growth_interval,
    "enabled": check_flag,
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
    """(GradScaler kwargs or None for no scaler, the fixed scale or None for dynamic),
    every value checked once and turned into a plain float or int."""
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
        kwargs = {key: _SCALER_ARGS[key](value, f"loss_scale[{key!r}]") for key, value in loss_scale.items()}
        if kwargs.get("enabled", True) is False:
            return None, None
        return kwargs, None
    if as_float(loss_scale) is None:
        raise TypeError(f"{_LOSS_SCALE_HELP}, but got {given(loss_scale)}")
    scale = _check_scale(loss_scale, "a fixed loss_scale")
    return {"init_scale": scale}, scale


def check_scaler_state(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A GradScaler state dict from a checkpoint, every value checked (torch's
    ``load_state_dict`` checks none): a copy with plain numbers, or a ValueError."""
    missing = [k for k in _SCALER_STATE if k not in saved]
    if missing:
        raise ValueError(f"state dict entry 'loss_scaler' lacks {', '.join(map(repr, missing))}")
    state = dict(saved)  # vendor scalers may keep more keys: passed on as they are
    for key, check in _SCALER_STATE.items():
        state[key] = check(saved[key], f"state dict entry loss_scaler[{key!r}]")
    # counted in int32; a count at or past growth_interval would never grow the scale again
    limit = min(state["growth_interval"], 2**31 - 1)
    if state["_growth_tracker"] >= limit:
        raise ValueError(
            "state dict entry loss_scaler['_growth_tracker'] must be below its "
            f"growth_interval ({state['growth_interval']}) and 2**31 - 1; "
            f"got {state['_growth_tracker']}"
        )
    return state


class NoScaling:
    """The policy without a loss scaler: the guard decides every skip."""

    #: the loss scaler (None: none)
    scaler: Any = None
    #: the fixed loss scale (None: none, or dynamic)
    fixed_scale: float | None = None

    def __init__(self, optimizer: torch.optim.Optimizer, dtype_label: str | None = None) -> None:
        self._optimizer = optimizer
        self._dtype_label = dtype_label  # AmpOptimWrapper's dtype: saved scaler states are ignored

    @property
    def scales(self) -> bool:
        """Whether gradients hold a loss scale until ``unscale``."""
        return False

    def scale(self, loss: Tensor) -> Tensor:
        """The tensor backward runs on."""
        return loss

    def unscale(self, empty: Tensor | None) -> Tensor | None:
        """Before the update: the found_inf the guard must obey (None: the guard decides)."""
        return None

    def step(self, **kwargs: Any) -> Any:
        """Step the optimizer (eagerly)."""
        return self._optimizer.step(**kwargs)

    def compiled_step(self, fused: bool) -> Callable[..., Any] | None:
        """The step compile_step's function calls (None: ``finish`` steps, outside it)."""
        return _torch_compat.unpatched_step(self._optimizer)

    def finish(self, kwargs: Mapping[str, Any], compiled: bool) -> None:
        """After the update."""

    def abandon(self) -> None:
        """After a failed update."""

    @property
    def loss_scale(self) -> Tensor | None:
        """The loss scale tensor (None: no scaler)."""
        return None

    def state_dict(self) -> dict[str, Any] | None:
        """What a checkpoint saves under "loss_scaler" (None: nothing)."""
        return None

    def check_saved(self, saved: Any) -> dict[str, Any] | None:
        """A checkpoint's "loss_scaler" checked; None when there is nothing to load."""
        if saved is None or (isinstance(saved, Mapping) and not saved) or self._dtype_label is None:
            return None
        if not isinstance(saved, Mapping):
            raise ValueError(f"state dict entry 'loss_scaler' must be a dict; got {type(saved).__name__}")
        warn(
            "the checkpoint holds a loss scaler state, but this wrapper scales no loss "
            f"(dtype {self._dtype_label}); the saved scale is ignored"
        )
        return None

    def load(self, state: dict[str, Any]) -> None:
        """Load a state returned by ``check_saved``."""

    def describe(self) -> str:
        """The policy in the wrapper's repr."""
        return "None"


class GradScaling(NoScaling):
    """The policy with a GradScaler: it unscales, decides skips (found_inf) and backs off."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: Any, fixed_scale: float | None) -> None:
        super().__init__(optimizer)
        self.scaler = scaler
        self.fixed_scale = fixed_scale
        self._fused = _torch_compat.takes_found_inf(optimizer)

    @property
    def scales(self) -> bool:
        return True

    def scale(self, loss: Tensor) -> Tensor:
        return self.scaler.scale(loss)  # type: ignore[no-any-return]

    def unscale(self, empty: Tensor | None) -> Tensor | None:
        """Unscale (all-reduced by a sharded scaler); a window without items counts as an
        overflow (the scale backs off once for it too)."""
        scaler, optimizer = self.scaler, self._optimizer
        scaler.unscale_(optimizer)
        if empty is not None:
            _torch_compat.add_to_scaler_found_inf(scaler, optimizer, empty)
        return _torch_compat.scaler_found_inf(scaler, optimizer)

    def step(self, **kwargs: Any) -> Any:
        """The scaler steps: it skips a step with inf/nan gradients (a host read for a
        non-fused optimizer, torch's; a fused one gets found_inf on the device)."""
        return self.scaler.step(self._optimizer, **kwargs)

    def compiled_step(self, fused: bool) -> Callable[..., Any] | None:
        return _torch_compat.unpatched_step(self._optimizer) if self._fused else None

    def finish(self, kwargs: Mapping[str, Any], compiled: bool) -> None:
        if compiled and not self._fused:  # torch decides that skip on the host
            self.scaler.step(self._optimizer, **kwargs)
        self.scaler.update(self.fixed_scale)

    def abandon(self) -> None:
        _torch_compat.forget_scaler_step(self.scaler, self._optimizer)

    @property
    def loss_scale(self) -> Tensor | None:
        return _torch_compat.scaler_scale(self.scaler)

    def state_dict(self) -> dict[str, Any] | None:
        return self.scaler.state_dict()  # type: ignore[no-any-return]

    def check_saved(self, saved: Any) -> dict[str, Any] | None:
        if saved is None or (isinstance(saved, Mapping) and not saved):
            return None  # an fp32/bf16 or plain optimizer checkpoint: keep the current scale
        if not isinstance(saved, Mapping):
            raise ValueError(f"state dict entry 'loss_scaler' must be a dict; got {type(saved).__name__}")
        return check_scaler_state(saved)

    def load(self, state: dict[str, Any]) -> None:
        self.scaler.load_state_dict(state)

    def describe(self) -> str:
        if self.fixed_scale is not None:
            return f"fixed {self.fixed_scale}"
        return type(self.scaler).__name__
