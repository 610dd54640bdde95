"""Testing helpers shipped with hwoptim: run every backend's code on a CPU-only machine.

- ``mock_backend(name)``: fake a backend's vendor APIs on the CPU, record the calls.
- ``register_stand_in``: how a plugin teaches ``mock_backend`` its vendor module.
- ``hwoptim.testing.conformance.BackendConformance``: the pytest suite every backend passes.
- The pytest plugin (loaded automatically once hwoptim is installed): the fixtures
  ``hwoptim_mock_backend`` and ``hwoptim_device`` and the ``--hwoptim-device`` option.
- ``hwoptim.testing.emulated``: a real non-CPU device type backed by host memory (placement
  errors like CUDA's, host reads counted), once per process: ``--hwoptim-device
  emulated:emu`` or ``python -m hwoptim.testing.emulated -- script.py``. Import it
  explicitly; importing this package does not install anything.

Importing this package needs no pytest; only the conformance suite and the plugin do.
"""

from hwoptim.testing import stand_ins as _built_in_stand_ins  # noqa: F401 (registers them)
from hwoptim.testing.mock import (
    VendorCall,
    VendorMock,
    active_mocks,
    mock_backend,
    register_stand_in,
    stand_in_names,
)

__all__ = [
    "VendorCall",
    "VendorMock",
    "active_mocks",
    "mock_backend",
    "register_stand_in",
    "stand_in_names",
]
