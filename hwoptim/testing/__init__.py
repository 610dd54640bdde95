"""Testing helpers shipped with hwoptim: run every backend's code on a CPU-only machine.

- ``mock_backend(name)``: fake a backend's vendor APIs on the CPU, record the calls.
- ``register_stand_in``: how a plugin teaches ``mock_backend`` its vendor module.
- ``hwoptim.testing.conformance.BackendConformance``: the pytest suite every backend passes.
- The pytest plugin (loaded automatically once hwoptim is installed): the fixtures
  ``hwoptim_mock_backend`` and ``hwoptim_device`` and the ``--hwoptim-device`` option.

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
