"""The emulated accelerator's suites: collected only in a process that installed it,

    python -m pytest --hwoptim-device emulated:emu tests/emulated
    python -m pytest --hwoptim-device emulated:npu tests/emulated

(tests/conftest.py leaves this folder out of every other run; .ci/run runs both).
"""

from __future__ import annotations

import pytest
import torch

from hwoptim import Backend
from hwoptim.testing.emulated import installed_device_type


@pytest.fixture
def device(hwoptim_device: Backend) -> torch.device:
    """The device the tests run on, through hwoptim's plugin as a user's suite would get it."""
    device = hwoptim_device.device()
    assert device.type == installed_device_type(), "tests/emulated needs --hwoptim-device emulated:NAME"
    return device
