"""The backend conformance kit, for real, on the emulated device: the generic backend when it
is named "emu", hwoptim's npu backend (with the torch_npu stand-in) when named "npu"."""

from __future__ import annotations

from typing import ClassVar

from hwoptim.testing.conformance import REAL, BackendConformance
from hwoptim.testing.emulated import installed_device_type


class TestEmulatedDeviceConformance(BackendConformance):
    backend_name = installed_device_type() or ""
    hardware_marker = ""  # no marker: the device is here in this process
    modes: ClassVar[tuple[str, ...]] = (REAL,)
