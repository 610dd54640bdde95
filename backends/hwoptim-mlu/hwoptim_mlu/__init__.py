"""hwoptim backend for Cambricon MLUs: fp16 autocast with torch_mlu's grad scaler, cncl.

torch_mlu is imported only when this backend is asked for; importing it is what creates
``torch.mlu``.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from hwoptim import Backend

__all__ = ["MluBackend"]
__version__ = "0.1.0"


def _import_torch_mlu() -> tuple[Any, str | None]:
    """(torch_mlu or None, why not)."""
    try:
        return importlib.import_module("torch_mlu"), None
    except ImportError as exc:
        return None, f"torch_mlu is not installed ({exc})"
    except Exception as exc:  # installed but broken: CNToolkit missing, version clash
        return None, f"torch_mlu failed to import: {type(exc).__name__}: {exc}"


class MluBackend(Backend):
    """Cambricon MLUs. fp16 by default, scaled by torch_mlu's GradScaler."""

    name = "mlu"
    device_type = "mlu"
    priority = 50
    dist_backend = "cncl"
    supported_amp_dtypes = (torch.float16, torch.bfloat16, torch.float32)
    default_dtype = torch.float16
    install_hint = (
        "install Cambricon's torch_mlu for your torch version together with the "
        "CNToolkit and driver, then pip install hwoptim-mlu"
    )

    def _module(self) -> Any:
        torch_mlu, _ = _import_torch_mlu()
        return None if torch_mlu is None else getattr(torch, "mlu", None)

    def unavailable_reason(self) -> str:
        torch_mlu, why = _import_torch_mlu()
        if torch_mlu is None:
            return f"{why}; {self.install_hint}"
        return "torch_mlu is installed but no MLU is visible (check cnmon and MLU_VISIBLE_DEVICES)"

    def grad_scaler(self, sharded: bool = False, **kwargs: Any) -> torch.amp.GradScaler:
        if sharded:
            return super().grad_scaler(sharded=True, **kwargs)
        return self._module().amp.GradScaler(**kwargs)  # type: ignore[no-any-return]

    def vendor_versions(self) -> dict[str, str]:
        torch_mlu, _ = _import_torch_mlu()
        return {"torch_mlu": str(getattr(torch_mlu, "__version__", "unknown"))}
