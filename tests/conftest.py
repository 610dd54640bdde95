"""Shared test setup: hardware-marked tests run unmocked where that hardware is present,
and are skipped, with the backend's own reason, where it is not."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest
import torch

from hwoptim.backends import registry
from hwoptim.testing.pytest_plugin import emulated_spec

# The tests use tiny tensors: one intra-op thread is fastest, and on a busy CI runner more
# threads only wait for each other (a 32x8 matmul took 16 ms with 2 threads, 0.07 ms with 1).
torch.set_num_threads(1)

# pytester runs the pytest plugin's own tests in a throwaway directory.
pytest_plugins = ["pytester"]

#: marker -> the backend whose availability it needs
_HARDWARE = {"gpu": "cuda", "npu": "npu", "xpu": "xpu", "mps": "mps"}


def _absent_reason(backend_name: str) -> str | None:
    """None when the backend's hardware is usable here, else why not."""
    from hwoptim.backends.registry import list_backends

    backend = list_backends()[backend_name]()
    return None if backend.is_available() else backend.unavailable_reason()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reasons: dict[str, str | None] = {}
    for item in items:
        for marker, backend_name in _HARDWARE.items():
            if item.get_closest_marker(marker) is None:
                continue
            if backend_name not in reasons:  # ask each backend once per session
                reasons[backend_name] = _absent_reason(backend_name)
            if reasons[backend_name] is not None:
                reason = f"needs a real {backend_name} device: {reasons[backend_name]}"
                item.add_marker(pytest.mark.skip(reason=reason))


#: tests that need the emulated accelerator, in a pytest process of its own (.ci/run)
_EMULATED_TESTS = Path(__file__).parent / "emulated"


def pytest_configure(config: pytest.Config) -> None:
    if emulated_spec(config) is not None:
        return
    for arg in config.args:  # asked for by path: say how, rather than collect nothing
        path = Path(arg.split("::")[0]).resolve()
        if path == _EMULATED_TESTS or _EMULATED_TESTS in path.parents:
            raise pytest.UsageError(
                f"{arg} runs on the emulated device, in a process of its own: add "
                "--hwoptim-device emulated:emu (or emulated:npu)"
            )


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """tests/emulated is collected only with --hwoptim-device emulated:NAME, and the rest of
    the suite only without it: the emulated device becomes the process's accelerator (and
    device="auto"), and it cannot be uninstalled."""
    inside = collection_path == _EMULATED_TESTS or _EMULATED_TESTS in collection_path.parents
    if inside != (emulated_spec(config) is not None):
        return True
    return None


# -- a throwaway plugin distribution (tests of entry-point loading) ------------------------


@pytest.fixture
def fresh_registry() -> Iterator[None]:
    """An empty registry that reloads built-ins and plugins, and again after the test."""
    registry._reset_for_tests()
    yield
    registry._reset_for_tests()


@pytest.fixture
def make_plugin_dist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[[str, dict[str, str]], None]:
    """A function installing a throwaway distribution 'fake-hwoptim-plugin 1.0' for this
    test: its entry_points.txt text and its modules' sources (dedented)."""

    def make(entry_points: str, modules: dict[str, str]) -> None:
        for name, source in modules.items():
            (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
            monkeypatch.delitem(sys.modules, name, raising=False)
        dist = tmp_path / "fake_hwoptim_plugin-1.0.dist-info"
        dist.mkdir()
        metadata = "Metadata-Version: 2.1\nName: fake-hwoptim-plugin\nVersion: 1.0\n"
        (dist / "METADATA").write_text(metadata)
        (dist / "entry_points.txt").write_text(textwrap.dedent(entry_points))
        monkeypatch.syspath_prepend(str(tmp_path))

    return make


GOOD = """
    from hwoptim import Backend

    class AlphaBackend(Backend):
        name = "alpha"
        device_type = "alpha"
        dist_backend = "alphaccl"

    def more():
        class BetaBackend(Backend):
            name = "beta"
            device_type = "beta"
        return [BetaBackend]
"""


@pytest.fixture
def plugin_dist(
    make_plugin_dist: Callable[[str, dict[str, str]], None], fresh_registry: None
) -> None:
    """A plugin distribution with two good backends, a broken one and one that clashes."""
    make_plugin_dist(
        """
        [hwoptim.backends]
        alpha = fake_good:AlphaBackend
        beta = fake_good:more
        broken = fake_broken:Backend
        clash = fake_clash:CpuImpostor
        """,
        {
            "fake_good": GOOD,
            "fake_broken": "raise ImportError('libvendor.so: cannot open shared object file')\n",
            "fake_clash": """
                from hwoptim import Backend

                class CpuImpostor(Backend):
                    name = "cpu"
                    device_type = "cpu"
            """,
        },
    )


MISBEHAVING = """
    import sys

    from hwoptim import Backend

    class WordyPriority(Backend):
        name = "wordy"
        device_type = "wordy"
        priority = "high"

    class Raising(Backend):
        name = "raising"
        device_type = "raising"
        priority = 90

        def is_available(self):
            raise OSError("driver handshake failed")

    class Exiting(Backend):
        name = "exiting"
        device_type = "exiting"
        priority = 80

        def is_available(self):
            sys.exit(3)

    class ExitingVendor(Backend):
        name = "exitvendor"
        device_type = "exitvendor"
        priority = 70
        vendor_module = "fake_exiting_vendor"

    class Unbuildable(Backend):
        name = "unbuildable"
        device_type = "unbuildable"
        priority = 85

        def __init__(self, index=None):
            raise RuntimeError("no vendor context")

    class Fine(Backend):
        name = "fine"
        device_type = "fine"
"""


@pytest.fixture
def misbehaving_plugins(
    make_plugin_dist: Callable[[str, dict[str, str]], None], fresh_registry: None
) -> None:
    """A plugin distribution whose backends break the rules: a priority that is no number,
    is_available() raising or calling sys.exit(), a vendor import calling sys.exit()."""
    make_plugin_dist(
        """
        [hwoptim.backends]
        wordy = fake_bad:WordyPriority
        raising = fake_bad:Raising
        exiting = fake_bad:Exiting
        exitvendor = fake_bad:ExitingVendor
        unbuildable = fake_bad:Unbuildable
        fine = fake_bad:Fine
        """,
        {
            "fake_bad": MISBEHAVING,
            "fake_exiting_vendor": "import sys\nsys.exit('no driver found')\n",
        },
    )
