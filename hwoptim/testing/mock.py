"""mock_backend: run a backend's own code on a CPU-only machine, its vendor APIs faked.

A *stand-in* is a small function that installs CPU-executing replacements for what one
backend calls: ``torch.npu`` and an importable ``torch_npu`` for the npu backend,
``torch.cuda`` for cuda, and so on. Inside ``mock_backend(name)`` the backend runs
unchanged -- it imports its vendor module, asks it for devices, builds its scaler -- while
every tensor stays on the CPU (the registry sets the backend's placement to "cpu") and
every vendor call is recorded in ``mock.calls``. Leaving the block undoes every change, in
reverse order, also after an exception.

Stand-ins for the built-in backends live in ``hwoptim.testing.stand_ins``; a plugin adds
its own with ``register_stand_in`` or the ``hwoptim.stand_ins`` entry-point group.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import sys
import threading
import types
from typing import Any, Callable, NamedTuple, overload

import torch

from hwoptim._entry_points import entry_points
from hwoptim._numbers import as_int, check_int
from hwoptim.backends import registry
from hwoptim.backends.base import Backend

__all__ = [
    "STAND_IN_GROUP",
    "OnImport",
    "StandIn",
    "VendorCall",
    "VendorMock",
    "active_mocks",
    "mock_backend",
    "register_stand_in",
    "stand_in_names",
]

STAND_IN_GROUP = "hwoptim.stand_ins"

#: what a stand-in is: a function that installs fakes through the mock it is given
StandIn = Callable[["VendorMock"], None]
#: what runs when a stand-in vendor module is imported
OnImport = Callable[[types.ModuleType], None]

_MISSING = object()
_lock = threading.RLock()
#: stand-in name -> (install function, name of the backend "auto" must pick)
_stand_ins: dict[str, tuple[StandIn, str]] = {}
_entry_points_loaded = False
#: the mocks now active, innermost last: what the registry's _Override answers from
_active: list[VendorMock] = []


class VendorCall(NamedTuple):
    """One call a backend made into a stand-in: ``name`` as in "torch.npu.set_device"."""

    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}  # noqa: RUF012 -- never mutated: one per call


@overload
def register_stand_in(
    name: str, install: None = None, *, backend: str | None = None, override: bool = False
) -> Callable[[StandIn], StandIn]: ...


@overload
def register_stand_in(
    name: str, install: StandIn, *, backend: str | None = None, override: bool = False
) -> StandIn: ...


def register_stand_in(
    name: str, install: StandIn | None = None, *, backend: str | None = None,
    override: bool = False,
) -> Any:
    """Register the stand-in for backend ``name``; usable as a decorator.

    ``install(mock)`` fakes the vendor APIs through the helpers of ``VendorMock``
    (``patch``, ``namespace``, ``device_module``, ``vendor_module``, ``grad_scaler_class``).
    ``backend`` names the backend "auto" must pick when it differs from ``name``. A name
    that is taken is a ValueError unless ``override=True``.
    """

    registry.check_name(name, "the stand-in name")
    if backend is not None:
        registry.check_name(backend, "the stand-in's backend name")

    def add(function: StandIn) -> StandIn:
        with _lock:
            if name in _stand_ins and _stand_ins[name][0] is not function and not override:
                raise ValueError(
                    f"a stand-in for {name!r} is already registered; "
                    "pass override=True to replace it"
                )
            _stand_ins[name] = (function, backend or name)
        return function

    return add if install is None else add(install)


def stand_in_names() -> list[str]:
    """The backends ``mock_backend`` can fake: built-in ones and those plugins registered."""
    with _lock:
        _load_stand_ins()
        return sorted(_stand_ins)


def mock_backend(name: str, *, device_count: int = 1, select: bool = True) -> VendorMock:
    """A context manager faking backend ``name``'s vendor APIs on the CPU.

    Inside it the backend is available with ``device_count`` devices, its own code runs
    unchanged, its tensors stay on the CPU, and ``device="auto"`` picks it (unless
    ``select=False``: then it is only "present", and auto chooses as it would on a
    machine with that hardware). Mocks of different backends nest; the innermost
    selecting one wins. Everything is restored on exit, also after an exception.

    A mock changes process-wide state, so every thread sees it, but mocks are started
    and ended on one thread: starting one while another thread holds a mock is a
    RuntimeError (otherwise the two could end out of order and one would never be undone).

        with mock_backend("npu") as mock:
            wrapper = AmpOptimWrapper(optimizer, device="auto")   # the npu backend
            assert "torch_npu.npu.amp.GradScaler" in mock.call_names()
    """
    if not isinstance(name, str):
        raise TypeError(f"mock_backend takes a backend name such as 'npu'; got {type(name).__name__}")
    device_count = check_int(device_count, "device_count", 1)
    name = name.strip().lower()  # names are matched case-insensitively, as get_backend does
    install, backend_name = _find_stand_in(name)
    return VendorMock(name, backend_name, install, device_count=device_count, select=select)


class VendorMock:
    """One mocked backend: what its stand-in installed, the calls it saw, how to undo it.

    Tests read ``calls`` (or ``call_names()``) and ``backend``; stand-ins use the helpers
    below, each of which undoes itself when the mock ends.
    """

    def __init__(
        self, name: str, backend_name: str, install: StandIn, *, device_count: int, select: bool
    ) -> None:
        self.name = name
        #: the registry name of the mocked backend (what device="auto" returns)
        self.backend_name = backend_name
        self.device_count = device_count
        self.select = select
        #: every call into a stand-in, in order
        self.calls: list[VendorCall] = []
        self._install = install
        self._undo: list[Callable[[], None]] = []
        self._modules: dict[str, tuple[types.ModuleType, OnImport | None]] = {}
        self._finder: _StandInFinder | None = None
        self._state = "new"
        #: the thread that entered the mock: others may not start mocks until it ends
        self._thread: threading.Thread | None = None

    # -- for tests -------------------------------------------------------------------------

    @property
    def backend(self) -> Backend:
        """The mocked backend, as ``get_backend`` returns it inside the mock."""
        if self._state != "active":
            raise RuntimeError(
                f"mock_backend({self.name!r}) is not active; use it inside its 'with' block"
            )
        return registry.get_backend(self.backend_name)

    def call_names(self) -> list[str]:
        """The recorded calls' names in order: "import torch_npu", "torch.npu.is_available", ..."""
        return [call.name for call in self.calls]

    # -- for stand-ins ---------------------------------------------------------------------

    def record(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        """``function``, recording each call as ``VendorCall(name, args, kwargs)``."""

        @functools.wraps(function)
        def recorded(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(VendorCall(name, args, kwargs))
            return function(*args, **kwargs)

        return recorded

    def patch(self, target: Any, attribute: str, value: Any) -> None:
        """``setattr(target, attribute, value)`` until the mock ends (then restored or deleted)."""
        namespace = getattr(target, "__dict__", None)
        old = namespace.get(attribute, _MISSING) if namespace is not None else getattr(
            target, attribute, _MISSING
        )
        setattr(target, attribute, value)

        def undo() -> None:
            if old is _MISSING:
                if attribute in getattr(target, "__dict__", {}):
                    delattr(target, attribute)
            else:
                setattr(target, attribute, old)

        self._undo.append(undo)

    def namespace(self, qualname: str, *, real: Any = None, **members: Any) -> types.ModuleType:
        """A module-like stand-in for ``qualname`` whose functions record their calls.

        Other members (classes, modules, constants) are set as given. A name the stand-in
        lacks is looked up on ``real`` (for torch's own internals), or is an AttributeError
        saying which vendor API the code under test needs.
        """
        module = _StandInModule(qualname, real)
        for member, value in members.items():
            if inspect.isfunction(value) or inspect.isbuiltin(value):
                value = self.record(f"{qualname}.{member}", value)
            setattr(module, member, value)
        return module

    def device_module(self, qualname: str, *, real: Any = None, **members: Any) -> types.ModuleType:
        """A CPU stand-in of a device module (torch.cuda, torch.npu, ...) with this mock's
        devices: availability, counts, current/set device, synchronize, seeds, memory,
        names, bf16 support. ``members`` add to or replace those."""
        count = self.device_count
        current = [0]

        def set_device(device: Any) -> None:
            index = as_int(device)
            if index is None:
                index = torch.device(device).index or 0
            if not 0 <= index < count:
                raise RuntimeError(
                    f"{qualname}.set_device({device!r}): the mock has {count} device(s)"
                )
            current[0] = index

        def seed(seed: int) -> None:
            torch.default_generator.manual_seed(int(seed))  # the "device" runs on the CPU

        defaults: dict[str, Any] = {
            "is_available": lambda: True,
            "device_count": lambda: count,
            "current_device": lambda: current[0],
            "set_device": set_device,
            "synchronize": lambda device=None: None,
            "manual_seed": seed,
            "manual_seed_all": seed,
            "memory_stats": lambda device=None: {"allocated_bytes.all.current": 0},
            "get_device_name": lambda device=None: f"hwoptim mock of {qualname}",
            "is_bf16_supported": lambda *args, **kwargs: True,
        }
        return self.namespace(qualname, real=real, **{**defaults, **members})

    def vendor_module(
        self, name: str, members: dict[str, Any] | None = None, *,
        on_import: OnImport | None = None,
    ) -> types.ModuleType:
        """Make ``import name`` give a stand-in module while the mock lasts.

        The import is recorded ("import torch_npu") and runs ``on_import(module)``: the
        place to do what the real import does (torch_npu creates ``torch.npu``). A real
        module of that name, imported or not, is hidden until the mock ends. Register a
        package before its submodules ("habana_frameworks", then "habana_frameworks.torch").
        """
        module = types.ModuleType(name)
        module.__dict__.update(members or {})
        self._modules[name] = (module, on_import)
        if self._finder is None:
            finder = self._finder = _StandInFinder(self)
            sys.meta_path.insert(0, finder)
            self._undo.append(lambda: sys.meta_path.remove(finder))
        prefix = name + "."
        hidden = {
            key: sys.modules.pop(key)
            for key in list(sys.modules)
            if key == name or key.startswith(prefix)
        }

        def undo() -> None:
            for key in [k for k in sys.modules if k == name or k.startswith(prefix)]:
                del sys.modules[key]
            sys.modules.update(hidden)

        self._undo.append(undo)
        return module

    def grad_scaler_class(self, qualname: str) -> type[torch.amp.GradScaler]:
        """A vendor GradScaler class (``torch_npu.npu.amp.GradScaler``) running on the CPU.

        It takes the usual GradScaler arguments (and ignores vendor extras such as
        torch_npu's ``dynamic``), and records its construction and each scale, unscale_,
        step, update, state_dict and load_state_dict.
        """
        mock = self

        def __init__(scaler: Any, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                     backoff_factor: float = 0.5, growth_interval: int = 2000,
                     enabled: bool = True, **vendor_kwargs: Any) -> None:
            mock.calls.append(VendorCall(qualname, (), dict(
                init_scale=init_scale, growth_factor=growth_factor, backoff_factor=backoff_factor,
                growth_interval=growth_interval, enabled=enabled, **vendor_kwargs,
            )))
            torch.amp.GradScaler.__init__(
                scaler, "cpu", init_scale=init_scale, growth_factor=growth_factor,
                backoff_factor=backoff_factor, growth_interval=growth_interval, enabled=enabled,
            )

        # pickle finds a class by module and qualified name: while the mock lasts, this one
        # is an attribute of _VendorClasses, so a wrapper holding its scaler can be pickled,
        # torch.save'd and deep-copied inside the mock, as the real one can on real hardware.
        attribute = qualname.replace(".", "_")
        methods: dict[str, Any] = {
            "__init__": __init__,
            "__module__": __name__,
            "__qualname__": f"{_VendorClasses.__qualname__}.{attribute}",
        }
        for method in ("scale", "unscale_", "step", "update", "state_dict", "load_state_dict"):
            methods[method] = _recording_method(self, f"{qualname}.{method}", method)
        cls = type(qualname.rsplit(".", 1)[-1], (torch.amp.GradScaler,), methods)
        self.patch(_VendorClasses, attribute, cls)
        return cls

    # -- the context manager ---------------------------------------------------------------

    def __enter__(self) -> VendorMock:
        if self._state != "new":
            raise RuntimeError(f"this mock_backend({self.name!r}) was already used; make a new one")
        # torch imports its compiler stack lazily (the first optimizer does) and probes the
        # device modules while doing so: let it do that against the real ones, not the fakes.
        import torch._dynamo  # noqa: F401

        with _lock:
            thread = threading.current_thread()
            for other in _active:
                if other._thread is not None and other._thread is not thread:
                    ended = "" if other._thread.is_alive() else ", which ended without leaving it"
                    raise RuntimeError(
                        f"mock_backend({self.name!r}) cannot start on thread {thread.name!r} "
                        f"while mock_backend({other.name!r}) is active on thread "
                        f"{other._thread.name!r}{ended}, because mocks change process-wide state "
                        "and nest on one thread only: start them on one thread (threads started "
                        "inside a mock see it) or end the other mock first"
                    )
                if other.name == self.name or other.backend_name == self.backend_name:
                    raise RuntimeError(
                        f"mock_backend({self.name!r}) is already active; a backend cannot be "
                        "mocked inside its own mock (mocks of different backends nest)"
                    )
            try:
                self._install(self)
            except BaseException:
                self._undo_all()
                raise
            _active.append(self)
            self._thread = thread
            self._state = "active"
            registry._set_override(_MOCKS)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        with _lock:
            if not _active or _active[-1] is not self:
                raise RuntimeError(
                    f"mock_backend({self.name!r}) must end before the mocks started after it "
                    f"(active, innermost last: {[m.name for m in _active]})"
                )
            _active.pop()
            self._state = "ended"
            try:
                self._undo_all()
            finally:
                if not _active:
                    registry._set_override(None)

    def _undo_all(self) -> None:
        """Undo every change, newest first, then report what could not be undone."""
        undo, self._undo = self._undo, []
        errors = []
        for step in reversed(undo):
            try:
                step()
            except Exception as exc:  # keep restoring the rest
                errors.append(exc)
        if errors:
            raise RuntimeError(
                f"mock_backend({self.name!r}) could not restore everything: {errors}"
            )

    def __repr__(self) -> str:
        return (
            f"VendorMock({self.name!r}, backend={self.backend_name!r}, "
            f"device_count={self.device_count}, {self._state}, {len(self.calls)} call(s))"
        )


def active_mocks() -> list[VendorMock]:
    """The mocks now active, innermost last."""
    return list(_active)


# -- internals -------------------------------------------------------------------------


class _MockOverride:
    """The registry's _Override while mocks are active: answered from ``_active``."""

    def auto_backend(self) -> str | None:
        """The innermost selecting mock's backend."""
        return next((m.backend_name for m in reversed(tuple(_active)) if m.select), None)

    def keeps_on_cpu(self, name: str) -> bool:
        """Whether an active mock fakes backend ``name``."""
        return any(m.backend_name == name for m in tuple(_active))


_MOCKS = _MockOverride()


class _VendorClasses:
    """Where pickle finds the classes the active mocks made (see grad_scaler_class)."""


class _StandInModule(types.ModuleType):
    """A module whose missing names come from the real module, or fail saying what is missing."""

    def __init__(self, qualname: str, real: Any) -> None:
        super().__init__(qualname)
        self.__dict__["_real"] = real

    def __getattr__(self, name: str) -> Any:
        real = self.__dict__["_real"]
        if real is not None and not name.startswith("__"):
            return getattr(real, name)
        raise AttributeError(
            f"the hwoptim stand-in for {self.__name__} has no {name!r}: the code under test "
            "calls a vendor API this mock does not fake (add it to the stand-in)"
        )


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports a mock's vendor modules, recording each import."""

    def __init__(self, mock: VendorMock) -> None:
        self._mock = mock

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in self._mock._modules:
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return self._mock._modules[spec.name][0]

    def exec_module(self, module: types.ModuleType) -> None:
        self._mock.calls.append(VendorCall(f"import {module.__name__}"))
        on_import = self._mock._modules[module.__name__][1]
        if on_import is not None:
            on_import(module)


def _recording_method(mock: VendorMock, label: str, method: str) -> Callable[..., Any]:
    """GradScaler's ``method``, recording each call in ``mock.calls`` as ``label``."""
    original = getattr(torch.amp.GradScaler, method)

    @functools.wraps(original)
    def recorded(self: Any, *args: Any, **kwargs: Any) -> Any:
        mock.calls.append(VendorCall(label, args, kwargs))
        return original(self, *args, **kwargs)

    return recorded


def _find_stand_in(name: str) -> tuple[StandIn, str]:
    """The stand-in registered for ``name`` and its backend's name, or a ValueError listing them."""
    with _lock:
        if name not in _stand_ins:
            _load_stand_ins()
        found = _stand_ins.get(name)
    if found is None:
        known = ", ".join(repr(n) for n in stand_in_names())
        raise ValueError(
            f"there is no stand-in for backend {name!r}; stand-ins exist for {known}, and a plugin "
            "adds its own with hwoptim.testing.register_stand_in or the "
            f"{STAND_IN_GROUP!r} entry point"
        )
    return found


def _load_stand_ins() -> None:
    """Register, once, the stand-ins plugins declare as entry points (the built-in ones register on import)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(STAND_IN_GROUP):
        if ep.name not in _stand_ins:
            # A broken stand-in fails here, in a test, where its traceback belongs.
            register_stand_in(ep.name, ep.load())
