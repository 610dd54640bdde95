"""Intel GPUs through torch's native torch.xpu (torch 2.4+).

intel-extension-for-pytorch is optional: torch's XPU builds need it for nothing hwoptim
does, so this backend never imports it (importing it is slow); env reports its version.
"""

from __future__ import annotations

from importlib import metadata

import torch

from hwoptim.backends.base import Backend

_IPEX = "intel-extension-for-pytorch"


class XpuBackend(Backend):
    """Intel Data Center / Arc GPUs. bf16 by default (fp16 works too), collectives on xccl."""

    name = "xpu"
    device_type = "xpu"
    priority = 90
    dist_backend = "xccl"
    default_dtype = torch.bfloat16
    install_hint = (
        "install an XPU build of torch (pip install torch --index-url "
        'https://download.pytorch.org/whl/xpu); pip install "hwoptim[xpu]" adds the '
        "optional intel-extension-for-pytorch"
    )

    def unavailable_reason(self) -> str:
        compiled = getattr(torch.xpu, "_is_compiled", lambda: False)
        if not compiled():
            return f"this torch {torch.__version__} build has no XPU support; {self.install_hint}"
        return (
            "torch has XPU support but no Intel GPU is visible (check the GPU driver and "
            "oneAPI runtime, and ZE_AFFINITY_MASK)"
        )

    def vendor_versions(self) -> dict[str, str]:
        versions = {"torch xpu": str(getattr(torch.version, "xpu", None) or "unknown")}
        try:
            versions["intel-extension-for-pytorch"] = metadata.version(_IPEX)
        except metadata.PackageNotFoundError:
            pass  # optional: native torch.xpu needs no extension
        return versions
