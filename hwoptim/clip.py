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

from hwoptim._numbers import check_flag, check_optional_flag, check_positive
from hwoptim.backends.base import unwrap_compiled

__all__ = ["ClipFn", "ClipGrad", "global_norm", "nonfinite_flag", "parse_clip_grad"]

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
        (the norm over all shards, not this rank's); everything else, FSDP2's DTensor
        gradients included, through torch.nn.utils, whose norm over DTensors is the global
        one (returned as a plain tensor, see ``global_norm``). On a mesh of two or more
        dimensions (HSDP, FSDP2 + tensor parallel) the ranks also agree on whether it is
        finite before it clips (``_MeshAgreement``). ``scaled``: a loss scaler is on, so a
        non-finite norm is an overflow the scaler skips, never an error.
        """
        error = self.error_if_nonfinite and not scaled
        if self.kind == "value":
            return self._value_fn()
        owner = unwrap_compiled(model) if model is not None else None
        module_clip = getattr(owner, "clip_grad_norm_", None)
        if callable(module_clip):
            return self._module_norm_fn(module_clip, error)
        max_norm, norm_type, foreach = self.max_norm, self.norm_type, self.foreach
        total_norm, clip_with_norm = _total_norm_fn(), _clip_with_norm_fn()
        agree = _MeshAgreement()

        def clip_norm(params: Sequence[Tensor]) -> Tensor:
            # torch's clip_grad_norm_ in two halves, so that over DTensor gradients the
            # norm that clips is the global one every replica agrees on
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:  # torch's norm of nothing is a zero on the CPU: keep it with the params
                return torch.zeros((), device=params[0].device)
            norm = total_norm(grads, norm_type, error, foreach)
            if type(norm) is not Tensor:
                norm = agree(global_norm(norm), getattr(norm, "device_mesh", None))
                if error and not bool(torch.isfinite(norm)):  # opted in: this sync is the point
                    raise _nonfinite_error(norm, " on some rank of the mesh")
            clip_with_norm(params, max_norm, norm, foreach)
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
        total_norm = _total_norm_fn()
        agree = _MeshAgreement()

        def clip_value_(params: Sequence[Tensor]) -> Tensor:
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:  # torch's norm of nothing is a zero on the CPU: keep it with the params
                return torch.zeros((), device=params[0].device)
            norm = total_norm(grads, 2.0, False, foreach)
            torch.nn.utils.clip_grad_value_(params, clip_value, foreach=foreach)
            if type(norm) is Tensor:
                return norm
            # the step zeroes the clamped gradients by this norm: replicas must agree on it
            return agree(global_norm(norm), getattr(norm, "device_mesh", None))

        return clip_value_

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"dict(type={self.kind!r}, {args})"


def _nonfinite_error(norm: Tensor, where: str = "") -> RuntimeError:
    """The one error of ``error_if_nonfinite=True`` (a host read the user opted into)."""
    return RuntimeError(
        f"the total gradient norm is non-finite ({norm}){where}, so it cannot be clipped; "
        "pass clip_grad error_if_nonfinite=False to have such steps skipped or zeroed instead"
    )


_TotalNormFn = Callable[[list[Tensor], float, bool, "bool | None"], Tensor]
_ClipWithNormFn = Callable[[Sequence[Tensor], float, Tensor, "bool | None"], None]


def _total_norm_fn() -> _TotalNormFn:
    """torch.nn.utils.get_total_norm, or the same computed by hand before torch 2.6."""
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is not None:
        return cast(_TotalNormFn, get_total_norm)

    def fallback(grads: list[Tensor], norm_type: float, error: bool, foreach: bool | None) -> Tensor:
        if not grads:
            return torch.tensor(0.0)
        device = grads[0].device
        norms = [torch.linalg.vector_norm(g.detach(), norm_type).to(device) for g in grads]
        norm = torch.linalg.vector_norm(torch.stack(norms), norm_type)
        if error and not bool(torch.isfinite(norm)):
            raise _nonfinite_error(norm)
        return cast(Tensor, norm)

    return fallback


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


class _MeshAgreement:
    """Makes a global norm over DTensor gradients agree across the replicas of a mesh.

    On a mesh of two or more dimensions (HSDP's replicate x shard, FSDP2 + tensor
    parallel) some dimension holds copies of the gradients, and the norm is computed on
    each copy without comparing them: a fault after the replicas' all-reduce (silent data
    corruption on one replica) would make one replica skip the step and another take it,
    and their weights would part for good. So the non-finite flag is all-reduced over the
    whole mesh -- one scalar collective per update, no host sync -- and where any rank's
    norm is inf or nan, every rank's becomes nan (a rank's own inf stays inf): all skip.
    A one-dimensional mesh (FSDP2) needs nothing: its norm is already one all-reduce
    over every rank of it.
    """

    __slots__ = ("_groups", "_mesh")

    def __init__(self) -> None:
        self._mesh: Any = None
        self._groups: tuple[Any, ...] = ()

    def __call__(self, norm: Tensor, mesh: Any) -> Tensor:
        """``norm`` (a plain tensor, global over ``mesh``) as every rank of the mesh sees it."""
        if mesh is not self._mesh:  # decided once per mesh
            self._mesh, self._groups = mesh, _agreement_groups(mesh)
        if not self._groups:
            return norm
        import torch.distributed as dist

        bad = nonfinite_flag(norm)
        anywhere = bad.clone()
        for group in self._groups:
            dist.all_reduce(anywhere, group=group)
        return torch.where((anywhere > 0) & (bad == 0), torch.nan, norm)


def _agreement_groups(mesh: Any) -> tuple[Any, ...]:
    """The process groups that together span ``mesh`` (none for a 1-D mesh, see above)."""
    if mesh is None or mesh.ndim < 2:
        return ()
    import torch.distributed as dist

    if mesh.size() == dist.get_world_size():
        return (None,)  # the default group: one all-reduce
    return tuple(mesh.get_group(dim) for dim in range(mesh.ndim) if mesh.size(dim) > 1)


def nonfinite_flag(norm: Tensor) -> Tensor:
    """1.0 where ``norm`` is inf or nan, else 0.0, as a float32 tensor on norm's device:
    a found_inf computed on the device, with no host sync."""
    found = (norm * 0.0).nan_to_num_(nan=1.0)  # inf*0 and nan*0 are nan; finite*0 is 0
    return found if found.dtype == torch.float32 else found.float()


def global_norm(norm: Tensor) -> Tensor:
    """A total norm as a plain tensor holding the value over all ranks.

    With FSDP2 (or tensor parallel) gradients are DTensors, and so is the norm torch
    computes over them: replicated, or a partial sum still to be reduced. ``full_tensor()``
    turns either into a plain tensor with the global value -- a collective where a
    reduction is pending, never a host sync -- so ``last_grad_norm`` logs the true norm
    and the non-finite guard (and fused optimizers, which take ``found_inf`` as a plain
    tensor) see the same value on every rank. Other tensor subclasses pass through.
    """
    full_tensor = getattr(norm, "full_tensor", None)
    return norm if full_tensor is None else cast(Tensor, full_tensor())


def parse_clip_grad(clip_grad: Mapping[str, Any] | None) -> ClipGrad | None:
    """None stays None (no clipping); a dict becomes a validated ClipGrad."""
    if clip_grad is None:
        return None
    return ClipGrad(clip_grad)
