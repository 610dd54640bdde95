"""The named set of backends, how "auto" picks one, and how plugins join.

Built-ins are registered on first use; third-party packages add theirs through the
entry-point group ``hwoptim.backends``, loaded lazily on the first lookup. A plugin that
fails to load, declares a bad class (a name that cannot be looked up, a priority that
is no number), or whose ``is_available()`` raises is reported by name in a warning and
left out; it never breaks the others, nor ``device="auto"``.

Names are lower case, and every lookup (``get_backend``, ``HWOPTIM_DEVICE``,
``unregister_backend``, ``backend_origin``, ``mock_backend``) is case-insensitive: a
name with capitals could be listed but never found, so registering one is refused.

Test tools change what the registry hands out through one seam, an ``_Override`` set with
``_set_override``: hwoptim.testing's ``mock_backend`` is its only user.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import warnings
from typing import Any, Protocol, Union

import torch

from hwoptim._entry_points import entry_points
from hwoptim._numbers import as_float
from hwoptim.backends.base import Backend

__all__ = [
    "ENTRY_POINT_GROUP",
    "ENV_VAR",
    "DeviceSpec",
    "backend_origin",
    "check_name",
    "current_accelerator",
    "get_backend",
    "is_available",
    "list_backends",
    "plugin_errors",
    "register_backend",
    "unregister_backend",
]

ENTRY_POINT_GROUP = "hwoptim.backends"
ENV_VAR = "HWOPTIM_DEVICE"

DeviceSpec = Union[str, torch.device, Backend, None]

_lock = threading.RLock()
_registry: dict[str, type[Backend]] = {}
#: where each registered backend came from: "built-in", a distribution name, or "user"
_origins: dict[str, str] = {}
_builtins_loaded = False
_plugins_loaded = False
#: entry points that failed to load, and backends whose is_available() raised: (name, error)
_plugin_errors: list[tuple[str, str]] = []
#: backend classes whose own code raised where it must not, with why (see is_available)
_broken: dict[type[Backend], str] = {}


class _Override(Protocol):
    """What a test tool may change in the registry's answers (the contract of ``_set_override``).

    The registry asks it, without holding its lock, and nothing else: its methods must be
    cheap and must not raise.
    """

    def auto_backend(self) -> str | None:
        """The backend name ``device="auto"`` must resolve, or None to choose as usual."""

    def keeps_on_cpu(self, name: str) -> bool:
        """Whether backend ``name``'s tensors stay on the CPU (its vendor APIs are faked)."""


#: the one seam for test tools: see _Override
_override: _Override | None = None


def _set_override(override: _Override | None) -> None:
    """Set (or, with None, clear) the test tool's _Override; for hwoptim.testing only."""
    global _override
    _override = override


def register_backend(
    cls: type[Backend], *, override: bool = False, origin: str = "user"
) -> type[Backend]:
    """Add a Backend subclass under its ``name``. Usable as a class decorator.

    A name that is already registered is a ValueError unless ``override=True``, which
    replaces the existing backend on purpose (for example a tuned cuda backend).
    """
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise TypeError(f"register_backend takes a Backend subclass; got {cls!r}")
    if not cls.name or not cls.device_type:
        raise ValueError(f"{cls.__name__} must set both 'name' and 'device_type'")
    check_name(cls.name, f"{cls.__name__}.name")
    if not isinstance(cls.device_type, str):
        raise TypeError(f"{cls.__name__}.device_type must be a str; got {cls.device_type!r}")
    priority = as_float(cls.priority)
    if priority is None:
        raise TypeError(
            f"{cls.__name__}.priority must be a number (higher is tried first by "
            f"device='auto'); got {cls.priority!r}"
        )
    if math.isnan(priority):
        raise ValueError(f"{cls.__name__}.priority is NaN, which no order can place; give a number")
    with _lock:
        _ensure_builtins()
        existing = _registry.get(cls.name)
        if existing is not None and existing is not cls and not override:
            raise ValueError(
                f"a backend named {cls.name!r} is already registered "
                f"({existing.__module__}.{existing.__qualname__}, from {_origins[cls.name]}); "
                "pass override=True to replace it"
            )
        _registry[cls.name] = cls
        _origins[cls.name] = origin
    return cls


def unregister_backend(name: str) -> type[Backend]:
    """Remove a backend by name and return it (built-ins come back with ``override``)."""
    if not isinstance(name, str):
        raise TypeError(f"unregister_backend takes a backend name such as 'npu'; got {type(name).__name__}")
    key = name.lower()
    with _lock:
        _ensure_builtins()
        if key not in _registry:
            raise ValueError(f"no backend named {name!r}; registered: {_names()}")
        _origins.pop(key, None)
        return _registry.pop(key)


def list_backends() -> dict[str, type[Backend]]:
    """Every registered backend by name, built-in and plugin, highest priority first."""
    with _lock:
        _ensure_loaded()
        ordered = sorted(_registry.values(), key=lambda c: -c.priority)
        return {c.name: c for c in ordered}


def backend_origin(name: str) -> str:
    """Where backend ``name`` came from: "built-in", the plugin's distribution, or "user"."""
    if not isinstance(name, str):
        raise TypeError(f"backend_origin takes a backend name such as 'npu'; got {type(name).__name__}")
    with _lock:
        _ensure_loaded()
        return _origins.get(name.lower(), "unknown")


def plugin_errors() -> list[tuple[str, str]]:
    """Entry points of the ``hwoptim.backends`` group that failed to load, and backends
    whose ``is_available()`` raised, each with the error."""
    with _lock:
        _ensure_loaded()
        return list(_plugin_errors)


def get_backend(spec: DeviceSpec = "auto") -> Backend:
    """The backend for ``spec``: "auto", a name ("npu"), "cuda:1", a torch.device or a Backend.

    "auto" takes $HWOPTIM_DEVICE if set; else the backend of torch's current accelerator;
    else the available backend of highest priority; else cpu. An unknown name is a
    ValueError listing the registered ones; a known but unavailable one is a RuntimeError
    saying what is missing.
    """
    if isinstance(spec, Backend):
        return spec
    if spec is None:
        spec = "auto"
    if isinstance(spec, torch.device):
        return _resolve(spec.type, spec.index)
    if not isinstance(spec, str):
        raise TypeError(
            "device must be 'auto', a backend name such as 'cuda' or 'cuda:1', "
            f"a torch.device or a Backend; got {type(spec).__name__}"
        )
    text = spec.strip()
    if text.lower() == "auto":
        return _auto()
    name, index = _parse(text)
    return _resolve(name, index)


# -- internals -----------------------------------------------------------------------


def _parse(text: str) -> tuple[str, int | None]:
    """(name, index) from 'name' or 'name:index', the name lower-cased."""
    name, sep, idx = text.partition(":")
    if not name:
        raise ValueError(f"device {text!r} has no backend name before ':'")
    if not sep:
        return name.lower(), None
    if not idx.isdigit():
        raise ValueError(f"device {text!r}: the index after ':' must be a non-negative integer")
    return name.lower(), int(idx)


def _resolve(name: str, index: int | None) -> Backend:
    """The available backend ``name`` (or device type), on device ``index``, or a clear error."""
    with _lock:
        _ensure_loaded()
        cls = _registry.get(name) or _by_device_type(name)
    if cls is None:
        generic = _generic_for(name)
        if generic is None:
            raise ValueError(f"unknown device {name!r}; registered backends: {_names()}")
        backend = generic(index)
    else:
        backend = cls(index)
    _apply_override(backend)
    if not is_available(backend):
        broken = _broken.get(type(backend))
        reason = broken if broken is not None else backend.unavailable_reason()
        raise RuntimeError(f"the {backend.name!r} backend is not available: {reason}")
    if index is not None:
        count = backend.device_count()
        if index >= count:
            raise ValueError(
                f"device {name}:{index} does not exist; this process sees {count} "
                f"{backend.name} device(s), indices 0..{count - 1}"
            )
    return backend


def _auto() -> Backend:
    """The backend device="auto" stands for (see get_backend)."""
    override = _override
    forced = None if override is None else override.auto_backend()
    if forced is not None:
        return _resolve(forced, None)
    env = os.environ.get(ENV_VAR, "").strip()
    if env and env.lower() != "auto":
        try:
            return get_backend(env)
        except (ValueError, RuntimeError) as exc:
            raise type(exc)(f"{ENV_VAR}={env!r}: {exc}") from exc
    accelerator = current_accelerator()
    if accelerator is not None:
        with _lock:
            _ensure_loaded()
            cls = _by_device_type(accelerator)
        if cls is not None:
            backend: Backend | None = cls()
        else:
            generic = _generic_for(accelerator)
            backend = generic() if generic is not None else None
        if backend is not None:
            _apply_override(backend)
            if is_available(backend):
                return backend
    for cls in list_backends().values():
        if cls.name == "cpu":
            continue
        try:
            backend = cls()
        except Exception as exc:  # a plugin's __init__ is its own code too
            _report_broken(cls, "__init__()", exc)
            continue
        _apply_override(backend)
        if is_available(backend):
            return backend
    return _resolve("cpu", None)


def is_available(backend: Backend) -> bool:
    """``backend.is_available()``, held to its promise never to raise.

    A backend (a plugin's, most likely) whose check raises -- or whose vendor import calls
    ``sys.exit()`` -- counts as unavailable, is reported once by name with the error, and
    is listed in ``plugin_errors()``; "auto" then moves on to the next backend.
    """
    try:
        return bool(backend.is_available())
    except (Exception, SystemExit) as exc:
        _report_broken(type(backend), "is_available()", exc)
        return False


def _report_broken(cls: type[Backend], what: str, exc: BaseException) -> None:
    """Leave ``cls`` out for good, and say so once, because its ``what`` raised ``exc``."""
    with _lock:
        if cls in _broken:
            return
        origin = _origins.get(cls.name, "unknown")
        error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, SystemExit) else (
            f"it called sys.exit({exc.code!r})"
        )
        _broken[cls] = f"its {what} raised ({error}); it is left out"
        _plugin_errors.append((cls.name, f"{what} raised {error}"))
    _warn_at_user(f"hwoptim backend {cls.name!r} ({origin}): {what} raised and the backend is left out: {error}")


def check_name(name: Any, what: str) -> str:
    """A backend (or stand-in) name as registered: a lower-case word ``get_backend`` can find."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"{what} must be a non-empty str; got {name!r}")
    if name != name.lower():
        raise ValueError(
            f"{what} {name!r} has capitals: backend names are lower case, since every "
            f"lookup (get_backend, HWOPTIM_DEVICE, mock_backend) ignores case; use {name.lower()!r}"
        )
    if name != name.strip() or ":" in name or any(c.isspace() for c in name) or name == "auto":
        raise ValueError(
            f"{what} {name!r} cannot be looked up: a backend name has no ':' nor spaces "
            "(get_backend reads 'name:index') and is not 'auto'"
        )
    return name


def current_accelerator() -> str | None:
    """The device type of torch's current accelerator ("cuda", a PrivateUse1 name...), or None."""
    accelerator_mod = getattr(torch, "accelerator", None)
    if accelerator_mod is None:
        return None
    try:
        device = accelerator_mod.current_accelerator()
    except Exception:
        return None
    return None if device is None else str(device.type)


def _by_device_type(device_type: str) -> type[Backend] | None:
    """The registered backend of highest priority that claims ``device_type``."""
    claimants = [c for c in _registry.values() if c.device_type == device_type]
    return max(claimants, key=lambda c: c.priority) if claimants else None


#: hwoptim.backends.generic's generic_backend_for, set when that module is imported (by
#: hwoptim.backends): it imports this module, so this one does not import it
_generic_factory: Any = None


def _generic_for(device_type: str) -> type[Backend] | None:
    """A backend class for a device torch knows but no backend claims, or None."""
    return None if _generic_factory is None else _generic_factory(device_type)


def _apply_override(backend: Backend) -> None:
    """Keep ``backend``'s tensors on the CPU where the test tool's _Override says so."""
    override = _override
    if override is not None and override.keeps_on_cpu(backend.name):
        backend._placement = "cpu"


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _warn_at_user(message: str) -> None:
    """Warn (RuntimeWarning) at the first caller outside hwoptim: the user's line, however deep the lookup."""
    frame = sys._getframe(1)
    level = 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame = frame.f_back
        level += 1
    warnings.warn(message, RuntimeWarning, stacklevel=level)


def _names() -> str:
    """The registered names, for error messages."""
    return ", ".join(repr(n) for n in sorted(_registry)) or "(none)"


def _ensure_loaded() -> None:
    """Register the built-ins and the plugins, once."""
    _ensure_builtins()
    _ensure_plugins()


def _ensure_builtins() -> None:
    """Register hwoptim's own backends, once."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    from hwoptim.backends.cpu import CpuBackend
    from hwoptim.backends.cuda import CudaBackend
    from hwoptim.backends.mps import MpsBackend
    from hwoptim.backends.npu import NpuBackend
    from hwoptim.backends.xpu import XpuBackend

    builtins: list[type[Backend]] = [CpuBackend, CudaBackend, MpsBackend, XpuBackend, NpuBackend]
    for cls in builtins:
        _registry.setdefault(cls.name, cls)
        _origins.setdefault(cls.name, "built-in")


def _ensure_plugins() -> None:
    """Register the backends of the ``hwoptim.backends`` entry points, once; report the broken ones."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        origin = f"{dist.name} {dist.version}" if dist is not None else ep.value
        try:
            loaded = ep.load()
            found = loaded() if callable(loaded) and not isinstance(loaded, type) else loaded
            classes: list[type[Backend]] = [found] if isinstance(found, type) else list(found)
            for cls in classes:
                if _registry.get(getattr(cls, "name", None) or "") is cls:
                    _origins[cls.name] = origin  # the plugin registered itself on import
                    continue
                register_backend(cls, override=bool(getattr(cls, "override", False)), origin=origin)
        except (Exception, SystemExit) as exc:  # a vendor import may even call sys.exit()
            message = f"{type(exc).__name__}: {exc}"
            _plugin_errors.append((ep.name, message))
            _warn_at_user(f"hwoptim backend plugin {ep.name!r} ({origin}) failed to load and is skipped: {message}")


def _reset_for_tests() -> None:
    """Forget plugins and registrations so the next lookup loads everything again."""
    global _builtins_loaded, _plugins_loaded
    with _lock:
        _registry.clear()
        _origins.clear()
        _plugin_errors.clear()
        _broken.clear()
        _builtins_loaded = False
        _plugins_loaded = False
