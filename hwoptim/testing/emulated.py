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
works, and checkpoints load onto and off the device. Named "npu", it comes with a stand-in
``torch_npu`` so that hwoptim's npu backend runs its own code on real ``npu`` tensors.

The rename cannot be undone and makes the device the current accelerator, so install it
in a process of its own: ``pytest --hwoptim-device emulated:emu`` or
``python -m hwoptim.testing.emulated --device npu -- script.py``.

How: a CPU tensor's DLPack capsule re-tagged as an "extension device" (PrivateUse1) imports
as a device tensor sharing its memory, and the reverse gives a CPU alias of a device tensor.
One boxed fallback runs every aten op without a composite kernel: device arguments become
CPU aliases, the CPU kernel runs, results come back as device tensors. View ops run the CPU
kernel's metadata code on the device tensor itself. An op costs ~0.1 ms: keep models small.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import dataclasses
import os
import runpy
import sys
import threading
import types
from collections.abc import Iterator, Sequence
from typing import Any, Callable, cast

import torch
import torch.utils.backend_registration  # _check_torch looks into it

from hwoptim._numbers import check_int

__all__ = [
    "HostReads",
    "count_host_reads",
    "install",
    "installed_device_type",
    "main",
]

DEFAULT_DEVICE_TYPE = "emu"
DEFAULT_DEVICE_COUNT = 2

#: ops whose result the host must wait for on a real device (the value, or a shape that
#: depends on the data); copies from the device to the CPU are counted too
HOST_READ_OPS = frozenset({
    "aten::_local_scalar_dense",  # .item(), float(t), int(t), bool(t), `if t:`
    "aten::equal",
    "aten::nonzero",
    "aten::masked_select",
})
#: ops that may mix devices (a copy between them)
_COPY_OPS = frozenset({"aten::_copy_from", "aten::_copy_from_and_resize", "aten::copy_", "aten::_to_copy"})
#: ops whose ``indices`` may be CPU tensors (CUDA moves them to the device)
_CPU_INDEX_OPS = frozenset({"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"})

_kDLCPU = 1
_kDLExtDev = 12  # torch imports it as PrivateUse1
# The legacy DLManagedTensor starts with a DLTensor: void* data, then DLDevice {int32 type,
# int32 id}. install() checks this layout on a live capsule before relying on it.
_DEVICE_TYPE_OFFSET = 8
_DEVICE_ID_OFFSET = 12

_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]

_CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
# untyped in torch's stubs
_library: Any = torch.library
_to_dlpack: Callable[[torch.Tensor], Any] = getattr(torch.utils.dlpack, "to_dlpack")  # noqa: B009
_lock = threading.Lock()


# -- host reads ------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)  # each block is its own recorder, whatever it counted
class HostReads:
    """Device-to-host reads seen while ``count_host_reads()`` was entered.

    ``ops`` counts them per kind: ``aten::_local_scalar_dense`` (``.item()``, ``float(t)``,
    ``bool(t)``, ``if t:``), ``aten::equal``, ``aten::nonzero``, ``aten::masked_select``
    and ``copy to cpu`` (``.cpu()``, ``.tolist()``, ``.to("cpu")``, printing a tensor).
    On a real accelerator each one waits for the device to finish its queued work.
    """

    ops: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)

    @property
    def total(self) -> int:
        """All reads counted."""
        return sum(self.ops.values())

    def __str__(self) -> str:
        detail = ", ".join(f"{name} x{n}" for name, n in sorted(self.ops.items()))
        return f"{self.total} host read(s)" + (f": {detail}" if detail else "")


_recorders: list[HostReads] = []


def _record_read(kind: str) -> None:
    for recorder in _recorders:
        recorder.ops[kind] += 1


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
    _require_installed()
    reads = HostReads()
    _recorders.append(reads)
    try:
        yield reads
    finally:
        _recorders.remove(reads)


# -- set-up ------------------------------------------------------------------------------------


@dataclasses.dataclass
class _State:
    device_type: str
    device_count: int
    module: _DeviceModule
    libraries: list[Any]


_state: _State | None = None


def installed_device_type() -> str | None:
    """The emulated device's type in this process ("emu", "npu", ...), or None."""
    return None if _state is None else _state.device_type


def install(device_type: str = DEFAULT_DEVICE_TYPE, device_count: int = DEFAULT_DEVICE_COUNT) -> str:
    """Make ``device_type`` an emulated accelerator in this process; returns the type.

    Once per process: torch cannot rename PrivateUse1 twice. Installing the same type again
    does nothing; another type, a device count that differs, a type torch already has, or a
    torch too old for the APIs this needs is a RuntimeError. ``device_type="npu"`` also puts
    a stand-in ``torch_npu`` into ``sys.modules`` (hwoptim's npu backend imports it).
    """
    global _state
    if not isinstance(device_type, str) or not device_type.isidentifier() or not device_type.islower():
        raise ValueError(f"device_type must be a lower-case name such as 'emu' or 'npu'; got {device_type!r}")
    device_count = check_int(device_count, "device_count", 1)  # np.int64 too
    with _lock:
        if _state is not None:
            if (_state.device_type, _state.device_count) != (device_type, device_count):
                raise RuntimeError(
                    f"the emulated device is already installed in this process as "
                    f"{_state.device_type!r} with {_state.device_count} device(s); it cannot "
                    f"become {device_type!r} with {device_count} (the rename of PrivateUse1 is "
                    "once per process): run the other one in a process of its own"
                )
            return device_type
        _check_torch()
        current = torch._C._get_privateuse1_backend_name()
        if current != "privateuseone":
            raise RuntimeError(
                f"torch's PrivateUse1 device type is already taken by {current!r} (a vendor "
                "extension such as torch_npu was imported); the emulated device needs a "
                "process without it"
            )
        if device_type in _builtin_device_types():
            raise ValueError(f"{device_type!r} is a device type torch already has; pick another name")
        if device_type == "npu" and "torch_npu" in sys.modules:
            raise RuntimeError("torch_npu is already imported: the emulated 'npu' needs a process without it")
        _check_dlpack_layout()
        module = _DeviceModule(device_type, device_count)
        from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

        _setup_privateuseone_for_python_backend(device_type, backend_module=module)
        _state = _State(device_type, device_count, module, [])
        _state.libraries.extend(_register_kernels(device_type))
        from hwoptim.testing import _emulated_autocast

        _emulated_autocast.install(device_type)
        _patch_storage_constructor(device_type)
        if device_type == "npu":
            sys.modules["torch_npu"] = _torch_npu_stand_in(device_type)
        return device_type


def _require_installed() -> _State:
    if _state is None:
        raise RuntimeError(
            "the emulated device is not installed in this process: call "
            "hwoptim.testing.emulated.install() first (or run pytest with "
            "--hwoptim-device emulated:emu)"
        )
    return _state


# What install() needs from torch: experimental APIs of recent releases (CI pins 2.13).
_REQUIRED_APIS = (
    "utils.backend_registration._setup_privateuseone_for_python_backend",
    "_C._acc.register_python_privateuseone_device_guard",
    "accelerator.current_accelerator",
    "library.Library.fallback",
    "serialization.register_package",
    "get_autocast_dtype",
)


def _check_torch() -> None:
    missing = []
    for path in _REQUIRED_APIS:
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


def _builtin_device_types() -> set[str]:
    return {
        "cpu", "cuda", "mkldnn", "opengl", "opencl", "ideep", "hip", "ve", "fpga", "maia", "xla",
        "lazy", "vulkan", "mps", "meta", "hpu", "mtia", "xpu", "ipu", "privateuseone",
    }


def _check_dlpack_layout() -> None:
    probe = torch.arange(3.0)
    capsule = _to_dlpack(probe)
    address = _capsule_pointer(capsule, b"dltensor")
    data = ctypes.c_void_p.from_address(address).value
    device = ctypes.c_int32.from_address(address + _DEVICE_TYPE_OFFSET).value
    if data != probe.data_ptr() or device != _kDLCPU:
        raise RuntimeError(
            f"torch {torch.__version__} exports DLPack in a layout the emulated device does not "
            "know; it cannot create device tensors on this torch"
        )


# -- device tensors over CPU memory --------------------------------------------------------


def _retag(tensor: torch.Tensor, device_type: int, index: int) -> torch.Tensor:
    capsule = _to_dlpack(tensor)
    address = _capsule_pointer(capsule, b"dltensor")
    ctypes.c_int32.from_address(address + _DEVICE_TYPE_OFFSET).value = device_type
    ctypes.c_int32.from_address(address + _DEVICE_ID_OFFSET).value = index
    return torch._C._from_dlpack(capsule)


def _cpu_alias(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor over the same memory as the device tensor ``tensor``."""
    if tensor.numel() == 0:  # nothing to share; an empty DLPack may carry a null pointer
        return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype)
    return _retag(tensor, _kDLCPU, 0)


def _on_device(tensor: torch.Tensor, index: int) -> torch.Tensor:
    """A device tensor (device ``index``) that owns a reference to CPU tensor ``tensor``'s memory."""
    if tensor.numel() == 0:
        base = _retag(torch.empty(1, dtype=tensor.dtype), _kDLExtDev, index)
        return _metadata(torch.ops.aten.as_strided.default, base, tensor.shape, tensor.stride(), 0)
    return _retag(tensor, _kDLExtDev, index)


def _metadata(op: Any, *args: Any) -> torch.Tensor:
    """Run ``op``'s CPU kernel on device tensors: it only builds or rewrites their metadata."""
    return cast(torch.Tensor, op.redispatch(_CPU_KEYS, *args))


def _is_ours(x: Any, device_type: str) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == device_type


def _flat(values: Sequence[Any]) -> Iterator[Any]:
    for value in values:
        if isinstance(value, (list, tuple)):
            yield from value
        else:
            yield value


# -- the boxed fallback --------------------------------------------------------------------


class _Plan:
    """What the fallback needs to know about one op, read from its schema once."""

    __slots__ = ("check", "host_read", "index_ops", "name", "outs", "returns", "view")

    def __init__(self, op: Any) -> None:
        schema = op._schema
        self.name: str = schema.name
        returns = schema.returns
        # A view: every result aliases an input without writing it.
        self.view = bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)
        self.outs = [(i, a.name) for i, a in enumerate(schema.arguments) if a.is_out]
        writes: dict[str, tuple[int, str]] = {}
        for i, a in enumerate(schema.arguments):
            if a.alias_info is not None and a.alias_info.is_write:
                for alias_set in a.alias_info.before_set:
                    writes[alias_set] = (i, a.name)
        # per result: the (position, name) of the argument it is, or None for a new tensor
        self.returns: list[tuple[int, str] | None] = []
        for r in returns:
            source = None
            if r.alias_info is not None and r.alias_info.is_write:
                source = next((writes[s] for s in r.alias_info.before_set if s in writes), None)
            self.returns.append(source)
        self.check = self.name not in _COPY_OPS
        self.index_ops = self.name in _CPU_INDEX_OPS
        self.host_read = self.name in HOST_READ_OPS


def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], position: int, name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[position] if position < len(args) else None


class _Fallback:
    """The PrivateUse1 fallback: run the CPU kernel on CPU aliases of the device tensors."""

    def __init__(self, device_type: str, module: _DeviceModule) -> None:
        self.device_type = device_type
        self.module = module
        self.plans: dict[Any, _Plan] = {}

    def __call__(self, op: Any, *args: Any, **kwargs: Any) -> Any:
        plan = self.plans.get(op)
        if plan is None:
            plan = self.plans[op] = _Plan(op)
        if plan.view:  # the CPU kernel only builds a TensorImpl over the same storage
            return op.redispatch(_CPU_KEYS, *args, **kwargs)
        index = self.check_devices(plan, args, kwargs) if plan.check else self.first_index(args, kwargs)
        if plan.host_read:
            _record_read(plan.name)
        cpu_args = tuple(self.to_cpu(a) for a in args)
        cpu_kwargs = {k: self.to_cpu(v) for k, v in kwargs.items()}
        # out= arguments get empty CPU tensors: the CPU kernel may resize its output, which
        # memory borrowed through DLPack cannot do (and it warns when resizing a non-empty
        # one: mse_loss.out resizes a 0-dim out on its way). Copied or adopted afterwards.
        adopt: list[tuple[torch.Tensor, torch.Tensor]] = []
        for position, name in plan.outs:
            given = _argument(args, kwargs, position, name)
            if given is None:
                continue
            single = not isinstance(given, (list, tuple))
            fresh = [
                torch.empty(0, dtype=t.dtype) if _is_ours(t, self.device_type) else t
                for t in ((given,) if single else given)
            ]
            adopt.extend((t, c) for t, c in zip((given,) if single else given, fresh) if t is not c)
            value = fresh[0] if single else type(given)(fresh)
            if name in kwargs or position >= len(args):
                cpu_kwargs[name] = value
            else:
                cpu_args = (*cpu_args[:position], value, *cpu_args[position + 1:])
        result = op(*cpu_args, **cpu_kwargs)
        for target, cpu in adopt:
            if cpu.shape == target.shape:
                _cpu_alias(target).copy_(cpu)
            else:  # the kernel resized it: the device tensor takes over its memory
                _metadata(torch.ops.aten.set_.source_Tensor, target, _on_device(cpu, index))
        results = (result,) if len(plan.returns) == 1 else tuple(result or ())
        wrapped = []
        for source, value in zip(plan.returns, results):
            if source is not None:  # in place / out=: the caller's own argument
                wrapped.append(_argument(args, kwargs, *source))
            else:
                wrapped.append(self.to_device(value, index))
        if not plan.returns:
            return None
        return wrapped[0] if len(wrapped) == 1 else tuple(wrapped)

    def to_cpu(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return _cpu_alias(x) if x.device.type == self.device_type else x
        if isinstance(x, (list, tuple)):
            return type(x)(self.to_cpu(y) for y in x)
        if isinstance(x, torch.device) and x.type == self.device_type:
            return torch.device("cpu")
        return x

    def to_device(self, x: Any, index: int) -> Any:
        if isinstance(x, torch.Tensor):
            return _on_device(x, index) if x.device.type == "cpu" else x
        if isinstance(x, (list, tuple)):
            return type(x)(self.to_device(y, index) for y in x)
        return x

    def first_index(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        for x in _flat((*args, *kwargs.values())):
            if _is_ours(x, self.device_type):
                return int(x.device.index)
        return self.module.index_of(kwargs.get("device"))

    def check_devices(self, plan: _Plan, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        """Refuse what CUDA refuses: non-scalar CPU tensors, two device indices. Returns the index."""
        values: Sequence[Any] = (*args, *kwargs.values())
        indices: set[int] = set()
        if plan.index_ops and len(args) > 1:  # (self, indices, ...): CPU indices are fine
            values = (args[0], *args[2:], *kwargs.values())
            indices.update(int(x.device.index) for x in _flat((args[1],)) if _is_ours(x, self.device_type))
        cpu_shape = None
        for x in _flat(values):
            if not isinstance(x, torch.Tensor):
                continue
            if x.device.type == self.device_type:
                indices.add(int(x.device.index))
            elif x.dim() > 0 and cpu_shape is None:
                cpu_shape = (str(x.device), tuple(x.shape))
        if not indices:
            return self.module.index_of(kwargs.get("device"))
        name = self.device_type
        if len(indices) > 1:
            low, high = min(indices), max(indices)
            raise RuntimeError(
                "Expected all tensors to be on the same device, but found at least two devices, "
                f"{name}:{low} and {name}:{high}! (when checking arguments for {plan.name})"
            )
        index = indices.pop()
        if cpu_shape is not None:
            raise RuntimeError(
                "Expected all tensors to be on the same device, but found at least two devices, "
                f"{name}:{index} and {cpu_shape[0]}! (when checking arguments for {plan.name}: "
                f"a {cpu_shape[0]} tensor of shape {cpu_shape[1]})"
            )
        return index


# -- kernels the fallback cannot provide -----------------------------------------------------


def _register_kernels(device_type: str) -> list[Any]:
    state = _require_installed()
    module = state.module
    fallback = _Fallback(device_type, module)
    fallback_lib = _library.Library("_", "IMPL")
    fallback_lib.fallback(fallback, "PrivateUse1")
    lib = _library.Library("aten", "IMPL")
    set_source_tensor = torch.ops.aten.set_.source_Tensor

    def empty_memory_format(
        size: Any, *, dtype: Any = None, layout: Any = None, device: Any = None,
        pin_memory: Any = None, memory_format: Any = None,
    ) -> torch.Tensor:
        cpu = torch.empty(size, dtype=dtype, memory_format=memory_format or torch.contiguous_format)
        return _on_device(cpu, module.index_of(device))

    def empty_strided(
        size: Any, stride: Any, *, dtype: Any = None, layout: Any = None, device: Any = None,
        pin_memory: Any = None,
    ) -> torch.Tensor:
        return _on_device(torch.empty_strided(size, stride, dtype=dtype), module.index_of(device))

    def copy_from(src: torch.Tensor, dst: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        src_ours, dst_ours = _is_ours(src, device_type), _is_ours(dst, device_type)
        if src_ours and not dst_ours:
            _record_read("copy to cpu")
        (_cpu_alias(dst) if dst_ours else dst).copy_(_cpu_alias(src) if src_ours else src)
        return dst

    def copy_from_and_resize(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        if dst.shape != src.shape:
            if dst.numel() != 0:
                raise RuntimeError("_copy_from_and_resize: only an empty destination can be resized")
            fresh = _on_device(torch.empty(src.shape, dtype=dst.dtype), dst.device.index)
            _metadata(set_source_tensor, dst, fresh)
        return copy_from(src, dst)

    def resize_(self: torch.Tensor, size: Any, memory_format: Any = None) -> torch.Tensor:
        size = list(size)
        numel = 1
        for s in size:
            numel *= s
        available = self.untyped_storage().nbytes() - self.storage_offset() * self.element_size()
        if numel * self.element_size() <= available:  # fits: new metadata over the same memory
            return _metadata(
                torch.ops.aten.set_.source_Storage_storage_offset, self, self.untyped_storage(),
                self.storage_offset(), size, torch.empty(size, device="meta").stride(),
            )
        fresh = _on_device(torch.empty(size, dtype=self.dtype), self.device.index)
        if self.numel():
            keep = min(self.numel(), numel)
            _cpu_alias(fresh).view(-1)[:keep].copy_(_cpu_alias(self).reshape(-1)[:keep])
        return _metadata(set_source_tensor, self, fresh)

    def set_empty(self: torch.Tensor) -> torch.Tensor:
        fresh = _on_device(torch.empty(0, dtype=self.dtype), self.device.index)
        return _metadata(set_source_tensor, self, fresh)

    def metadata_only(overload: Any) -> Callable[..., Any]:
        def kernel(*args: Any, **kwargs: Any) -> Any:
            return overload.redispatch(_CPU_KEYS, *args, **kwargs)

        return kernel

    # PrivateUse1 convolutions dispatch to *_overrideable, which has no CPU kernel.
    convolution_plan = _Plan(torch.ops.aten.convolution.default)

    def convolution(
        input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Any,
        padding: Any, dilation: Any, transposed: bool, output_padding: Any, groups: int,
    ) -> torch.Tensor:
        index = fallback.check_devices(convolution_plan, (input, weight, bias), {})
        cpu = [None if t is None else _cpu_alias(t) for t in (input, weight, bias)]
        out = torch.ops.aten.convolution.default(
            *cpu, stride, padding, dilation, transposed, output_padding, groups
        )
        return _on_device(out, index)

    def convolution_backward(
        grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, stride: Any,
        padding: Any, dilation: Any, transposed: bool, output_padding: Any, groups: int,
        output_mask: Any,
    ) -> tuple[torch.Tensor | None, ...]:
        index = int(input.device.index)
        bias_size = [weight.shape[1] * groups if transposed else weight.shape[0]]
        grads = torch.ops.aten.convolution_backward.default(
            _cpu_alias(grad_output), _cpu_alias(input), _cpu_alias(weight), bias_size, stride,
            padding, dilation, transposed, output_padding, groups, output_mask,
        )
        return tuple(None if g is None else _on_device(g, index) for g in grads)

    kernels: list[tuple[str, Callable[..., Any]]] = [
        ("empty.memory_format", empty_memory_format),
        ("empty_strided", empty_strided),
        ("_copy_from", copy_from),
        ("_copy_from_and_resize", copy_from_and_resize),
        ("resize_", resize_),
        ("set_", set_empty),
        ("convolution_overrideable", convolution),
        ("convolution_backward_overrideable", convolution_backward),
    ]
    for overload in ("source_Storage", "source_Storage_storage_offset", "source_Tensor",
                     "source_Tensor_storage_offset"):
        kernels.append((f"set_.{overload}", metadata_only(getattr(torch.ops.aten.set_, overload))))
    for name, kernel in kernels:
        lib.impl(name, kernel, "PrivateUse1")
    return [fallback_lib, lib]


def _patch_storage_constructor(device_type: str) -> None:
    """``torch.UntypedStorage(n, device=<emulated>)`` allocates through ``torch.empty``.

    torch's own constructor asks the C++ allocator of PrivateUse1, which a Python backend
    does not have (a segfault). ``torch.load`` onto the device and ``storage.to(device)``
    take that path.
    """
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


# -- the device module torch and hwoptim ask (torch.<device_type>) ---------------------------


class _DeviceModule:
    """``torch.<device_type>``: what torch's autocast, GradScaler and hwoptim's backends ask."""

    def __init__(self, device_type: str, device_count: int) -> None:
        self._type = device_type
        self._count = device_count
        self._current = 0
        outer = self

        class device:  # torch.cuda.device's shape: a context manager
            """Make a device current for the block (as ``torch.cuda.device``)."""

            def __init__(self, device: Any) -> None:
                self.index = None if device is None else outer.index_of(device)
                self.previous = outer._current

            def __enter__(self) -> None:
                self.previous = outer._current
                if self.index is not None:
                    outer._current = self.index

            def __exit__(self, *exc: Any) -> None:
                outer._current = self.previous

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


def _torch_npu_stand_in(device_type: str) -> types.ModuleType:
    """What hwoptim's npu backend imports from torch_npu, for the emulated "npu"."""
    module = types.ModuleType("torch_npu", "hwoptim's stand-in for torch_npu on the emulated npu device")
    module.__version__ = "0+hwoptim.emulated"  # type: ignore[attr-defined]

    def grad_scaler(**kwargs: Any) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(device_type, **kwargs)

    amp = types.SimpleNamespace(GradScaler=grad_scaler)
    module.npu = types.SimpleNamespace(amp=amp)  # type: ignore[attr-defined]
    return module


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
    parser.add_argument("--device-count", type=int, default=DEFAULT_DEVICE_COUNT)
    parser.add_argument("target", nargs=argparse.REMAINDER, help="-m MODULE ARGS... or SCRIPT ARGS...")
    args = parser.parse_args(argv)
    target = args.target[1:] if args.target[:1] == ["--"] else args.target
    if not target or target == ["-m"]:
        parser.error("give what to run: -m MODULE [ARGS...] or SCRIPT [ARGS...]")
    install(args.device, args.device_count)
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
