"""Autocast for the emulated device: torch's own CUDA policy, as AutocastPrivateUse1 kernels.

torch registers no AutocastPrivateUse1 kernels (a C++ backend brings its own), so without
these every op under ``torch.autocast(<emulated>)`` fails with "Could not run 'aten::linear'
with arguments from the 'Autocast<name>' backend". The op lists come from the
``ATen/autocast_mode.h`` shipped with the installed torch, so the policy (which ops run in
the low dtype, which in fp32, which promote) is exactly the one CUDA uses on that torch.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable

import torch

__all__ = ["install"]

#: the policy of each op list in autocast_mode.h
_POLICIES = (
    ("AT_FORALL_LOWER_PRECISION_FP", "lower"),
    ("AT_FORALL_FP32", "fp32"),
    ("AT_FORALL_FP32_SET_OPT_DTYPE", "fp32_set_dtype"),
    ("AT_FORALL_PROMOTE", "promote"),
)

# Used only where the wheel ships no headers: the ops a training step meets most.
_FALLBACK_LISTS = {
    "lower": [
        "_convolution", "conv1d", "conv2d", "conv3d", "convolution", "addmm", "addmv", "matmul",
        "mm", "mv", "linear", "addbmm", "baddbmm", "bmm", "scaled_dot_product_attention",
    ],
    "fp32": [
        "exp", "log", "log1p", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar",
        "layer_norm", "native_layer_norm", "rms_norm", "group_norm", "nll_loss", "nll_loss2d",
        "mse_loss", "l1_loss", "smooth_l1_loss", "binary_cross_entropy_with_logits", "logsumexp",
    ],
    "fp32_set_dtype": ["softmax.int", "log_softmax.int", "sum", "sum.dim_IntList", "cumsum"],
    "promote": ["addcdiv", "addcmul", "dot", "index_put", "scatter_add"],
}

_library: Any = torch.library  # untyped in torch


def _op_lists() -> dict[str, list[str]]:
    """{policy: ["op" or "op.overload", ...]} from the installed torch's autocast_mode.h."""
    header = os.path.join(os.path.dirname(torch.__file__), "include", "ATen", "autocast_mode.h")
    try:
        with open(header, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return {policy: list(ops) for policy, ops in _FALLBACK_LISTS.items()}
    lists: dict[str, list[str]] = {}
    for macro, policy in _POLICIES:
        match = re.search(rf"#define {macro}\(_\)\s*\\\n(.*?)\n\s*\n", text, re.S)
        if match is None:
            raise RuntimeError(f"{header} has no {macro} list; this torch's autocast layout is unknown")
        ops = []
        for name, overload in re.findall(r"_\((\w+)(?:,\s*(\w+))?\)", match.group(1)):
            if overload != "deprecated":  # a C++-only signature, no dispatcher overload
                ops.append(f"{name}.{overload}" if overload else name)
        lists[policy] = ops
    return lists


def install(device_type: str) -> list[Any]:
    """Register the AutocastPrivateUse1 kernels; returns the libraries, which must be kept alive."""
    fallthrough = _library.Library("_", "IMPL")  # ops in no list run untouched
    fallthrough.fallback(_library.fallthrough_kernel, "AutocastPrivateUse1")
    lib = _library.Library("aten", "IMPL")
    for policy, ops in _op_lists().items():
        for qualified in ops:
            op = _overload(qualified)
            if op is not None:  # else listed for a torch build that has it; this one does not
                lib.impl(qualified, _kernel(op, policy, device_type), "AutocastPrivateUse1")
    return [fallthrough, lib]


def _overload(qualified: str) -> Any:
    """The aten overload named ``qualified`` ("op" or "op.overload"), or None if this torch lacks it."""
    name, _, overload = qualified.partition(".")
    packet = getattr(torch.ops.aten, name, None)
    if packet is None:
        return None
    return getattr(packet, overload or "default", None)


_EXCLUDE = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, "AutocastPrivateUse1"))  # noqa: B009 (untyped)


def _kernel(op: Any, policy: str, device_type: str) -> Callable[..., Any]:
    """The autocast kernel of ``op``: cast eligible arguments, then run it without autocast."""

    def eligible(x: Any) -> bool:
        return (
            isinstance(x, torch.Tensor) and x.device.type == device_type
            and x.is_floating_point() and x.dtype != torch.float64
        )

    def cast(x: Any, dtype: torch.dtype) -> Any:
        if isinstance(x, (list, tuple)):
            return type(x)(cast(y, dtype) for y in x)
        return x.to(dtype) if eligible(x) and x.dtype != dtype else x

    def cast_all(args: tuple[Any, ...], kwargs: dict[str, Any], dtype: torch.dtype) -> Any:
        return cast(args, dtype), {k: cast(v, dtype) for k, v in kwargs.items()}

    def widest(values: list[Any]) -> torch.dtype | None:
        found = None
        for value in values:
            for x in value if isinstance(value, (list, tuple)) else (value,):
                if eligible(x):
                    found = x.dtype if found is None else torch.promote_types(found, x.dtype)
        return found

    names = [a.name for a in op._schema.arguments]
    dtype_at = names.index("dtype") if "dtype" in names else -1

    def kernel(*args: Any, **kwargs: Any) -> Any:
        if policy == "lower":
            args, kwargs = cast_all(args, kwargs, torch.get_autocast_dtype(device_type))
        elif policy == "fp32":
            args, kwargs = cast_all(args, kwargs, torch.float32)
        elif policy == "fp32_set_dtype":
            # Reductions/softmax: compute in fp32 unless the caller chose a dtype.
            if dtype_at >= 0 and args and eligible(args[0]):
                if len(args) > dtype_at:
                    if args[dtype_at] is None:
                        args = (*args[:dtype_at], torch.float32, *args[dtype_at + 1:])
                elif kwargs.get("dtype") is None:
                    kwargs = dict(kwargs, dtype=torch.float32)
        else:  # promote: every floating input to the widest of them
            dtype = widest([*args, *kwargs.values()])
            if dtype is not None:
                args, kwargs = cast_all(args, kwargs, dtype)
        with torch._C._ExcludeDispatchKeyGuard(_EXCLUDE):
            return op(*args, **kwargs)

    return kernel
