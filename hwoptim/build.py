"""build_optim_wrapper: a wrapper from a plain dict in mmengine's config shape.

    build_optim_wrapper(model, dict(
        type="AmpOptimWrapper", device="auto", dtype="bfloat16",
        optimizer=dict(type="AdamW", lr=1e-3, weight_decay=0.05),
        clip_grad=dict(max_norm=1.0), accumulative_counts=4,
        paramwise_cfg=dict(norm_decay_mult=0.0, custom_keys={"backbone": dict(lr_mult=0.1)})))

With a ``paramwise_cfg`` the optimizer gets one parameter group per parameter, in the order
mmengine's DefaultOptimWrapperConstructor makes them, so optimizer checkpoints move between
the two. Several optimizers: a dict of such configs by name builds an OptimWrapperDict,
each for the model's submodule of that name. The config is never modified.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from hwoptim.amp import AmpOptimWrapper
from hwoptim.wrapper import OptimWrapper
from hwoptim.wrapper_dict import OptimWrapperDict

__all__ = [
    "ParamwiseGroups", "build_optim_wrapper", "build_optimizer", "resolve_optimizer_type", "resolve_wrapper_type",
]

_WRAPPERS: dict[str, type[OptimWrapper]] = {
    "OptimWrapper": OptimWrapper,
    "AmpOptimWrapper": AmpOptimWrapper,
}
_PARAMWISE_KEYS = (
    "custom_keys",
    "bias_lr_mult",
    "bias_decay_mult",
    "norm_decay_mult",
    "dwconv_decay_mult",
    "flat_decay_mult",
    "dcn_offset_lr_mult",
    "bypass_duplicate",
)
_NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
)
_DCN_NAMES = frozenset({"DeformConv2d", "ModulatedDeformConv2d"})  # mmcv's, found by name


def build_optim_wrapper(model: nn.Module, cfg: Mapping[str, Any]) -> OptimWrapper:
    """Build an OptimWrapper, AmpOptimWrapper or OptimWrapperDict for ``model`` from ``cfg``."""
    if not isinstance(cfg, Mapping):
        raise TypeError(f"cfg must be a dict; got {type(cfg).__name__}")
    if hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module  # DDP / FSDP1 wrappers: parameter names without "module."
    if "optimizer" not in cfg and "type" not in cfg:
        return _build_dict(model, cfg)
    cfg = dict(cfg)
    constructor = cfg.pop("constructor", "DefaultOptimWrapperConstructor")
    if constructor != "DefaultOptimWrapperConstructor":
        raise ValueError(
            f"constructor {constructor!r} is not supported; hwoptim builds what mmengine's "
            "DefaultOptimWrapperConstructor builds (remove the key, or build the wrapper yourself)"
        )
    paramwise_cfg = cfg.pop("paramwise_cfg", None)
    wrapper_cls = resolve_wrapper_type(cfg.pop("type", "OptimWrapper"))
    if "optimizer" not in cfg:
        raise ValueError("cfg needs an 'optimizer' entry, e.g. optimizer=dict(type='AdamW', lr=1e-3)")
    optimizer_cfg = cfg.pop("optimizer")
    _check_wrapper_kwargs(wrapper_cls, cfg)
    optimizer = build_optimizer(model, optimizer_cfg, paramwise_cfg)
    return wrapper_cls(optimizer=optimizer, **cfg)


def build_optimizer(
    model: nn.Module, cfg: Mapping[str, Any] | torch.optim.Optimizer,
    paramwise_cfg: Mapping[str, Any] | None = None,
) -> torch.optim.Optimizer:
    """A torch optimizer for ``model`` from ``dict(type=..., lr=..., ...)``."""
    if isinstance(cfg, torch.optim.Optimizer):
        if paramwise_cfg:
            raise ValueError("paramwise_cfg needs an optimizer config, not a built optimizer")
        return cfg
    if not isinstance(cfg, Mapping):
        raise TypeError(f"optimizer must be a dict with a 'type' or an Optimizer; got {type(cfg).__name__}")
    cfg = dict(cfg)
    if "type" not in cfg:
        raise ValueError("the optimizer config needs a 'type', e.g. dict(type='AdamW', lr=1e-3)")
    optimizer_cls = resolve_optimizer_type(cfg.pop("type"))
    first_arg = next(iter(inspect.signature(optimizer_cls).parameters))
    if first_arg in cfg:
        raise ValueError(f"the optimizer config must not set {first_arg!r}: the model's parameters go there")
    if paramwise_cfg:
        cfg[first_arg] = ParamwiseGroups(paramwise_cfg, cfg.get("lr"), cfg.get("weight_decay")).groups(model)
    else:
        cfg[first_arg] = model.parameters()
    try:
        return optimizer_cls(**cfg)
    except TypeError as exc:
        raise TypeError(f"cannot build {optimizer_cls.__name__} from the config: {exc}") from exc


def resolve_optimizer_type(spec: Any) -> type[torch.optim.Optimizer]:
    """An optimizer class from a class, a torch.optim name ("AdamW") or "module:Name"."""
    if isinstance(spec, type) and issubclass(spec, torch.optim.Optimizer):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"optimizer type must be a name or an Optimizer class; got {spec!r}")
    if ":" in spec:
        found = _import_name(spec)
        if not (isinstance(found, type) and issubclass(found, torch.optim.Optimizer)):
            raise TypeError(f"{spec!r} is not a torch.optim.Optimizer subclass")
        return found
    names = {
        name: obj
        for name, obj in vars(torch.optim).items()
        if isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer
    }
    if spec == "TorchAdafactor" and "Adafactor" in names:  # mmengine's name for torch's Adafactor
        return names["Adafactor"]
    if spec in names:
        return names[spec]
    raise ValueError(_unknown("optimizer type", spec, names, "'my_package.optim:Lion'"))


def resolve_wrapper_type(spec: Any) -> type[OptimWrapper]:
    """A wrapper class from a class, "OptimWrapper", "AmpOptimWrapper" or "module:Name"."""
    if isinstance(spec, type) and issubclass(spec, OptimWrapper):
        return spec
    if isinstance(spec, str) and ":" in spec:
        found = _import_name(spec)
        if not (isinstance(found, type) and issubclass(found, OptimWrapper)):
            raise TypeError(f"{spec!r} is not an hwoptim.OptimWrapper subclass")
        return found
    if isinstance(spec, str) and spec in _WRAPPERS:
        return _WRAPPERS[spec]
    if not isinstance(spec, str):
        raise TypeError(f"wrapper type must be a name or an OptimWrapper class; got {spec!r}")
    raise ValueError(_unknown("optim wrapper type", spec, _WRAPPERS, "'my_package:MyWrapper'"))


class ParamwiseGroups:
    """mmengine's paramwise_cfg: one parameter group per parameter, with lr/decay multipliers.

    custom_keys match a substring of the parameter's full name, longest key first (ties in
    alphabetical order); a matching key sets lr_mult/decay_mult and copies its other keys
    into the group. Otherwise bias_lr_mult, norm_decay_mult, bias_decay_mult,
    dwconv_decay_mult and flat_decay_mult apply, in mmengine's order of precedence.
    """

    def __init__(self, cfg: Mapping[str, Any], base_lr: float | None, base_wd: float | None) -> None:
        if not isinstance(cfg, Mapping):
            raise TypeError(f"paramwise_cfg must be a dict; got {type(cfg).__name__}")
        unknown = sorted(set(cfg) - set(_PARAMWISE_KEYS))
        if unknown:
            raise ValueError(
                f"paramwise_cfg has unknown key(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(_PARAMWISE_KEYS)}"
            )
        custom = cfg.get("custom_keys", {})
        if not isinstance(custom, Mapping) or not all(isinstance(v, Mapping) for v in custom.values()):
            raise TypeError("paramwise_cfg custom_keys must map name substrings to dicts, e.g. "
                            "{'backbone': dict(lr_mult=0.1)}")
        needs_wd = any("decay_mult" in v for v in custom.values()) or any(
            k in cfg for k in ("bias_decay_mult", "norm_decay_mult", "dwconv_decay_mult")
        )
        if needs_wd and base_wd is None:
            raise ValueError("paramwise_cfg sets a decay_mult, so the optimizer config needs a weight_decay")
        needs_lr = any("lr_mult" in v for v in custom.values()) or any(
            k in cfg for k in ("bias_lr_mult", "dcn_offset_lr_mult")
        ) or bool(custom)
        if needs_lr and base_lr is None:
            raise ValueError("paramwise_cfg sets an lr multiplier, so the optimizer config needs an lr")
        self.custom = {k: dict(v) for k, v in custom.items()}
        self.sorted_keys = sorted(sorted(self.custom), key=len, reverse=True)
        self.cfg = dict(cfg)
        self.base_lr = base_lr
        self.base_wd = base_wd

    def groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The parameter groups for ``model``, in mmengine's order."""
        out: list[dict[str, Any]] = []
        self._add(out, model, "", False)
        return out

    def _add(self, out: list[dict[str, Any]], module: nn.Module, prefix: str, in_dcn: bool) -> None:
        cfg = self.cfg
        is_norm = isinstance(module, _NORM_TYPES)
        is_dwconv = isinstance(module, nn.Conv2d) and module.in_channels == module.groups
        for name, param in module.named_parameters(recurse=False):
            if cfg.get("bypass_duplicate", False) and any(
                param is p for group in out for p in group["params"]
            ):
                continue
            if not param.requires_grad:
                continue
            full_name = f"{prefix}.{name}" if prefix else name
            out.append(self._group(param, name, full_name, module, prefix, is_norm, is_dwconv, in_dcn))
        is_dcn = type(module).__name__ in _DCN_NAMES
        for child_name, child in module.named_children():
            self._add(out, child, f"{prefix}.{child_name}" if prefix else child_name, is_dcn)

    def _group(
        self, param: nn.Parameter, name: str, full_name: str, module: nn.Module, prefix: str,
        is_norm: bool, is_dwconv: bool, in_dcn: bool,
    ) -> dict[str, Any]:
        group: dict[str, Any] = {"params": [param]}
        base_lr, base_wd, cfg = self.base_lr, self.base_wd, self.cfg
        for key in self.sorted_keys:
            # mmengine matches against f"{prefix}.{name}", which starts with "." at the top level
            if key in f"{prefix}.{name}":
                custom = self.custom[key]
                group["lr"] = base_lr * custom.get("lr_mult", 1.0)
                if base_wd is not None:
                    group["weight_decay"] = base_wd * custom.get("decay_mult", 1.0)
                group.update(custom)
                return group
        if name == "bias" and not (is_norm or in_dcn) and cfg.get("bias_lr_mult") is not None:
            group["lr"] = base_lr * cfg["bias_lr_mult"]
        if (
            "conv_offset" in prefix and in_dcn and cfg.get("dcn_offset_lr_mult") is not None
            and isinstance(module, nn.Conv2d)
        ):
            group["lr"] = base_lr * cfg["dcn_offset_lr_mult"]
        if base_wd is not None:
            if is_norm and cfg.get("norm_decay_mult") is not None:
                group["weight_decay"] = base_wd * cfg["norm_decay_mult"]
            elif name == "bias" and not in_dcn and cfg.get("bias_decay_mult") is not None:
                group["weight_decay"] = base_wd * cfg["bias_decay_mult"]
            elif is_dwconv and cfg.get("dwconv_decay_mult") is not None:
                group["weight_decay"] = base_wd * cfg["dwconv_decay_mult"]
            elif param.ndim == 1 and not in_dcn and cfg.get("flat_decay_mult") is not None:
                group["weight_decay"] = base_wd * cfg["flat_decay_mult"]
        return group


# -- helpers --------------------------------------------------------------------------------


def _build_dict(model: nn.Module, cfg: Mapping[str, Any]) -> OptimWrapperDict:
    if not cfg:
        raise ValueError("cfg is empty: give dict(type=..., optimizer=...) or one such dict per name")
    wrappers: dict[str, OptimWrapper] = {}
    for name, sub_cfg in cfg.items():
        if isinstance(sub_cfg, OptimWrapper):
            wrappers[name] = sub_cfg
            continue
        if not isinstance(sub_cfg, Mapping):
            raise ValueError(
                "a cfg without 'type' and 'optimizer' is read as one config per submodule name, "
                f"but {name!r} is {type(sub_cfg).__name__}, not a dict"
            )
        part = getattr(model, name, None)
        if not isinstance(part, nn.Module):
            raise ValueError(
                f"cfg names {name!r}, but the model has no submodule {name!r} to optimize; "
                f"its submodules: {[n for n, _ in model.named_children()]}"
            )
        wrappers[name] = build_optim_wrapper(part, sub_cfg)
    return OptimWrapperDict(**wrappers)


def _check_wrapper_kwargs(wrapper_cls: type[OptimWrapper], kwargs: Mapping[str, Any]) -> None:
    params = inspect.signature(wrapper_cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        allowed = ", ".join(p for p in params if p != "optimizer")
        raise ValueError(
            f"{wrapper_cls.__name__} does not take {', '.join(map(repr, unknown))}; it takes {allowed}"
        )


def _import_name(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name!r} named in {spec!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no {attr!r} (from {spec!r})") from None


def _unknown(what: str, name: str, known: Mapping[str, Any], example: str) -> str:
    lowered = {k.lower(): k for k in known}
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    if name.lower() in lowered and lowered[name.lower()] not in close:
        close.insert(0, lowered[name.lower()])
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    return f"unknown {what} {name!r}{hint} Known: {', '.join(sorted(known))}; or 'module:Name', e.g. {example}"
