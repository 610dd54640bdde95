"""Huawei Ascend NPUs through torch_npu, imported only when this backend is asked for."""

from __future__ import annotations

from typing import Any

import torch

from hwoptim.backends.base import Backend


class NpuBackend(Backend):
    """Ascend NPUs: fp16 by default (bf16 on 910B and newer), torch_npu's scaler, hccl."""

    name = "npu"
    device_type = "npu"
    priority = 80
    dist_backend = "hccl"
    default_dtype = torch.float16
    vendor_module = "torch_npu"  # its import creates torch.npu
    install_hint = (
        'pip install "hwoptim[npu]" (torch_npu; it needs the Ascend driver, the CANN '
        "toolkit sourced with set_env.sh, and a torch_npu release matching your torch)"
    )
    no_device_hint = "check npu-smi info, the CANN environment and ASCEND_RT_VISIBLE_DEVICES"

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
        torch_npu, _ = self._import_vendor()
        return torch_npu.npu.amp.GradScaler(**kwargs)  # type: ignore[no-any-return]

    def vendor_versions(self) -> dict[str, str]:
        torch_npu, _ = self._import_vendor()
        versions = {"torch_npu": str(getattr(torch_npu, "__version__", "?"))}
        cann = getattr(torch.version, "cann", None)  # set by torch_npu
        if cann is not None:
            versions["cann"] = str(cann)
        return versions
