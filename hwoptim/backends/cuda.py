"""NVIDIA CUDA, and AMD ROCm (whose torch builds also call the device "cuda")."""

from __future__ import annotations

from typing import Any

import torch

from hwoptim.backends.base import Backend


class CudaBackend(Backend):
    """CUDA GPUs through torch.cuda. fp16 by default; bf16 where the GPU supports it."""

    name = "cuda"
    device_type = "cuda"
    priority = 100
    dist_backend = "nccl"
    default_dtype = torch.float16
    install_hint = "install a CUDA (or ROCm) build of torch, see https://pytorch.org"

    @property
    def amp_dtypes(self) -> tuple[torch.dtype, ...]:
        # CUDA autocast also takes float64 (mmengine's tests rely on it).
        dtypes = [torch.float16]
        if self._bf16_supported():
            dtypes.append(torch.bfloat16)
        return (*dtypes, torch.float32, torch.float64)

    def _bf16_supported(self) -> bool:
        try:
            return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        except Exception:
            return False

    def unavailable_reason(self) -> str:
        if torch.version.cuda is None and torch.version.hip is None:
            return (
                f"this torch {torch.__version__} is a CPU-only build; "
                "install a CUDA or ROCm build of torch from https://pytorch.org"
            )
        return (
            "torch was built with CUDA but no GPU is visible "
            "(check drivers and CUDA_VISIBLE_DEVICES)"
        )

    def vendor_versions(self) -> dict[str, str]:
        versions: dict[str, str] = {}
        if torch.version.hip is not None:
            versions["rocm (hip)"] = str(torch.version.hip)
        if torch.version.cuda is not None:
            versions["cuda"] = str(torch.version.cuda)
        cudnn = getattr(torch.backends, "cudnn", None)
        if cudnn is not None and cudnn.is_available():
            versions["cudnn"] = str(cudnn.version())
        return versions

    def describe(self) -> dict[str, Any]:
        facts = super().describe()
        # ROCm builds of torch call AMD GPUs "cuda": say which build this is, so that
        # a report from an AMD machine is not read as an NVIDIA one.
        if torch.version.hip is not None:
            facts["build"] = f"ROCm {torch.version.hip}: AMD GPUs appear as device type 'cuda'"
        elif torch.version.cuda is not None:
            facts["build"] = f"CUDA {torch.version.cuda}"
        else:
            facts["build"] = "CPU-only torch build"
        return facts
