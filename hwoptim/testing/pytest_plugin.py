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

and one marker: ``@pytest.mark.hwoptim_emulated`` (or ``hwoptim_emulated("npu")``) for
tests that need the emulated accelerator. They run only in a session started with
``--hwoptim-device emulated:NAME`` (of one of the names given, if any) and skip otherwise,
saying how to run them, so a plain ``pytest`` can collect them with the rest of a suite.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, Callable

import pytest

from hwoptim.backends.base import Backend
from hwoptim.backends.registry import ENV_VAR, get_backend
from hwoptim.testing.mock import VendorMock, mock_backend

OPTION = "--hwoptim-device"
MOCK_PREFIX = "mock:"
EMULATED_PREFIX = "emulated:"
MARKER = "hwoptim_emulated"


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
    config.addinivalue_line(
        "markers",
        f"{MARKER}(*names): runs only with {OPTION} emulated:NAME (one of names, if given); "
        "skipped otherwise",
    )
    # Before collection: test modules may ask for the device when they are imported.
    name = emulated_spec(config)
    if name is not None:
        from hwoptim.testing.emulated import install

        try:
            install(name)
        except (RuntimeError, ValueError) as exc:
            raise pytest.UsageError(f"{OPTION}=emulated:{name}: {exc}") from None


@pytest.hookimpl(trylast=True)  # after conftests that add the marker to a folder's tests
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests marked hwoptim_emulated that this session's device cannot run."""
    running = emulated_spec(config)
    for item in items:
        marker = item.get_closest_marker(MARKER)
        if marker is None:
            continue
        names = [str(n) for n in marker.args]
        if running is not None and (not names or running in names):
            continue
        where = os.path.relpath(item.path.parent, config.invocation_params.dir)
        how = f"python -m pytest {OPTION} {EMULATED_PREFIX}{names[0] if names else 'emu'} {where}"
        if running is None:
            reason = (f"needs hwoptim's emulated device, which takes a pytest process of its own: "
                      f"run {how}")
        else:
            reason = f"needs the emulated device {' or '.join(names)}, not {running}: run {how}"
        item.add_marker(pytest.mark.skip(reason=reason))


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
