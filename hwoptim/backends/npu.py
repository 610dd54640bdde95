"""Huawei Ascend NPUs through torch_npu, imported only when this backend is asked for."""

from __future__ import annotations

import importlib
from typing import Any

import torch

from hwoptim.backends.base import Backend


def _import_torch_npu() -> tuple[Any, str | None]:
    """(torch_npu or None, why not). Importing it is what creates torch.npu."""
    try:
        return importlib.import_module("torch_npu"), None
    except ImportError as exc:
        return None, f"torch_npu is not installed ({exc})"
    except Exception as exc:  # installed but broken: CANN libraries missing, version clash
        return None, f"torch_npu is installed but failed to import: {type(exc).__name__}: {exc}"


class NpuBackend(Backend):
    """Ascend NPUs: fp16 by default (bf16 on 910B and newer), torch_npu's scaler, hccl."""

    name = "npu"
    device_type = "npu"
    priority = 80
    dist_backend = "hccl"
    default_dtype = torch.float16
    install_hint = (
        'pip install "hwoptim[npu]" (torch_npu; it needs the Ascend driver, the CANN '
        "toolkit sourced with set_env.sh, and a torch_npu release matching your torch)"
    )

    def _module(self) -> Any:
        torch_npu, _ = _import_torch_npu()
        return None if torch_npu is None else getattr(torch, "npu", None)

    def unavailable_reason(self) -> str:
        torch_npu, why = _import_torch_npu()
        if torch_npu is None:
            return f"{why}; {self.install_hint}"
        return (
            "torch_npu is installed but no NPU is visible (check npu-smi info, the CANN "
            "environment and ASCEND_RT_VISIBLE_DEVICES)"
        )

    @property
    def amp_dtypes(self) -> tuple[torch.dtype, ...]:
        # Atlas 910A has no bfloat16; torch_npu says so through torch.npu.is_bf16_supported.
        try:
            bf16 = bool(self._module().is_bf16_supported())
        except Exception:
            bf16 = False
        if bf16:
            return (torch.float16, torch.bfloat16, torch.float32)
        return (torch.float16, torch.float32)

    def grad_scaler(self, sharded: bool = False, **kwargs: Any) -> torch.amp.GradScaler:
        if sharded:
            return super().grad_scaler(sharded=True, **kwargs)
        torch_npu, _ = _import_torch_npu()
        return torch_npu.npu.amp.GradScaler(**kwargs)  # type: ignore[no-any-return]

    def vendor_versions(self) -> dict[str, str]:
        torch_npu, _ = _import_torch_npu()
        versions = {"torch_npu": str(getattr(torch_npu, "__version__", "?"))}
        cann = getattr(torch.version, "cann", None)  # set by torch_npu
        if cann is not None:
            versions["cann"] = str(cann)
        return versions
