"""Any accelerator torch reports that no backend claims, through torch.accelerator.

New hardware (a PrivateUse1 device, or one a vendor registers under its own name) works
before anyone writes a backend for it: devices come from ``torch.accelerator``, autocast
from ``torch.autocast(device_type)``, the scaler from ``torch.amp.GradScaler(device_type)``
and the collective library from the map torch.distributed keeps per device type.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from hwoptim.backends import registry
from hwoptim.backends.base import Backend
from hwoptim.backends.registry import current_accelerator, list_backends


class GenericBackend(Backend):
    """The device type ``torch.accelerator.current_accelerator()`` reports, used as torch does.

    Never picked by priority: "auto" reaches it only as torch's current accelerator.
    """

    priority = -1

    def is_available(self) -> bool:
        return current_accelerator() == self.device_type and _accelerator_available()

    def unavailable_reason(self) -> str:
        current = current_accelerator() or "none"
        return (
            f"torch reports no usable {self.device_type!r} accelerator (its current "
            f"accelerator is {current}); install the torch extension for this device"
        )

    @property
    def amp_dtypes(self) -> tuple[torch.dtype, ...]:
        # A PrivateUse1 module may say what its autocast takes; torch asks it the same way.
        supported = getattr(self._module(), "get_amp_supported_dtype", None)
        dtypes = tuple(supported()) if supported is not None else (torch.float16, torch.bfloat16)
        return (*dtypes, torch.float32)

    @property
    def default_amp_dtype(self) -> torch.dtype:
        dtypes = self.amp_dtypes
        try:
            default = torch.get_autocast_dtype(self.device_type)
        except Exception:  # a device type torch's autocast does not know
            return dtypes[0]
        return default if default in dtypes else dtypes[0]

    def device_count(self) -> int:
        return int(torch.accelerator.device_count()) if self.is_available() else 0

    def current_device(self) -> int:
        return int(torch.accelerator.current_device_index())

    def set_device(self, index: int) -> None:
        torch.accelerator.set_device_index(index)

    def synchronize(self) -> None:
        try:
            torch.accelerator.synchronize()
        except RuntimeError:
            # A device registered from Python (PrivateUse1 without a C++ device guard,
            # such as hwoptim.testing.emulated) cannot synchronize through torch.accelerator;
            # its device module can.
            module_synchronize = getattr(self._module(), "synchronize", None)
            if module_synchronize is None:
                raise
            module_synchronize()

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)  # seeds the CPU and every accelerator, custom ones too

    def memory_stats(self) -> dict[str, Any]:
        try:
            return dict(torch.accelerator.memory_stats(self.current_device()))
        except Exception:
            return {}

    def __reduce__(self) -> tuple[Any, ...]:
        # The class is made at run time, one per device type (see _generic_class), so pickle
        # cannot find it by name: a copy rebuilds it from the device type.
        return (_generic_instance, (self.device_type, self.index), self.__dict__.copy())


def generic_backend_for(device_type: str) -> type[Backend] | None:
    """A GenericBackend subclass for ``device_type``, or None.

    None when a registered backend claims the type or torch does not know it as an
    accelerator: it must be the current accelerator, the PrivateUse1 name, or have a
    device module ``torch.<device_type>`` with ``is_available``.
    """
    if any(cls.device_type == device_type for cls in list_backends().values()):
        return None
    if not _is_accelerator_type(device_type):
        return None
    return _generic_class(device_type)


@functools.cache
def _generic_class(device_type: str) -> type[Backend]:
    attrs = {
        "__doc__": f"The {device_type!r} accelerator, which no backend claims.",
        "__module__": __name__,
        "name": device_type,
        "device_type": device_type,
        "dist_backend": _dist_backend(device_type),
    }
    return type(f"GenericBackend_{device_type}", (GenericBackend,), attrs)


def _generic_instance(device_type: str, index: int | None) -> Backend:
    """A GenericBackend for ``device_type``: how a pickled one comes back."""
    return _generic_class(device_type)(index)


def _is_accelerator_type(device_type: str) -> bool:
    try:
        torch.device(device_type)
    except (RuntimeError, ValueError):
        return False
    if device_type in (current_accelerator(), torch._C._get_privateuse1_backend_name()):
        return True
    return callable(getattr(getattr(torch, device_type, None), "is_available", None))


def _accelerator_available() -> bool:
    try:
        return bool(torch.accelerator.is_available())
    except Exception:
        return False


def _dist_backend(device_type: str) -> str:
    """The collective library torch.distributed maps to this device type (vendors add theirs)."""
    try:
        import torch.distributed as dist

        return str(dist.Backend.default_device_backend_map.get(device_type, "gloo"))
    except Exception:
        return "gloo"


registry._generic_factory = generic_backend_for  # the registry's fallback for unclaimed devices
