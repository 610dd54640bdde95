"""Gradient clipping from mmengine's ``clip_grad`` dict, validated once and never mutated.

``dict(max_norm=1.0)`` or ``dict(type="norm", max_norm=1.0, norm_type=2)`` clips by the
total norm; ``dict(type="value", clip_value=0.5)`` clamps each gradient element;
``dict(max_norm=1.0, per_group=True)`` (or ``max_norm={"backbone": 1.0, ...}``) clips each
named parameter group by its own norm. Either way the clip function returns the total
gradient norm *before* clipping and each group's, as tensors computed in one pass
(hwoptim._grad_norm), so the caller can log them when it wants without a host-device sync.

A group's name is its param group's ``"name"`` entry, else its index in
``optimizer.param_groups``; param groups sharing a name are one group (``GroupLayout``).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Callable, Union, cast

import torch
from torch import Tensor

from hwoptim._grad_norm import _PLAIN, by_mesh, norms_by_group
from hwoptim._numbers import check_flag, check_optional_flag, check_positive
from hwoptim.backends.base import unwrap_compiled

__all__ = ["ClipFn", "ClipGrad", "GroupLayout", "GroupName", "nonfinite_flag", "parse_clip_grad"]

#: a parameter group's name: its "name" entry, else its index in optimizer.param_groups
GroupName = Union[str, int]
#: what a clip function returns: the total norm, and each group's (None: not known, FSDP1)
Norms = tuple[Tensor, Union[Tensor, None]]
ClipFn = Callable[[Sequence[Tensor], "GroupLayout | None"], Norms]

_ALLOWED = {
    "norm": {"type", "max_norm", "norm_type", "error_if_nonfinite", "foreach", "per_group"},
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


def group_names(param_groups: Sequence[Mapping[str, Any]]) -> list[GroupName]:
    """Each param group's name: its "name" entry, else its index."""
    return [group.get("name", index) for index, group in enumerate(param_groups)]


class GroupLayout:
    """The named groups of an optimizer's param groups, for the per-group norms.

    ``names``: the groups in order of first appearance (param groups sharing a name are one
    group); ``slots``: the group of each parameter of ``params`` (the flat list, group after
    group). The device index tensors are made once per device and set of parameters with a
    gradient, so an update copies nothing from the host.
    """

    __slots__ = ("_indices", "full_index", "limits", "names", "params", "slots")

    def __init__(
        self, param_groups: Sequence[Mapping[str, Any]], params: list[Tensor],
        clip: ClipGrad | None = None,
    ) -> None:
        #: the flat parameter list this layout describes (compared by identity)
        self.params = params
        position: dict[Hashable, int] = {}
        slots: list[int] = []
        for name, group in zip(group_names(param_groups), param_groups):
            try:
                slot = position.setdefault(name, len(position))
            except TypeError:  # an unhashable "name"
                raise TypeError(
                    f"param group names must be str or int (dict keys, log keys); got "
                    f"{type(name).__name__} {name!r}: set group['name'] to a string"
                ) from None
            slots.extend([slot] * len(group["params"]))
        self.names: tuple[GroupName, ...] = tuple(position)  # type: ignore[arg-type]
        self.slots = slots
        #: ``slots`` on the parameters' device, made here: outside compile_step's function,
        #: so that its first call does not compile a cache miss into its guards
        self.full_index: Tensor | None = None
        if len(self.names) > 1 and params:
            self.full_index = torch.tensor(slots, dtype=torch.long, device=params[0].device)
        self._indices: dict[tuple[Any, ...], Tensor] = {}
        #: per_group clipping: each group's max_norm, float32 on the parameters' device
        self.limits: Tensor | None = None
        if clip is not None and clip.per_group and len(self.names) > 1 and params:
            values = [clip.group_max_norms.get(name, clip.max_norm) for name in self.names]
            self.limits = torch.tensor(values, dtype=torch.float32, device=params[0].device)

    def index(self, params: Sequence[Tensor], n_grads: int, device: torch.device) -> tuple[list[int], Tensor]:
        """The slots of the parameters of ``params`` that have a gradient, and the same as a
        long tensor on ``device`` (cached: built once per device and set)."""
        full = self.full_index
        if n_grads == len(params):
            if full is not None and full.device == device:
                return self.slots, full
            key: tuple[Any, ...] = (device,)
            slots = self.slots
        else:
            slots = [s for s, p in zip(self.slots, params) if p.grad is not None]
            key = (device, *slots)
        found = self._indices.get(key)
        if found is None:
            found = self._indices[key] = torch.tensor(slots, dtype=torch.long, device=device)
        return slots, found


class ClipGrad:
    """A validated clipping configuration.

    ``kind`` is "norm" or "value"; ``kwargs`` is the mmengine view of the config (the dict
    without "type", as mmengine's ``clip_grad_kwargs``), a fresh copy each time it is read.
    """

    __slots__ = (
        "clip_value", "error_if_nonfinite", "foreach", "group_max_norms", "kind", "max_norm",
        "norm_type", "per_group",
    )

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
        #: clip each group by its own norm (the total norm is still the one reported)
        self.per_group = False
        #: per_group's max_norm of the groups named in a max_norm dict (others: ``max_norm``)
        self.group_max_norms: dict[GroupName, float] = {}
        self.foreach: bool | None = _flag(
            kind, "foreach", clip_grad.get("foreach"), allow_none=True
        )
        if kind == "norm":
            # inf: measure the norm (last_grad_norm, the non-finite guard), never clip
            max_norm = clip_grad["max_norm"]
            per_group = clip_grad.get("per_group", isinstance(max_norm, Mapping))
            self.per_group = bool(_flag(kind, "per_group", per_group))
            if isinstance(max_norm, Mapping):
                if not self.per_group:
                    raise ValueError(
                        "clip_grad max_norm is a dict of per-group values, but per_group=False; "
                        "drop per_group (a dict means per_group=True) or give one number"
                    )
                self.group_max_norms = _group_max_norms(max_norm)
                self.max_norm = math.inf  # a group the dict does not name is not clipped
            else:
                self.max_norm = _number(kind, "max_norm", max_norm, allow_inf=True)
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
            max_norm: Any = dict(self.group_max_norms) if self.group_max_norms else self.max_norm
            out: dict[str, Any] = {"max_norm": max_norm, "norm_type": self.norm_type}
            if self.error_if_nonfinite:
                out["error_if_nonfinite"] = True
            if self.per_group:
                out["per_group"] = True
        else:
            out = {"clip_value": self.clip_value}
        if self.foreach is not None:
            out["foreach"] = self.foreach
        return out

    def check_groups(self, param_groups: Sequence[Mapping[str, Any]]) -> None:
        """Refuse a param group name that cannot be a key, and a per-group max_norm naming a
        group the optimizer does not have (at construction: nothing is built yet)."""
        GroupLayout(param_groups, [])  # the names must be keys: refused here, not at the first update
        if not self.group_max_norms:
            return
        known = group_names(param_groups)
        unknown = [name for name in self.group_max_norms if name not in known]
        if unknown:
            raise ValueError(
                f"clip_grad max_norm names the param group(s) {unknown!r}, which the optimizer "
                f"does not have; its groups are {known!r} (a group's name is its 'name' entry, "
                "else its index): name the groups, e.g. dict(params=..., name='backbone'), or "
                "fix the keys"
            )

    def clip_fn(self, model: Any = None, *, scaled: bool = False) -> ClipFn:
        """The function ``step`` calls: clips the gradients of ``params``, returns the total
        norm and each group's of ``layout`` (both on the parameters' device, also when no
        parameter has a gradient; one group when ``layout`` is None).

        Decided once per model: an FSDP1 module clips through its own ``clip_grad_norm_``
        (the norm over all shards, not this rank's; no per-group norms: None); everything
        else -- plain gradients, DTensors of FSDP2, HSDP, tensor or expert parallelism, on
        one mesh or several -- by the global norms of ``hwoptim._grad_norm``: plain
        tensors, the same on every rank, so all ranks take the same non-finite decision.
        ``scaled``: a loss scaler is on, so a non-finite norm is an overflow the scaler
        skips, never an error.
        """
        error = self.error_if_nonfinite and not scaled
        if self.kind == "value":
            return self._value_fn()
        owner = unwrap_compiled(model) if model is not None else None
        module_clip = getattr(owner, "clip_grad_norm_", None)
        if callable(module_clip):
            if self.per_group:
                raise ValueError(
                    f"clip_grad per_group=True cannot clip {type(owner).__name__}: it clips "
                    "through its own clip_grad_norm_ (FSDP1's flat parameters have no "
                    "per-group norms); use FSDP2 (fully_shard) or drop per_group"
                )
            return self._module_norm_fn(module_clip, error)
        max_norm, norm_type, foreach = self.max_norm, self.norm_type, self.foreach
        per_group = self.per_group
        clip_with_norm = _clip_with_norm_fn()

        def clip_norm(params: Sequence[Tensor], layout: GroupLayout | None = None) -> Norms:
            # torch's clip_grad_norm_ in two halves: the global norm over every layout
            # (hwoptim/_grad_norm.py), then each mesh's gradients scaled by it
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:  # torch's norm of nothing is a zero on the CPU: keep it with the params
                return _no_norms(params, layout)
            norm, group_norms = _norms(params, grads, layout, norm_type, foreach)
            if error and not bool(torch.isfinite(norm)):  # opted in: this sync is the point
                raise _nonfinite_error(norm)
            if per_group and layout is not None and layout.limits is not None:
                _clip_groups(params, grads, layout, layout.limits, group_norms)
            elif set(map(type, grads)) == _PLAIN:
                clip_with_norm(params, max_norm, norm, foreach)
            else:  # torch's foreach ops refuse gradients on different meshes
                for bucket in by_mesh(params):
                    clip_with_norm(bucket, max_norm, norm, foreach)
            return norm, group_norms

        return clip_norm

    def _module_norm_fn(self, module_clip: Callable[..., Tensor], error: bool) -> ClipFn:
        max_norm, norm_type = self.max_norm, self.norm_type

        def clip_module(params: Sequence[Tensor], layout: GroupLayout | None = None) -> Norms:
            norm = module_clip(max_norm, norm_type)
            if error and not bool(torch.isfinite(norm)):  # opted in: this sync is the point
                raise _nonfinite_error(norm)
            return norm, None

        return clip_module

    def _value_fn(self) -> ClipFn:
        clip_value, foreach = self.clip_value, self.foreach

        def clip_value_(params: Sequence[Tensor], layout: GroupLayout | None = None) -> Norms:
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:  # torch's norm of nothing is a zero on the CPU: keep it with the params
                return _no_norms(params, layout)
            # the step zeroes the clamped gradients by this norm: every rank sees the same
            norms = _norms(params, grads, layout, 2.0, foreach)
            if set(map(type, grads)) == _PLAIN:
                torch.nn.utils.clip_grad_value_(params, clip_value, foreach=foreach)
            else:  # torch's foreach ops refuse gradients on different meshes
                for bucket in by_mesh(params):
                    torch.nn.utils.clip_grad_value_(bucket, clip_value, foreach=foreach)
            return norms

        return clip_value_

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"dict(type={self.kind!r}, {args})"


def _group_max_norms(max_norm: Mapping[Any, Any]) -> dict[GroupName, float]:
    """A per-group max_norm dict, checked: group names (str or int) to positive numbers."""
    if not max_norm:
        raise ValueError("clip_grad max_norm is an empty dict; give {group name: max_norm, ...} "
                         "or one number with per_group=True")
    out: dict[GroupName, float] = {}
    for name, value in max_norm.items():
        if isinstance(name, bool) or not isinstance(name, (str, int)):
            raise TypeError(
                f"clip_grad max_norm keys must be param group names (str) or indices (int); "
                f"got {name!r} ({type(name).__name__})"
            )
        out[name] = _number("norm", f"max_norm[{name!r}]", value, allow_inf=True)
    return out


def _norms(
    params: Sequence[Tensor], grads: list[Tensor], layout: GroupLayout | None, p: float,
    foreach: bool | None,
) -> tuple[Tensor, Tensor]:
    """The total norm of ``grads`` and each group's of ``layout`` (one when it is None)."""
    if layout is None or len(layout.names) == 1:
        total, _ = norms_by_group(grads, (), 1, p, foreach)
        return total, total.reshape(1)
    slots, index = layout.index(params, len(grads), grads[0].device)
    return norms_by_group(grads, slots, len(layout.names), p, foreach, index=index)


def _no_norms(params: Sequence[Tensor], layout: GroupLayout | None) -> Norms:
    """No gradient at all: zeros on the parameters' device."""
    device = params[0].device
    return torch.zeros((), device=device), torch.zeros(1 if layout is None else len(layout.names), device=device)


@torch.no_grad()
def _clip_groups(
    params: Sequence[Tensor], grads: list[Tensor], layout: GroupLayout, limits: Tensor,
    group_norms: Tensor,
) -> None:
    """per_group: scale each group's gradients by min(1, its max_norm / (its norm + 1e-6)),
    torch's coefficient, on the device (one gather, then one multiply per gradient)."""
    limits = limits.to(group_norms.device, group_norms.dtype)
    coef = torch.clamp(limits / (group_norms + 1e-6), max=1.0)
    _, index = layout.index(params, len(grads), group_norms.device)
    per_tensor = coef.index_select(0, index).unbind(0)
    if set(map(type, grads)) == _PLAIN and len({g.device for g in grads}) == 1:
        torch._foreach_mul_(grads, list(per_tensor))
    else:  # DTensors, or gradients on several devices
        for grad, c in zip(grads, per_tensor):
            grad.mul_(c.to(grad.device))


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
