"""An emulated accelerator: a real non-CPU torch device type on a CPU-only machine.

``install("emu")`` renames torch's PrivateUse1 device type and backs it with host memory, so
``torch.ones(2, device="emu")`` is a genuine device tensor (its own storage, strides and
views) that runs on torch's CPU kernels. Unlike ``mock_backend``, which keeps every tensor
on the CPU, it fails where real accelerators fail:

- a non-scalar CPU tensor mixed into a device op raises CUDA's "Expected all tensors to be
  on the same device"; ``emu:0`` and ``emu:1`` are distinct devices;
- ``torch.accelerator.current_accelerator()`` reports it, so ``device="auto"`` picks it;
- ``Module.to(device)`` replaces the parameters (as on every out-of-tree device), so an
  optimizer built before the move keeps stale CPU parameters;
- device-to-host reads (``.item()``, ``bool()``, copies to the CPU) are counted:
  ``count_host_reads()``.

Autocast computes in the low dtype with CUDA's op policy, ``torch.amp.GradScaler(device)``
works, and checkpoints load onto and off the device. Every device trains (``emu:1`` as well
as ``emu:0``); backward runs on the thread that calls it, as for CPU tensors. Named "npu",
it comes with a stand-in ``torch_npu`` so that hwoptim's npu backend runs its own code on
real ``npu`` tensors.

The rename cannot be undone and makes the device the current accelerator, so install it
in a process of its own: ``pytest --hwoptim-device emulated:emu`` or
``python -m hwoptim.testing.emulated --device npu -- script.py``.

Who owns what: this module is the public face (``install``, ``count_host_reads``, the
runner); ``_emulated_device`` registers the device and its module, ``_emulated_memory``
makes device tensors over CPU memory, ``_emulated_kernels`` runs the ops,
``_emulated_autocast`` the autocast policy, ``_emulated_reads`` counts host reads. An op
costs ~0.1 ms: keep models small.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import runpy
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from hwoptim._numbers import check_int
from hwoptim.testing import _emulated_autocast, _emulated_device, _emulated_kernels, _emulated_memory, _emulated_reads
from hwoptim.testing._emulated_reads import HostReads

__all__ = [
    "DEFAULT_DEVICE_COUNT",
    "DEFAULT_DEVICE_TYPE",
    "HostReads",
    "count_host_reads",
    "install",
    "installed_device_type",
    "main",
]

DEFAULT_DEVICE_TYPE = "emu"
DEFAULT_DEVICE_COUNT = 2


@dataclasses.dataclass(frozen=True)
class _Installed:
    """What install() set up in this process (it cannot be undone)."""

    device_type: str
    device_count: int
    module: _emulated_device.DeviceModule
    libraries: tuple[Any, ...]  # torch.library registrations live as long as these


_installed: _Installed | None = None
_lock = threading.Lock()


def installed_device_type() -> str | None:
    """The emulated device's type in this process ("emu", "npu", ...), or None."""
    return None if _installed is None else _installed.device_type


def install(device_type: str = DEFAULT_DEVICE_TYPE, device_count: int = DEFAULT_DEVICE_COUNT) -> str:
    """Make ``device_type`` an emulated accelerator in this process; returns the type.

    Once per process: torch cannot rename PrivateUse1 twice. Installing the same type again
    does nothing; another type or device count is a RuntimeError, and so is a torch that
    lacks the APIs this needs or a process whose PrivateUse1 is taken; a name torch already
    has is a ValueError. ``device_type="npu"`` also puts a stand-in ``torch_npu`` into
    ``sys.modules`` (hwoptim's npu backend imports it).
    """
    global _installed
    if not isinstance(device_type, str):
        raise TypeError(f"device_type must be a str such as 'emu' or 'npu'; got {type(device_type).__name__}")
    if not device_type.isidentifier() or not device_type.islower():
        raise ValueError(f"device_type must be a lower-case name such as 'emu' or 'npu'; got {device_type!r}")
    device_count = check_int(device_count, "device_count", 1)  # np.int64 too
    with _lock:
        if _installed is not None:
            if (_installed.device_type, _installed.device_count) != (device_type, device_count):
                raise RuntimeError(
                    f"the emulated device is already installed in this process as "
                    f"{_installed.device_type!r} with {_installed.device_count} device(s) and cannot "
                    f"become {device_type!r} with {device_count} (PrivateUse1 is renamed once per "
                    "process), so run the other one in a process of its own"
                )
            return device_type
        _emulated_device.check_torch()
        _emulated_device.check_free(device_type)
        _emulated_memory.check_layout()
        module = _emulated_device.register(device_type, device_count)
        libraries = _emulated_kernels.register(device_type, module)
        libraries += _emulated_autocast.install(device_type)
        if device_type == "npu":
            sys.modules["torch_npu"] = _emulated_device.torch_npu_stand_in(device_type)
        _installed = _Installed(device_type, device_count, module, tuple(libraries))
        return device_type


@contextlib.contextmanager
def count_host_reads() -> Iterator[HostReads]:
    """Count the device-to-host reads of the emulated device made inside the block.

    ::

        with count_host_reads() as reads:
            wrapper.update_params(loss)
        assert reads.total == 0, reads

    Reads by any code count, torch's own included (GradScaler's ``.item()`` for a non-fused
    optimizer). Blocks may nest; each sees the reads made while it is entered.
    """
    if _installed is None:
        raise RuntimeError(
            "the emulated device is not installed in this process: call "
            "hwoptim.testing.emulated.install() first (or run pytest with "
            "--hwoptim-device emulated:emu)"
        )
    with _emulated_reads.recording() as reads:
        yield reads


# -- running a script on the emulated device ----------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hwoptim.testing.emulated [--device NAME] [--device-count N] -- (-m MODULE | SCRIPT) ARGS``.

    Installs the emulated device, then runs the module or script as ``python`` would, with
    ``sys.argv`` set to its arguments.
    """
    parser = argparse.ArgumentParser(
        prog="python -m hwoptim.testing.emulated",
        description="Run a Python module or script with an emulated accelerator installed.",
    )
    parser.add_argument("--device", default=DEFAULT_DEVICE_TYPE, help="its device type (default emu; npu "
                        "brings a torch_npu stand-in)")
    parser.add_argument("--device-count", type=int, default=DEFAULT_DEVICE_COUNT,
                        help=f"how many devices, NAME:0 to NAME:N-1 (default {DEFAULT_DEVICE_COUNT})")
    parser.add_argument("target", nargs=argparse.REMAINDER, help="-m MODULE ARGS... or SCRIPT ARGS...")
    args = parser.parse_args(argv)
    target = args.target[1:] if args.target[:1] == ["--"] else args.target
    if not target or target == ["-m"]:
        parser.error("give what to run: -m MODULE [ARGS...] or SCRIPT [ARGS...]")
    try:
        install(args.device, args.device_count)
    except (TypeError, ValueError, RuntimeError) as exc:
        parser.error(str(exc))
    try:
        if target[0] == "-m":
            sys.argv = [target[1], *target[2:]]
            runpy.run_module(target[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(target)
            sys.path.insert(0, os.path.dirname(os.path.abspath(target[0])))  # as `python script.py`
            runpy.run_path(target[0], run_name="__main__")
    except SystemExit as exc:
        code = exc.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Run as a module, this file is __main__, a second copy: use the package's one, whose
    # state the rest of hwoptim.testing sees.
    from hwoptim.testing import emulated as _emulated

    sys.exit(_emulated.main())
