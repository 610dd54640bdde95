"""The emulated device itself: torch's PrivateUse1 slot renamed and given a device module.

``register`` does what a C++ backend does when it loads: renames PrivateUse1, registers
the device module (``torch.<device_type>``), and patches the two places where torch
assumes C++: storages allocate through ``torch.empty``, and backward runs on the calling
thread (torch's Python device guard reports one device, so the autograd engine would
have no worker queue for device 1 and up). It also checks, before changing anything,
that this torch has the APIs all this needs and that the name is free.
"""

from __future__ import annotations

import functools
import sys
import types
from typing import Any

import torch
import torch.utils.backend_registration  # check_torch looks into it

__all__ = ["REQUIRED_APIS", "DeviceModule", "check_free", "check_torch", "register", "torch_npu_stand_in"]

# What install() needs from torch: experimental APIs of recent releases (CI pins 2.13).
REQUIRED_APIS = (
    "utils.backend_registration._setup_privateuseone_for_python_backend",
    "_C._acc.register_python_privateuseone_device_guard",
    "accelerator.current_accelerator",
    "library.Library.fallback",
    "serialization.register_package",
    "get_autocast_dtype",
    "autograd.graph._engine_run_backward",
    "autograd.set_multithreading_enabled",
)

_BUILTIN_DEVICE_TYPES = frozenset({
    "cpu", "cuda", "mkldnn", "opengl", "opencl", "ideep", "hip", "ve", "fpga", "maia", "xla",
    "lazy", "vulkan", "mps", "meta", "hpu", "mtia", "xpu", "ipu", "privateuseone",
})


def check_torch() -> None:
    """Refuse a torch that lacks any of ``REQUIRED_APIS``, naming what is missing."""
    missing = []
    for path in REQUIRED_APIS:
        owner: Any = torch
        try:
            for part in path.split("."):
                owner = getattr(owner, part)
        except AttributeError:
            missing.append(f"torch.{path}")
    if missing:
        raise RuntimeError(
            "hwoptim's emulated device needs a torch that registers PrivateUse1 backends from "
            f"Python; this is torch {torch.__version__}, which lacks {', '.join(missing)}: use a "
            "recent torch (hwoptim's CI runs it on 2.13), or test through "
            "hwoptim.testing.mock_backend instead"
        )


def check_free(device_type: str) -> None:
    """Refuse a process whose PrivateUse1 slot, or the name ``device_type``, is taken."""
    current = torch._C._get_privateuse1_backend_name()
    if current != "privateuseone":
        raise RuntimeError(
            f"torch's PrivateUse1 device type is already taken by {current!r} (a vendor "
            "extension such as torch_npu was imported), so the emulated device needs a "
            "process without it"
        )
    if device_type in _BUILTIN_DEVICE_TYPES:
        raise ValueError(f"device_type {device_type!r} is a device type torch already has; pick another name")
    if device_type == "npu" and "torch_npu" in sys.modules:
        raise RuntimeError("torch_npu is already imported, so the emulated 'npu' needs a process without it")


def register(device_type: str, device_count: int) -> DeviceModule:
    """Rename PrivateUse1 to ``device_type`` and register its device module; returns the module."""
    from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

    module = DeviceModule(device_type, device_count)
    _setup_privateuseone_for_python_backend(device_type, backend_module=module)
    _allocate_storages_through_empty(device_type)
    _run_backward_on_the_calling_thread()
    return module


def _allocate_storages_through_empty(device_type: str) -> None:
    """Make ``torch.UntypedStorage(n, device=<emulated>)`` allocate through ``torch.empty``."""
    # torch's own constructor asks PrivateUse1's C++ allocator, which a Python backend lacks
    # (a segfault); torch.load onto the device and storage.to(device) take that path.
    storage_class = torch.UntypedStorage
    original = storage_class.__new__

    def __new__(cls: Any, *args: Any, device: Any = None, **kwargs: Any) -> Any:
        if device is None or torch.device(device).type != device_type:
            if device is not None:
                kwargs["device"] = device
            return original(cls, *args, **kwargs)
        if kwargs or len(args) > 1:
            raise RuntimeError(f"the emulated device allocates storages by size only; got {args}, {kwargs}")
        source = args[0] if args else 0
        if isinstance(source, int):
            return torch.empty(source, dtype=torch.uint8, device=device).untyped_storage()
        data = torch.tensor(list(source), dtype=torch.uint8)  # a sequence of bytes
        return data.to(device).untyped_storage()

    storage_class.__new__ = __new__  # type: ignore[method-assign]


def _run_backward_on_the_calling_thread() -> None:
    """Run every backward on the thread that calls it, as torch's engine does for CPU graphs."""
    # The engine gives each device index a worker queue, as many as the device guards'
    # deviceCount() when it starts, and torch's Python guard for PrivateUse1 reports 1: a
    # backward on device 1 would hit an internal assert. Without multithreading (as torch's
    # compiled autograd runs) the engine uses the caller's queue for every device. backward,
    # autograd.grad and Tensor.backward all reach the engine through _engine_run_backward.
    graph: Any = torch.autograd.graph
    original = graph._engine_run_backward

    @functools.wraps(original)
    def run_backward(*args: Any, **kwargs: Any) -> Any:
        with torch.autograd.set_multithreading_enabled(False):
            return original(*args, **kwargs)

    graph._engine_run_backward = run_backward
    autograd: Any = torch.autograd  # it imported the name from torch.autograd.graph
    autograd._engine_run_backward = run_backward


class DeviceModule:
    """``torch.<device_type>``: what torch's autocast, GradScaler and hwoptim's backends ask."""

    def __init__(self, device_type: str, device_count: int) -> None:
        self._type = device_type
        self._count = device_count
        self._current = 0
        module = self

        class device(_DeviceContext):
            """Make a device current for the block (as ``torch.cuda.device``)."""

            def __init__(self, device: Any) -> None:
                super().__init__(module, device)

        self.device = device

    def index_of(self, device: Any) -> int:
        """The ordinal ``device`` (None, an int, a name or a torch.device) stands for."""
        if device is None:
            return self._current
        if isinstance(device, int):
            index = device
        else:
            parsed = torch.device(device)
            if parsed.type != self._type:
                return self._current
            index = self._current if parsed.index is None else parsed.index
        if not 0 <= index < self._count:
            raise RuntimeError(
                f"{self._type} error: invalid device ordinal {index}: the emulated device has "
                f"{self._count} device(s) ({self._type}:0 to {self._type}:{self._count - 1})"
            )
        return index

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def _is_in_bad_fork(self) -> bool:
        """Never: the emulated device keeps no driver state that a fork could break."""
        return False

    def device_count(self) -> int:
        return self._count

    def current_device(self) -> int:
        return self._current

    def set_device(self, device: Any) -> None:
        self._current = self.index_of(device)

    def synchronize(self, device: Any = None) -> None:
        self.index_of(device)  # nothing is queued: every op has finished when it returns

    # Device ops draw from the CPU generator: seeding the device seeds it.
    def manual_seed(self, seed: int) -> None:
        torch.default_generator.manual_seed(int(seed))

    def manual_seed_all(self, seed: int) -> None:
        torch.default_generator.manual_seed(int(seed))

    def seed(self) -> None:
        torch.default_generator.seed()

    def initial_seed(self) -> int:
        return int(torch.default_generator.initial_seed())

    def get_rng_state(self, device: Any = None) -> torch.Tensor:
        return torch.default_generator.get_state()

    def set_rng_state(self, state: torch.Tensor, device: Any = None) -> None:
        torch.default_generator.set_state(state)

    def get_amp_supported_dtype(self) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16]

    def is_bf16_supported(self, including_emulation: bool = True) -> bool:
        return True

    def get_device_name(self, device: Any = None) -> str:
        return f"emulated {self._type} (torch CPU kernels)"

    def memory_allocated(self, device: Any = None) -> int:
        return 0


class _DeviceContext:
    """``torch.<device_type>.device(d)``: makes device ``d`` current for the block."""

    def __init__(self, module: DeviceModule, device: Any) -> None:
        self.module = module
        self.index = None if device is None else module.index_of(device)
        self.previous = module._current

    def __enter__(self) -> None:
        self.previous = self.module._current
        if self.index is not None:
            self.module._current = self.index

    def __exit__(self, *exc: Any) -> None:
        self.module._current = self.previous


def torch_npu_stand_in(device_type: str) -> types.ModuleType:
    """What hwoptim's npu backend imports from torch_npu, for the emulated "npu"."""
    module = types.ModuleType("torch_npu", "hwoptim's stand-in for torch_npu on the emulated npu device")
    module.__version__ = "0+hwoptim.emulated"  # type: ignore[attr-defined]

    def grad_scaler(**kwargs: Any) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(device_type, **kwargs)

    amp = types.SimpleNamespace(GradScaler=grad_scaler)
    module.npu = types.SimpleNamespace(amp=amp)  # type: ignore[attr-defined]
    return module
