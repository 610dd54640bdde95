"""Every built-in backend passes the conformance suite: through its mock on any machine,
and on the real device where there is one (the "real" runs skip elsewhere)."""

from __future__ import annotations

import pytest

from hwoptim.backends.base import Backend
from hwoptim.backends.generic import GenericBackend, generic_backend_for
from hwoptim.backends.registry import current_accelerator, get_backend
from hwoptim.testing.conformance import BackendConformance


class TestCpuConformance(BackendConformance):
    backend_name = "cpu"


class TestCudaConformance(BackendConformance):
    backend_name = "cuda"


class TestMpsConformance(BackendConformance):
    backend_name = "mps"


class TestXpuConformance(BackendConformance):
    backend_name = "xpu"


class TestNpuConformance(BackendConformance):
    backend_name = "npu"


class TestGenericConformance(BackendConformance):
    """The generic backend: mocked as a PrivateUse1 device; real where torch's current
    accelerator is one no backend claims."""

    backend_name = "generic"
    hardware_marker = ""

    def real_backend(self) -> Backend:
        accelerator = current_accelerator()
        if accelerator is None or generic_backend_for(accelerator) is None:
            pytest.skip(f"torch's current accelerator ({accelerator}) is absent or claimed")
        backend = get_backend(accelerator)
        assert isinstance(backend, GenericBackend)
        return backend
