"""The emulated accelerator's suites: collected only in a process that installed it,

    python -m pytest --hwoptim-device emulated:emu tests/emulated
    python -m pytest --hwoptim-device emulated:npu tests/emulated

(tests/conftest.py leaves this folder out of every other run; .ci/run runs both).
"""

from __future__ import annotations

import pytest
import torch

from hwoptim.testing.emulated import installed_device_type


@pytest.fixture
def device() -> torch.device:
    """The emulated device the tests run on (index 0); installed by hwoptim's pytest plugin."""
    device_type = installed_device_type()
    assert device_type is not None, "tests/emulated needs --hwoptim-device emulated:NAME"
    return torch.device(device_type, 0)
