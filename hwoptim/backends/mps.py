"""Apple GPUs through Metal (MPS): fp16 autocast, bf16 from macOS 14, no float64."""

from __future__ import annotations

import platform
from typing import Any

import torch

from hwoptim.backends.base import DTYPE_NAMES, Backend


class MpsBackend(Backend):
    """The one Metal GPU of a Mac. Collectives go through gloo: there is no MPS one."""

    name = "mps"
    device_type = "mps"
    priority = 70
    dist_backend = "gloo"
    default_dtype = torch.float16
    install_hint = "MPS needs macOS 12.3+ on Apple silicon and a macOS build of torch"

    def is_available(self) -> bool:
        try:
            return bool(torch.backends.mps.is_available())
        except Exception:
            return False

    def unavailable_reason(self) -> str:
        if not torch.backends.mps.is_built():
            return f"this torch build has no MPS support; {self.install_hint}"
        return f"torch has MPS support but no Metal device is usable here; {self.install_hint}"

    @property
    def amp_dtypes(self) -> tuple[torch.dtype, ...]:
        # Metal has bfloat16 from macOS 14 (Sonoma) on; float64 not at all. torch can
        # tell the macOS version only where MPS is available.
        if self.is_available() and torch.backends.mps.is_macos_or_newer(14, 0):
            return (torch.float16, torch.bfloat16, torch.float32)
        return (torch.float16, torch.float32)

    def resolve_dtype(self, dtype: str | torch.dtype | None) -> torch.dtype:
        try:
            return super().resolve_dtype(dtype)
        except ValueError as exc:
            named = DTYPE_NAMES.get(dtype.lower()) if isinstance(dtype, str) else dtype
            if named == torch.float64:  # say why, so nobody hunts for a setting
                raise ValueError(f"{exc}; Metal has no float64 at all, use 'float32'") from None
            raise

    # torch.mps knows one device and has no current_device/set_device/get_device_name.
    def device_count(self) -> int:
        return 1 if self.is_available() else 0

    def current_device(self) -> int:
        return 0

    def set_device(self, index: int) -> None:
        if index != 0:
            raise ValueError(f"the mps backend has one device, index 0; got {index}")

    def memory_stats(self) -> dict[str, Any]:
        if not self.is_available():
            return {}
        return {
            "current_allocated_bytes": torch.mps.current_allocated_memory(),
            "driver_allocated_bytes": torch.mps.driver_allocated_memory(),
        }

    def device_name(self, index: int = 0) -> str:
        try:
            return str(torch.backends.mps.get_name())
        except Exception:
            return "Apple GPU (Metal)"

    def vendor_versions(self) -> dict[str, str]:
        return {"macos": platform.mac_ver()[0] or "unknown"}
