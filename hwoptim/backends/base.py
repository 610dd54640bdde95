"""The Backend interface: everything hwoptim needs from a device, in one small class.

A backend names its device type and says what truly differs there (availability, the
vendor import, autocast dtypes, the grad scaler). Everything else -- device objects,
counts, synchronize, seeds, memory -- is derived here from ``device_type`` through the
device module torch (or the vendor) installs as ``torch.<device_type>``.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any, Callable, ClassVar

import torch

#: dtype names accepted wherever hwoptim takes a dtype (mmengine's four, plus short forms).
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
}


def dtype_name(dtype: torch.dtype) -> str:
    """'torch.bfloat16' -> 'bfloat16', for messages and reports."""
    return str(dtype).replace("torch.", "")


class Backend:
    """One kind of device: how to find it, place tensors on it, autocast and scale there.

    Subclasses set the class attributes and override only what differs from the
    derivation below. Instances are cheap and hold no vendor state; ``index`` is the
    device ordinal the user asked for (``None``: the current one).
    """

    #: registry key, e.g. "npu"
    name: ClassVar[str] = ""
    #: torch device type string, e.g. "npu"
    device_type: ClassVar[str] = ""
    #: order for device="auto": higher first; cpu is always last
    priority: ClassVar[int] = 0
    #: collective library for torch.distributed.init_process_group
    dist_backend: ClassVar[str] = "gloo"
    #: dtypes autocast accepts here; float32 means "autocast off"
    supported_amp_dtypes: ClassVar[tuple[torch.dtype, ...]] = (
        torch.float16,
        torch.bfloat16,
        torch.float32,
    )
    #: the dtype used when the user gives none
    default_dtype: ClassVar[torch.dtype] = torch.float16
    #: what a user installs to get this backend, e.g. 'pip install "hwoptim[npu]"'
    install_hint: ClassVar[str] = ""
    #: the vendor module whose import creates ``torch.<device_type>`` ("torch_npu"), or "".
    #: It is imported when the backend is first asked about, never at ``import hwoptim``.
    vendor_module: ClassVar[str] = ""
    #: what to check when the software is there but no device is, e.g. "check npu-smi info"
    no_device_hint: ClassVar[str] = ""

    def __init__(self, index: int | None = None) -> None:
        self.index = index
        # The torch device type tensors, autocast and scalers use. It equals
        # device_type except under hwoptim.testing.mock_backend, which runs a
        # backend's own code while keeping every tensor on the CPU.
        self._placement = self.device_type

    # -- what a backend usually writes -------------------------------------------------

    def is_available(self) -> bool:
        """Whether this device can be used now. Never raises; imports vendors lazily."""
        module = self._module()
        if module is None:
            return False
        try:
            return bool(module.is_available())
        except Exception:
            return False

    def unavailable_reason(self) -> str:
        """One sentence on why ``is_available()`` is False and what to do about it."""
        install = f"; {self.install_hint}" if self.install_hint else ""
        vendor, import_error = self._import_vendor()
        if import_error is not None:
            return f"{import_error}{install}"
        installed = f"{self.vendor_module} is installed but " if vendor is not None else ""
        check = f" ({self.no_device_hint})" if self.no_device_hint else install
        return f"{installed}no {self.name} device is visible to this process{check}"

    @property
    def amp_dtypes(self) -> tuple[torch.dtype, ...]:
        """The dtypes ``autocast`` accepts on this device (float32 = autocast off)."""
        return self.supported_amp_dtypes

    @property
    def default_amp_dtype(self) -> torch.dtype:
        """The autocast dtype used when the user gives none."""
        return self.default_dtype

    # -- derived from device_type ------------------------------------------------------

    def _module(self) -> Any:
        """The device module (torch.cuda, torch.xpu, torch.npu, ...) or None."""
        if self.vendor_module and self._import_vendor()[0] is None:
            return None
        return getattr(torch, self.device_type, None)

    def _import_vendor(self) -> tuple[Any, str | None]:
        """(``vendor_module`` imported, or None; why not, or None). Never raises."""
        if not self.vendor_module:
            return None, None
        try:
            return importlib.import_module(self.vendor_module), None
        except ImportError as exc:
            return None, f"{self.vendor_module} is not installed ({exc})"
        # Installed but broken: vendor libraries missing, a version clash, or an import
        # that calls sys.exit() (some vendor packages do when no driver is found).
        except (Exception, SystemExit) as exc:
            return None, (
                f"{self.vendor_module} is installed but failed to import: "
                f"{type(exc).__name__}: {exc}"
            )

    def device(self, index: int | None = None) -> torch.device:
        """The torch.device tensors should go to (the current one when no index is known)."""
        if self._placement == "cpu":
            return torch.device("cpu")
        index = self.index if index is None else index
        if index is None:
            index = self.current_device()
        return torch.device(self._placement, index)

    def device_count(self) -> int:
        """How many devices of this kind the process sees (0 when unavailable)."""
        if not self.is_available():
            return 0
        return int(self._module().device_count())

    def current_device(self) -> int:
        """The ordinal of the current device."""
        return int(self._module().current_device())

    def set_device(self, index: int) -> None:
        """Make ``index`` the current device (what torchrun's LOCAL_RANK usually picks)."""
        self._module().set_device(index)

    def synchronize(self) -> None:
        """Wait for all queued work on the device; for timing, never in a training step."""
        self._module().synchronize()

    def manual_seed(self, seed: int) -> None:
        """Seed the device's generators (all devices of this kind)."""
        module = self._module()
        seed_all = getattr(module, "manual_seed_all", None)
        if seed_all is not None:
            seed_all(seed)
        else:
            module.manual_seed(seed)

    def memory_stats(self) -> dict[str, Any]:
        """The device allocator's statistics; empty where the device reports none."""
        stats = getattr(self._module(), "memory_stats", None)
        if stats is None or not self.is_available():
            return {}
        try:
            return dict(stats(self.device()))
        except Exception:
            return {}

    def device_name(self, index: int = 0) -> str:
        """A human-readable name of device ``index`` for reports."""
        get_name = getattr(self._module(), "get_device_name", None)
        if get_name is None:
            return self.device_type
        try:
            return str(get_name(index))
        except Exception:
            return self.device_type

    def vendor_versions(self) -> dict[str, str]:
        """Versions of the vendor packages this backend uses, for `python -m hwoptim env`."""
        return {}

    # -- precision ---------------------------------------------------------------------

    def resolve_dtype(self, dtype: str | torch.dtype | None) -> torch.dtype:
        """Turn a user's dtype (None, a name or a torch.dtype) into one autocast can use here.

        Raises ValueError naming the dtypes this device supports.
        """
        if dtype is None:
            return self.default_amp_dtype
        if isinstance(dtype, str):
            resolved = DTYPE_NAMES.get(dtype.lower())
            if resolved is None:
                raise ValueError(
                    f"dtype {dtype!r} is not a known dtype name; use one of "
                    "'float16', 'bfloat16', 'float32', 'float64' (or a torch.dtype)"
                )
        elif isinstance(dtype, torch.dtype):
            resolved = dtype
        else:
            raise TypeError(
                f"dtype must be None, a dtype name or a torch.dtype; got {type(dtype).__name__}"
            )
        supported = self.amp_dtypes
        if resolved not in supported:
            names = ", ".join(repr(dtype_name(d)) for d in supported)
            raise ValueError(
                f"the {self.name!r} backend cannot autocast to {dtype_name(resolved)}; "
                f"it supports {names}"
            )
        return resolved

    def autocast(
        self,
        dtype: torch.dtype | None = None,
        enabled: bool = True,
        cache_enabled: bool | None = None,
    ) -> AbstractContextManager[Any]:
        """Autocast on this device. float32 means full precision: autocast is switched off.

        ``dtype`` is expected to come from ``resolve_dtype`` (validated once, at construction).
        """
        if dtype is None:
            dtype = self.default_amp_dtype
        if dtype == torch.float32:
            enabled = False
        return torch.autocast(
            self._placement, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled
        )

    def grad_scaler(self, sharded: bool = False, **kwargs: Any) -> torch.amp.GradScaler:
        """A loss scaler with the torch.amp.GradScaler API.

        ``sharded=True`` gives the scaler FSDP needs: it all-reduces the inf check so that
        every rank skips the same steps and keeps the same scale.
        """
        if sharded:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            return ShardedGradScaler(device=self._placement, **kwargs)
        return torch.amp.GradScaler(self._placement, **kwargs)

    # -- distributed -------------------------------------------------------------------

    def no_sync(self, model: Any) -> AbstractContextManager[None]:
        """Skip the gradient collective of a micro-batch that does not update.

        While the returned context is entered, the backward pass of ``model`` does not
        communicate. The wrapper enters it before the forward and leaves it only after the
        backward: DDP reads its flag in the forward, but FSDP1 and FSDP2 read theirs in
        the backward, which mmengine-style loops run after the ``optim_context`` block.
        The default (``skip_gradient_sync``) serves DDP, FSDP1, FSDP2, torch.compile'd
        models and plain modules on every device; a backend overrides this only when its
        vendor has its own data-parallel wrapper with another switch.
        """
        return skip_gradient_sync(model)

    # -- reports -----------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """The facts `python -m hwoptim env` prints about this backend."""
        try:
            available = self.is_available()
            reason = None if available else self.unavailable_reason()
        except (Exception, SystemExit) as exc:  # a report must never fail
            available, reason = False, f"is_available() raised {type(exc).__name__}: {exc}"
        facts: dict[str, Any] = {
            "name": self.name,
            "device_type": self.device_type,
            "available": available,
            "reason": reason,
            "device_count": self.device_count() if available else 0,
            "devices": [],
            "amp_dtypes": [dtype_name(d) for d in self.amp_dtypes],
            "default_dtype": dtype_name(self.default_amp_dtype),
            "dist_backend": self.dist_backend,
            "priority": self.priority,
            "versions": {},
        }
        if available:
            facts["devices"] = [self.device_name(i) for i in range(facts["device_count"])]
            try:
                facts["versions"] = self.vendor_versions()
            except Exception as exc:  # a report must never fail
                facts["versions"] = {"error": repr(exc)}
        return facts

    def __repr__(self) -> str:
        index = "" if self.index is None else f", index={self.index}"
        return f"{type(self).__name__}(name={self.name!r}{index})"


def unwrap_compiled(model: Any) -> Any:
    """The module inside a torch.compile wrapper (OptimizedModule keeps it as _orig_mod)."""
    return getattr(model, "_orig_mod", model)


def has_gradient_sync(model: Any) -> bool:
    """Whether ``model`` has a gradient collective that ``skip_gradient_sync`` can switch off.

    True when the model (or, for a plain root, some submodule) is FSDP2-sharded or has
    ``no_sync()`` (DDP, FSDP1); False for a plain module, whose backward communicates
    nothing. The wrapper asks once per model, so a plain module costs nothing per
    micro-batch.
    """
    fsdp2, no_sync = _find_sync_targets(unwrap_compiled(model))
    return bool(fsdp2 or no_sync)


def skip_gradient_sync(model: Any) -> AbstractContextManager[Any]:
    """The device-independent way to skip gradient synchronisation of ``model``.

    While the returned context is entered, a backward pass through ``model`` does not
    communicate; leaving it turns synchronisation back on.

    - FSDP2 (``fully_shard``): every FSDP2 module in the tree -- the root, or only some
      submodules when the root itself is not sharded -- gets
      ``set_requires_gradient_sync(False)``, and True again on exit.
    - DDP and FSDP1 (``no_sync()`` at the root): their ``no_sync()``.
    - A plain root holding separately wrapped DDP/FSDP1 submodules: the ``no_sync()`` of
      each outermost one.
    - A plain module: nothing.

    One exception: a DDP built with ``static_graph=True`` synchronises the micro-batches
    before its first synchronised backward, since torch cannot start a static graph under
    ``no_sync()`` (see ``_in_first_static_graph_iteration``).

    A ``torch.compile`` wrapper is looked through. Which modules to switch is decided the
    first time a model is seen and remembered for it, weakly (the cache never keeps a model
    alive), so a micro-batch pays a dictionary lookup, not a walk over all modules. Wrap or
    shard the model before training starts (torch needs that anyway: the optimizer must be
    built over the final parameters).
    """
    root = unwrap_compiled(model)
    try:
        targets = _SYNC_TARGETS.get(root)
    except TypeError:  # neither hashable nor weak-referenceable: decide every time
        return _skip_sync(*_find_sync_targets(root))
    found = None if targets is None else targets.resolve()
    if found is None:  # first sight, or a module it named is gone
        found = _find_sync_targets(root)
        try:
            _SYNC_TARGETS[root] = _SyncTargets(*found)
        except TypeError:  # a submodule that cannot be weakly referenced: no cache
            pass
    return _skip_sync(*found)


#: FSDP2 modules as (module, whether its setter takes recurse=), and modules with no_sync()
_Found = tuple[tuple[tuple[Any, bool], ...], tuple[Any, ...]]


class _SyncTargets:
    """The modules to switch for one model, held weakly (see skip_gradient_sync)."""

    __slots__ = ("_fsdp2", "_no_sync")

    def __init__(
        self, fsdp2: tuple[tuple[Any, bool], ...], no_sync: tuple[Any, ...]
    ) -> None:
        self._fsdp2 = tuple((weakref.ref(m), recurse) for m, recurse in fsdp2)
        self._no_sync = tuple(weakref.ref(m) for m in no_sync)

    def resolve(self) -> _Found | None:
        """The modules themselves, or None when one of them no longer exists."""
        fsdp2 = tuple((ref(), recurse) for ref, recurse in self._fsdp2)
        no_sync = tuple(ref() for ref in self._no_sync)
        if any(m is None for m, _ in fsdp2) or any(m is None for m in no_sync):
            return None
        return fsdp2, no_sync


#: root module -> its _SyncTargets
_SYNC_TARGETS: weakref.WeakKeyDictionary[Any, _SyncTargets] = weakref.WeakKeyDictionary()


def _find_sync_targets(root: Any) -> _Found:
    """Walk ``root`` once: which modules must be switched to skip its gradient sync."""
    is_module = isinstance(root, torch.nn.Module)
    modules = root.modules() if is_module else (root,)
    fsdp2 = tuple(
        (m, _setter_takes_recurse(m.set_requires_gradient_sync))
        for m in modules
        if callable(getattr(m, "set_requires_gradient_sync", None))
    )
    if fsdp2:
        return fsdp2, ()
    if callable(getattr(root, "no_sync", None)):
        return (), (root,)
    if is_module:
        return (), tuple(_outermost_with(root, "no_sync"))
    return (), ()


def _setter_takes_recurse(setter: Callable[..., Any]) -> bool:
    # FSDP2's setter walks every submodule on each call unless told recurse=False; the
    # targets already list every FSDP2 module, so each is switched alone. The composable
    # replicate() API has the same setter without that keyword.
    try:
        return "recurse" in inspect.signature(setter).parameters
    except (TypeError, ValueError):
        return False


def _outermost_with(module: torch.nn.Module, attr: str) -> Iterator[torch.nn.Module]:
    """Submodules that have ``attr`` and no ancestor (below ``module``) that has it."""
    for child in module.children():
        if callable(getattr(child, attr, None)):
            yield child
        else:
            yield from _outermost_with(child, attr)


def _skip_sync(
    fsdp2: tuple[tuple[Any, bool], ...], no_sync: tuple[Any, ...]
) -> AbstractContextManager[Any]:
    if fsdp2:
        return _requires_gradient_sync_off(fsdp2)
    if len(no_sync) == 1:
        module = no_sync[0]
        if _in_first_static_graph_iteration(module):
            return contextlib.nullcontext()
        return module.no_sync()  # type: ignore[no-any-return]
    if no_sync:
        return _all_no_sync(no_sync)
    return contextlib.nullcontext()


def _in_first_static_graph_iteration(module: Any) -> bool:
    """Whether ``module`` is a static-graph DDP that has not yet run a synchronised backward.

    DDP(static_graph=True) records the graph during its first synchronised backward, and
    torch breaks when that iteration starts under ``no_sync()``: the first backward fails
    with "expect_autograd_hooks_ INTERNAL ASSERT FAILED" (pytorch/pytorch#143580, fixes
    #166388 and #187732 open as of torch 2.13). Such a micro-batch synchronises instead:
    the gradient of a window is the same sum, it only costs one extra all-reduce, once.
    DDP sets ``_static_graph_delay_allreduce_enqueued`` in that first synchronised backward;
    a torch without the attribute is trusted to handle ``no_sync()`` itself.
    """
    return getattr(module, "static_graph", False) is True and not getattr(
        module, "_static_graph_delay_allreduce_enqueued", True
    )


def _set_gradient_sync(fsdp2: tuple[tuple[Any, bool], ...], flag: bool) -> None:
    for module, takes_recurse in fsdp2:
        if takes_recurse:
            module.set_requires_gradient_sync(flag, recurse=False)
        else:
            module.set_requires_gradient_sync(flag)


@contextlib.contextmanager
def _requires_gradient_sync_off(fsdp2: tuple[tuple[Any, bool], ...]) -> Iterator[None]:
    _set_gradient_sync(fsdp2, False)
    try:
        yield
    finally:
        # Back to True, not to a remembered value: FSDP2 has no public getter, and a
        # micro-batch outside a skip must always synchronise.
        _set_gradient_sync(fsdp2, True)


@contextlib.contextmanager
def _all_no_sync(modules: tuple[Any, ...]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for module in modules:
            if not _in_first_static_graph_iteration(module):
                stack.enter_context(module.no_sync())
        yield
