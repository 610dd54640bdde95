"""Gradient clipping from mmengine's ``clip_grad`` dict, validated once and never mutated.

``dict(max_norm=1.0)`` or ``dict(type="norm", max_norm=1.0, norm_type=2)`` clips by the
total norm; ``dict(type="value", clip_value=0.5)`` clamps each gradient element. Either way
the clip function returns the total gradient norm *before* clipping, as a tensor, so the
caller can log it when it wants without a host-device sync on every step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable, cast

import torch
from torch import Tensor

from hwoptim._grad_norm import _PLAIN, by_mesh, grad_norms
from hwoptim._numbers import check_flag, check_optional_flag, check_positive
from hwoptim.backends.base import unwrap_compiled

__all__ = ["ClipFn", "ClipGrad", "nonfinite_flag", "parse_clip_grad"]

ClipFn = Callable[[Sequence[Tensor]], Tensor]

_ALLOWED = {
    "norm": {"type", "max_norm", "norm_type", "error_if_nonfinite", "foreach"},
    "value": {"type", "clip_value", "foreach"},
}
_REQUIRED = {"norm": "max_norm", "value": "clip_value"}


def _number(kind: str, key: str, value: Any, *, allow_inf: bool = False) -> float:
    return check_positive(value, f"clip_grad {kind!r}: {key}", allow_inf=allow_inf)


def _flag(kind: str, key: str, value: Any, *, allow_none: bool = False) -> bool | None:
    if value is None and allow_none:
        return None
    what = f"clip_grad {kind!r}: {key}"
    return check_optional_flag(value, what) if allow_none else check_flag(value, what)


class ClipGrad:
    """A validated clipping configuration.

    ``kind`` is "norm" or "value"; ``kwargs`` is the mmengine view of the config (the dict
    without "type", as mmengine's ``clip_grad_kwargs``), a fresh copy each time it is read.
    """

    __slots__ = ("clip_value", "error_if_nonfinite", "foreach", "kind", "max_norm", "norm_type")

    def __init__(self, clip_grad: Mapping[str, Any]) -> None:
        if not isinstance(clip_grad, Mapping):
            raise TypeError(
                "clip_grad must be a dict such as dict(max_norm=1.0) or "
                f"dict(type='value', clip_value=0.5); got {type(clip_grad).__name__}"
            )
        kind = clip_grad.get("type", "norm")
        if kind not in _ALLOWED:
            raise ValueError(f"clip_grad type {kind!r} is not one of 'norm', 'value'")
        unknown = sorted(set(clip_grad) - _ALLOWED[kind])
        if unknown:
            allowed = ", ".join(sorted(_ALLOWED[kind] - {"type"}))
            raise ValueError(
                f"clip_grad type {kind!r} does not take {', '.join(map(repr, unknown))}; "
                f"it takes {allowed}"
            )
        required = _REQUIRED[kind]
        if required not in clip_grad:
            raise ValueError(f"clip_grad type {kind!r} needs {required!r}, e.g. {required}=1.0")
        self.kind: str = kind
        self.max_norm = 0.0
        self.norm_type = 2.0
        self.error_if_nonfinite = False
        self.clip_value = 0.0
        self.foreach: bool | None = _flag(
            kind, "foreach", clip_grad.get("foreach"), allow_none=True
        )
        if kind == "norm":
            # inf: measure the norm (last_grad_norm, the non-finite guard), never clip
            self.max_norm = _number(kind, "max_norm", clip_grad["max_norm"], allow_inf=True)
            norm_type = clip_grad.get("norm_type", 2.0)
            if isinstance(norm_type, str) and norm_type.lower() == "inf":
                norm_type = math.inf
            self.norm_type = _number(kind, "norm_type", norm_type, allow_inf=True)
            self.error_if_nonfinite = bool(
                _flag(kind, "error_if_nonfinite", clip_grad.get("error_if_nonfinite", False))
            )
        else:
            self.clip_value = _number(kind, "clip_value", clip_grad["clip_value"])

    @property
    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the torch clip function, like mmengine's clip_grad_kwargs."""
        if self.kind == "norm":
            out: dict[str, Any] = {"max_norm": self.max_norm, "norm_type": self.norm_type}
            if self.error_if_nonfinite:
                out["error_if_nonfinite"] = True
        else:
            out = {"clip_value": self.clip_value}
        if self.foreach is not None:
            out["foreach"] = self.foreach
        return out

    def clip_fn(self, model: Any = None, *, scaled: bool = False) -> ClipFn:
        """The function ``step`` calls: clips the gradients of ``params``, returns the norm
        (on the parameters' device, also when no parameter has a gradient).

        Decided once per model: an FSDP1 module clips through its own ``clip_grad_norm_``
        (the norm over all shards, not this rank's); everything else -- plain gradients,
        DTensors of FSDP2, HSDP, tensor or expert parallelism, on one mesh or several --
        by the global norm of ``hwoptim._grad_norm.grad_norms``: a plain tensor, the same
        on every rank, so all ranks take the same non-finite decision. ``scaled``: a loss
        scaler is on, so a non-finite norm is an overflow the scaler skips, never an error.
        """
        error = self.error_if_nonfinite and not scaled
        if self.kind == "value":
            return self._value_fn()
        owner = unwrap_compiled(model) if model is not None else None
        module_clip = getattr(owner, "clip_grad_norm_", None)
        if callable(module_clip):
            return self._module_norm_fn(module_clip, error)
        max_norm, norm_type, foreach = self.max_norm, self.norm_type, self.foreach
        clip_with_norm = _clip_with_norm_fn()

        def clip_norm(params: Sequence[Tensor]) -> Tensor:
            # torch's clip_grad_norm_ in two halves: the global norm over every layout
            # (hwoptim/_grad_norm.py), then each mesh's gradients scaled by it
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:  # torch's norm of nothing is a zero on the CPU: keep it with the params
                return torch.zeros((), device=params[0].device)
            norm = grad_norms((grads,), norm_type, foreach)[0]
            if error and not bool(torch.isfinite(norm)):  # opted in: this sync is the point
                raise _nonfinite_error(norm)
            if set(map(type, grads)) == _PLAIN:
                clip_with_norm(params, max_norm, norm, foreach)
            else:  # torch's foreach ops refuse gradients on different meshes
                for bucket in by_mesh(params):
                    clip_with_norm(bucket, max_norm, norm, foreach)
            return norm

        return clip_norm

    def _module_norm_fn(self, module_clip: Callable[..., Tensor], error: bool) -> ClipFn:
        max_norm, norm_type = self.max_norm, self.norm_type

        def clip_module(params: Sequence[Tensor]) -> Tensor:
            norm = module_clip(max_norm, norm_type)
            if error and not bool(torch.isfinite(norm)):  # opted in: this sync is the point
                raise _nonfinite_error(norm)
            return norm

        return clip_module

    def _value_fn(self) -> ClipFn:
        clip_value, foreach = self.clip_value, self.foreach

        def clip_value_(params: Sequence[Tensor]) -> Tensor:
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:  # torch's norm of nothing is a zero on the CPU: keep it with the params
                return torch.zeros((), device=params[0].device)
            # the step zeroes the clamped gradients by this norm: every rank sees the same
            norm = grad_norms((grads,), 2.0, foreach)[0]
            if set(map(type, grads)) == _PLAIN:
                torch.nn.utils.clip_grad_value_(params, clip_value, foreach=foreach)
            else:  # torch's foreach ops refuse gradients on different meshes
                for bucket in by_mesh(params):
                    torch.nn.utils.clip_grad_value_(bucket, clip_value, foreach=foreach)
            return norm

        return clip_value_

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"dict(type={self.kind!r}, {args})"


def _nonfinite_error(norm: Tensor) -> RuntimeError:
    """The one error of ``error_if_nonfinite=True`` (a host read the user opted into)."""
    return RuntimeError(
        f"the total gradient norm is non-finite ({norm}), so it cannot be clipped; "
        "pass clip_grad error_if_nonfinite=False to have such steps skipped or zeroed instead"
    )


_ClipWithNormFn = Callable[[Sequence[Tensor], float, Tensor, "bool | None"], None]


def _clip_with_norm_fn() -> _ClipWithNormFn:
    """torch.nn.utils.clip_grads_with_norm_, or the same before torch 2.6."""
    clip_grads_with_norm = getattr(torch.nn.utils, "clip_grads_with_norm_", None)
    if clip_grads_with_norm is not None:
        return cast(_ClipWithNormFn, clip_grads_with_norm)

    @torch.no_grad()
    def fallback(
        params: Sequence[Tensor], max_norm: float, norm: Tensor, foreach: bool | None
    ) -> None:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for param in params:
            if param.grad is not None:
                param.grad.mul_(coef.to(param.grad.device))

    return fallback


def nonfinite_flag(norm: Tensor) -> Tensor:
    """1.0 where ``norm`` is inf or nan, else 0.0, as a float32 tensor on norm's device:
    a found_inf computed on the device, with no host sync."""
    found = (norm * 0.0).nan_to_num_(nan=1.0)  # inf*0 and nan*0 are nan; finite*0 is 0
    return found if found.dtype == torch.float32 else found.float()


def parse_clip_grad(clip_grad: Mapping[str, Any] | None) -> ClipGrad | None:
    """None stays None (no clipping); a dict becomes a validated ClipGrad."""
    if clip_grad is None:
        return None
    return ClipGrad(clip_grad)
