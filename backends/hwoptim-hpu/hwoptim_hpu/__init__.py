"""hwoptim backend for Intel Gaudi (HPU): bf16 autocast, hccl collectives.

habana_frameworks.torch, which Intel's Gaudi software stack installs, is imported only when
this backend is asked for; importing it is what creates ``torch.hpu``.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import Any

import torch

from hwoptim import Backend

__all__ = ["HpuBackend"]
__version__ = "0.1.0"


def _import_habana() -> tuple[Any, str | None]:
    """(habana_frameworks.torch or None, why not)."""
    try:
        return importlib.import_module("habana_frameworks.torch"), None
    except ImportError as exc:
        return None, f"habana_frameworks.torch is not installed ({exc})"
    except Exception as exc:  # installed but broken: driver or library mismatch
        return None, f"habana_frameworks.torch failed to import: {type(exc).__name__}: {exc}"


class HpuBackend(Backend):
    """Gaudi accelerators. Gaudi computes in bf16 natively, so no loss scaling is needed."""

    name = "hpu"
    device_type = "hpu"
    priority = 60
    dist_backend = "hccl"  # Habana's collective library (not Huawei's, despite the name)
    supported_amp_dtypes = (torch.bfloat16, torch.float32)
    default_dtype = torch.bfloat16
    install_hint = (
        "install the Intel Gaudi software stack (driver and habana-torch-plugin, see "
        "https://docs.habana.ai), then pip install hwoptim-hpu"
    )

    def _module(self) -> Any:
        habana, _ = _import_habana()
        return None if habana is None else getattr(torch, "hpu", None)

    def unavailable_reason(self) -> str:
        habana, why = _import_habana()
        if habana is None:
            return f"{why}; {self.install_hint}"
        return "habana_frameworks.torch is installed but no Gaudi device is visible (check hl-smi)"

    def vendor_versions(self) -> dict[str, str]:
        habana, _ = _import_habana()
        try:
            version = metadata.version("habana-torch-plugin")
        except metadata.PackageNotFoundError:
            version = str(getattr(habana, "__version__", "unknown"))
        return {"habana-torch-plugin": version}
