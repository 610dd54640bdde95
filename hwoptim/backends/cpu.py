"""The CPU: always available, always last for device="auto"; autocasts to bfloat16."""

from __future__ import annotations

from typing import Any

import torch

from hwoptim.backends.base import Backend


class CpuBackend(Backend):
    """The host CPU. Autocast defaults to bfloat16; float16 works too (with a scaler)."""

    name = "cpu"
    device_type = "cpu"
    priority = -(10**9)
    dist_backend = "gloo"
    supported_amp_dtypes = (torch.bfloat16, torch.float16, torch.float32)
    default_dtype = torch.bfloat16

    def is_available(self) -> bool:
        return True

    def device(self, index: int | None = None) -> torch.device:
        return torch.device("cpu")

    def device_count(self) -> int:
        return 1

    def current_device(self) -> int:
        return 0

    def set_device(self, index: int) -> None:
        if index != 0:
            raise ValueError(f"the cpu backend has one device, index 0; got {index}")

    def synchronize(self) -> None:
        """CPU work is synchronous: nothing to wait for."""

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def memory_stats(self) -> dict[str, Any]:
        return {}

    def device_name(self, index: int = 0) -> str:
        import platform

        return platform.processor() or platform.machine() or "cpu"
