"""Device tensors over CPU memory: a DLPack capsule re-tagged between the CPU and PrivateUse1.

A CPU tensor's capsule re-tagged as an "extension device" imports as a PrivateUse1 tensor
sharing its memory, and the reverse gives a CPU alias of a device tensor. ``check_layout``
proves the capsule layout on a live tensor before anything relies on it.
"""

from __future__ import annotations

import ctypes
from typing import Any, Callable, cast

import torch

__all__ = ["CPU_KEYS", "check_layout", "cpu_alias", "metadata", "on_device"]

_kDLCPU = 1
_kDLExtDev = 12  # torch imports it as PrivateUse1
# The legacy DLManagedTensor starts with a DLTensor: void* data, then DLDevice {int32 type,
# int32 id}. check_layout() checks this layout on a live capsule.
_DEVICE_TYPE_OFFSET = 8
_DEVICE_ID_OFFSET = 12

_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_to_dlpack: Callable[[torch.Tensor], Any] = getattr(torch.utils.dlpack, "to_dlpack")  # noqa: B009 (untyped)

#: redispatching to these runs an op's CPU kernel, whatever device its tensors are on
CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


def check_layout() -> None:
    """Refuse a torch whose DLPack capsules are laid out otherwise than this module writes them."""
    probe = torch.arange(3.0)
    capsule = _to_dlpack(probe)
    address = _capsule_pointer(capsule, b"dltensor")
    data = ctypes.c_void_p.from_address(address).value
    device = ctypes.c_int32.from_address(address + _DEVICE_TYPE_OFFSET).value
    if data != probe.data_ptr() or device != _kDLCPU:
        raise RuntimeError(
            f"torch {torch.__version__} exports DLPack in a layout the emulated device does not "
            "know, so it cannot create device tensors on this torch"
        )


def _retag(tensor: torch.Tensor, device_type: int, index: int) -> torch.Tensor:
    """``tensor``'s memory imported as a tensor of DLPack device ``device_type``:``index``."""
    capsule = _to_dlpack(tensor)
    address = _capsule_pointer(capsule, b"dltensor")
    ctypes.c_int32.from_address(address + _DEVICE_TYPE_OFFSET).value = device_type
    ctypes.c_int32.from_address(address + _DEVICE_ID_OFFSET).value = index
    return torch._C._from_dlpack(capsule)


def cpu_alias(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor over the same memory as the device tensor ``tensor``."""
    if tensor.numel() == 0:  # nothing to share; an empty DLPack may carry a null pointer
        return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype)
    return _retag(tensor, _kDLCPU, 0)


def on_device(tensor: torch.Tensor, index: int) -> torch.Tensor:
    """A device tensor (device ``index``) that owns a reference to CPU tensor ``tensor``'s memory."""
    if tensor.numel() == 0:
        base = _retag(torch.empty(1, dtype=tensor.dtype), _kDLExtDev, index)
        return metadata(torch.ops.aten.as_strided.default, base, tensor.shape, tensor.stride(), 0)
    return _retag(tensor, _kDLExtDev, index)


def metadata(op: Any, *args: Any) -> torch.Tensor:
    """Run ``op``'s CPU kernel on device tensors: it only builds or rewrites their metadata."""
    return cast(torch.Tensor, op.redispatch(CPU_KEYS, *args))
