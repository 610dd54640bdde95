"""hwoptim backend for Cambricon MLUs: fp16 autocast with torch_mlu's grad scaler, cncl.

torch_mlu is imported only when this backend is asked for; importing it is what creates
``torch.mlu``.
"""

from __future__ import annotations

from typing import Any

import torch

from hwoptim import Backend

__all__ = ["MluBackend"]
__version__ = "0.1.0"


class MluBackend(Backend):
    """Cambricon MLUs. fp16 by default, scaled by torch_mlu's GradScaler."""

    name = "mlu"
    device_type = "mlu"
    priority = 50
    dist_backend = "cncl"
    supported_amp_dtypes = (torch.float16, torch.bfloat16, torch.float32)
    default_dtype = torch.float16
    vendor_module = "torch_mlu"  # its import creates torch.mlu
    install_hint = (
        "install Cambricon's torch_mlu for your torch version together with the "
        "CNToolkit and driver, then pip install hwoptim-mlu"
    )
    no_device_hint = "check cnmon and MLU_VISIBLE_DEVICES"

    def grad_scaler(self, sharded: bool = False, **kwargs: Any) -> torch.amp.GradScaler:
        if sharded:
            return super().grad_scaler(sharded=True, **kwargs)
        return self._module().amp.GradScaler(**kwargs)  # type: ignore[no-any-return]

    def vendor_versions(self) -> dict[str, str]:
        return {"torch_mlu": str(getattr(self._import_vendor()[0], "__version__", "unknown"))}
