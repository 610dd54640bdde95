"""hwoptim backend for Intel Gaudi (HPU): bf16 autocast, hccl collectives.

habana_frameworks.torch, which Intel's Gaudi software stack installs, is imported only when
this backend is asked for; importing it is what creates ``torch.hpu``.
"""

from __future__ import annotations

from importlib import metadata

import torch

from hwoptim import Backend

__all__ = ["HpuBackend"]
__version__ = "0.1.0"


class HpuBackend(Backend):
    """Gaudi accelerators. Gaudi computes in bf16 natively, so no loss scaling is needed."""

    name = "hpu"
    device_type = "hpu"
    priority = 60
    dist_backend = "hccl"  # Habana's collective library (not Huawei's, despite the name)
    supported_amp_dtypes = (torch.bfloat16, torch.float32)
    default_dtype = torch.bfloat16
    vendor_module = "habana_frameworks.torch"  # its import creates torch.hpu
    install_hint = (
        "install the Intel Gaudi software stack (driver and habana-torch-plugin, see "
        "https://docs.habana.ai), then pip install hwoptim-hpu"
    )
    no_device_hint = "check hl-smi and HABANA_VISIBLE_MODULES"

    def vendor_versions(self) -> dict[str, str]:
        try:
            version = metadata.version("habana-torch-plugin")
        except metadata.PackageNotFoundError:
            version = str(getattr(self._import_vendor()[0], "__version__", "unknown"))
        return {"habana-torch-plugin": version}
