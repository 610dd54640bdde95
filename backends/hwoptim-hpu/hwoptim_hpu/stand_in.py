"""The stand-in hwoptim.testing.mock_backend("hpu") installs: habana_frameworks on the CPU.

It fakes what HpuBackend touches, the way the Gaudi stack provides it: importing
``habana_frameworks.torch`` creates ``torch.hpu``.
"""

from __future__ import annotations

import types

import torch

from hwoptim.testing import VendorMock

MOCK_VERSION = "0.0+hwoptim.mock"


def install(mock: VendorMock) -> None:
    """Make habana_frameworks.torch importable, with torch.hpu as the mock's devices."""
    hpu = mock.device_module("torch.hpu")

    def imported(module: types.ModuleType) -> None:
        mock.patch(torch, "hpu", hpu)

    mock.vendor_module("habana_frameworks")
    mock.vendor_module(
        "habana_frameworks.torch", {"__version__": MOCK_VERSION, "hpu": hpu}, on_import=imported
    )
