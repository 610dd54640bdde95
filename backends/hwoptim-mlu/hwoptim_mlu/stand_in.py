"""The stand-in hwoptim.testing.mock_backend("mlu") installs: torch_mlu on the CPU.

It fakes what MluBackend touches, the way torch_mlu provides it: importing ``torch_mlu``
creates ``torch.mlu``, whose ``amp.GradScaler`` is the MLU's loss scaler.
"""

from __future__ import annotations

import types

import torch

from hwoptim.testing import VendorMock

MOCK_VERSION = "0.0+hwoptim.mock"


def install(mock: VendorMock) -> None:
    """Make torch_mlu importable, with torch.mlu as the mock's devices."""
    scaler = mock.grad_scaler_class("torch.mlu.amp.GradScaler")
    mlu = mock.device_module("torch.mlu", amp=mock.namespace("torch.mlu.amp", GradScaler=scaler))

    def imported(module: types.ModuleType) -> None:
        mock.patch(torch, "mlu", mlu)

    mock.vendor_module("torch_mlu", {"__version__": MOCK_VERSION}, on_import=imported)
