"""hwoptim's pytest plugin, loaded by pytest wherever hwoptim is installed (entry point pytest11).

It adds two fixtures and one option, so a project's own suite runs per device:

- ``hwoptim_device``: the Backend a test should run on. ``--hwoptim-device=SPEC``
  (repeatable) picks it: a backend as ``get_backend`` takes it ("cuda", "npu:1", "auto";
  skipped where that hardware is absent) or "mock:NAME", that backend through
  ``mock_backend`` on the CPU, or "emulated:NAME", the emulated accelerator of
  ``hwoptim.testing.emulated`` installed under NAME ("emu", or "npu" for the npu backend)
  for the whole session. Without the option: "auto". While the test runs,
  ``device="auto"`` in the code under test resolves to the same device.
- ``hwoptim_mock_backend``: a function ``(name, **kwargs) -> VendorMock`` starting
  ``mock_backend`` for the rest of the test.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Callable

import pytest

from hwoptim.backends.base import Backend
from hwoptim.backends.registry import ENV_VAR, get_backend
from hwoptim.testing.mock import VendorMock, mock_backend

OPTION = "--hwoptim-device"
MOCK_PREFIX = "mock:"
EMULATED_PREFIX = "emulated:"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hwoptim", "hwoptim devices")
    group.addoption(
        OPTION,
        action="append",
        default=[],
        metavar="SPEC",
        dest="hwoptim_devices",
        help=(
            "run tests using the hwoptim_device fixture on SPEC: a backend such as cuda, "
            "npu:1 or auto (skipped where absent), or mock:NAME for that backend mocked on "
            "the CPU, or emulated:NAME for the emulated accelerator named NAME (emu, npu; "
            "one per process). Repeat to run them once per device. Default: auto."
        ),
    )


def emulated_spec(config: pytest.Config) -> str | None:
    """The device type --hwoptim-device=emulated:NAME asks for in this session, or None."""
    names = {
        spec[len(EMULATED_PREFIX):]
        for spec in config.getoption("hwoptim_devices", None) or []
        if spec.startswith(EMULATED_PREFIX)
    }
    if len(names) > 1:
        raise pytest.UsageError(
            f"{OPTION}: one emulated device per process; got emulated:{', emulated:'.join(sorted(names))} "
            "(run a pytest process per name)"
        )
    return names.pop() if names else None


def pytest_configure(config: pytest.Config) -> None:
    # Before collection: test modules may ask for the device when they are imported.
    name = emulated_spec(config)
    if name is not None:
        from hwoptim.testing.emulated import install

        try:
            install(name)
        except (RuntimeError, ValueError) as exc:
            raise pytest.UsageError(f"{OPTION}=emulated:{name}: {exc}") from None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "hwoptim_device" in metafunc.fixturenames:
        specs = metafunc.config.getoption("hwoptim_devices") or ["auto"]
        metafunc.parametrize("hwoptim_device", specs, indirect=True, ids=str)


@pytest.fixture
def hwoptim_device(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Backend]:
    """The Backend this test runs on, as chosen by --hwoptim-device (default: auto)."""
    spec: str = getattr(request, "param", "auto")
    if spec.startswith(MOCK_PREFIX):
        with mock_backend(spec[len(MOCK_PREFIX):]) as mock:
            yield mock.backend
        return
    if spec.startswith(EMULATED_PREFIX):
        spec = spec[len(EMULATED_PREFIX):]  # installed by pytest_configure
    try:
        backend = get_backend(spec)
    except RuntimeError as exc:  # known but absent here; an unknown name stays an error
        pytest.skip(f"{OPTION}={spec}: {exc}")
    if spec != "auto":
        monkeypatch.setenv(ENV_VAR, spec)
    yield backend


@pytest.fixture
def hwoptim_mock_backend() -> Iterator[Callable[..., VendorMock]]:
    """Start ``mock_backend(name, **kwargs)`` for the rest of the test; returns the mock."""
    with contextlib.ExitStack() as stack:

        def start(name: str, **kwargs: Any) -> VendorMock:
            return stack.enter_context(mock_backend(name, **kwargs))

        yield start
