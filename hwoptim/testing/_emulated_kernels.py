"""The emulated device's kernels: one boxed fallback for every aten op, and the few it cannot run.

The fallback runs each op without a composite kernel: device arguments become CPU aliases,
the CPU kernel runs, results come back as device tensors; view ops run the CPU kernel's
metadata code on the device tensor itself. Before that it refuses what CUDA refuses (CPU
tensors or two device indices in one op) and reports host reads to the census. The
explicit kernels cover what has no CPU kernel to borrow: allocation, copies between the
CPU and the device, storage resizing, and the ``*_overrideable`` convolutions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Callable, Protocol

import torch

from hwoptim.testing import _emulated_reads
from hwoptim.testing._emulated_memory import CPU_KEYS, cpu_alias, metadata, on_device

__all__ = ["DeviceIndex", "register"]

#: ops that may mix devices (a copy between them)
_COPY_OPS = frozenset({"aten::_copy_from", "aten::_copy_from_and_resize", "aten::copy_", "aten::_to_copy"})
#: ops whose ``indices`` may be CPU tensors (CUDA moves them to the device)
_CPU_INDEX_OPS = frozenset({"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"})

_library: Any = torch.library  # untyped in torch's stubs
_Kernels = list[tuple[str, Callable[..., Any]]]


class DeviceIndex(Protocol):
    """What the kernels ask the device module: the ordinal a ``device=`` argument stands for."""

    def index_of(self, device: Any) -> int:
        """The ordinal ``device`` (None, an int, a name or a torch.device) stands for."""


def register(device_type: str, devices: DeviceIndex) -> list[Any]:
    """Register the fallback and the explicit kernels for PrivateUse1; returns the libraries to keep."""
    fallback = _Fallback(device_type, devices)
    fallback_lib = _library.Library("_", "IMPL")
    fallback_lib.fallback(fallback, "PrivateUse1")
    lib = _library.Library("aten", "IMPL")
    kernels = [
        *_allocation_kernels(devices),
        *_copy_kernels(device_type),
        *_storage_kernels(),
        *_convolution_kernels(fallback),
    ]
    for name, kernel in kernels:
        lib.impl(name, kernel, "PrivateUse1")
    return [fallback_lib, lib]


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
        self.host_read = self.name in _emulated_reads.HOST_READ_OPS


def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], position: int, name: str) -> Any:
    """The argument at ``position`` or named ``name``, whichever way it was passed."""
    if name in kwargs:
        return kwargs[name]
    return args[position] if position < len(args) else None


def _is_ours(x: Any, device_type: str) -> bool:
    """Whether ``x`` is a tensor of the emulated device."""
    return isinstance(x, torch.Tensor) and x.device.type == device_type


def _flat(values: Sequence[Any]) -> Iterator[Any]:
    """``values`` with lists and tuples (a TensorList argument) opened one level."""
    for value in values:
        if isinstance(value, (list, tuple)):
            yield from value
        else:
            yield value


class _Fallback:
    """The PrivateUse1 fallback: run the CPU kernel on CPU aliases of the device tensors."""

    def __init__(self, device_type: str, devices: DeviceIndex) -> None:
        self.device_type = device_type
        self.devices = devices
        self.plans: dict[Any, _Plan] = {}

    def __call__(self, op: Any, *args: Any, **kwargs: Any) -> Any:
        plan = self.plans.get(op)
        if plan is None:
            plan = self.plans[op] = _Plan(op)
        if plan.view:  # the CPU kernel only builds a TensorImpl over the same storage
            return op.redispatch(CPU_KEYS, *args, **kwargs)
        index = self.check_devices(plan, args, kwargs) if plan.check else self.first_index(args, kwargs)
        if plan.host_read:
            _emulated_reads.record(plan.name)
        cpu_args = tuple(self.to_cpu(a) for a in args)
        cpu_kwargs = {k: self.to_cpu(v) for k, v in kwargs.items()}
        cpu_args, adopt = self.fresh_outs(plan, args, kwargs, cpu_args, cpu_kwargs)
        result = op(*cpu_args, **cpu_kwargs)
        for target, cpu in adopt:
            if cpu.shape == target.shape:
                cpu_alias(target).copy_(cpu)
            else:  # the kernel resized it: the device tensor takes over its memory
                metadata(torch.ops.aten.set_.source_Tensor, target, on_device(cpu, index))
        if not plan.returns:
            return None
        results = (result,) if len(plan.returns) == 1 else tuple(result or ())
        wrapped = [
            self.to_device(value, index) if source is None else _argument(args, kwargs, *source)
            for source, value in zip(plan.returns, results)  # in place / out=: the caller's own
        ]
        return wrapped[0] if len(wrapped) == 1 else tuple(wrapped)

    def fresh_outs(
        self, plan: _Plan, args: tuple[Any, ...], kwargs: dict[str, Any], cpu_args: tuple[Any, ...],
        cpu_kwargs: dict[str, Any],
    ) -> tuple[tuple[Any, ...], list[tuple[torch.Tensor, torch.Tensor]]]:
        """Give each device ``out=`` an empty CPU tensor; returns the arguments and (out, CPU) pairs."""
        # The CPU kernel may resize its output, which memory borrowed through DLPack cannot
        # do (and it warns when resizing a non-empty one: mse_loss.out resizes a 0-dim out on
        # its way); the caller copies or adopts the results afterwards.
        adopt: list[tuple[torch.Tensor, torch.Tensor]] = []
        for position, name in plan.outs:
            given = _argument(args, kwargs, position, name)
            if given is None:
                continue
            single = not isinstance(given, (list, tuple))
            targets = (given,) if single else given
            fresh = [torch.empty(0, dtype=t.dtype) if _is_ours(t, self.device_type) else t for t in targets]
            adopt.extend((t, c) for t, c in zip(targets, fresh) if t is not c)
            value = fresh[0] if single else type(given)(fresh)
            if name in kwargs or position >= len(args):
                cpu_kwargs[name] = value
            else:
                cpu_args = (*cpu_args[:position], value, *cpu_args[position + 1:])
        return cpu_args, adopt

    def to_cpu(self, x: Any) -> Any:
        """``x`` with every device tensor (and device) replaced by its CPU alias."""
        if isinstance(x, torch.Tensor):
            return cpu_alias(x) if x.device.type == self.device_type else x
        if isinstance(x, (list, tuple)):
            return type(x)(self.to_cpu(y) for y in x)
        if isinstance(x, torch.device) and x.type == self.device_type:
            return torch.device("cpu")
        return x

    def to_device(self, x: Any, index: int) -> Any:
        """``x`` with every CPU tensor moved, without a copy, onto device ``index``."""
        if isinstance(x, torch.Tensor):
            return on_device(x, index) if x.device.type == "cpu" else x
        if isinstance(x, (list, tuple)):
            return type(x)(self.to_device(y, index) for y in x)
        return x

    def first_index(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        """The device of the first device tensor among the arguments, else of ``device=``."""
        for x in _flat((*args, *kwargs.values())):
            if _is_ours(x, self.device_type):
                return int(x.device.index)
        return self.devices.index_of(kwargs.get("device"))

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
            return self.devices.index_of(kwargs.get("device"))
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


# -- kernels the fallback cannot provide ---------------------------------------------------


def _allocation_kernels(devices: DeviceIndex) -> _Kernels:
    """``empty`` and ``empty_strided``: CPU memory handed to the device."""

    def empty_memory_format(
        size: Any, *, dtype: Any = None, layout: Any = None, device: Any = None,
        pin_memory: Any = None, memory_format: Any = None,
    ) -> torch.Tensor:
        cpu = torch.empty(size, dtype=dtype, memory_format=memory_format or torch.contiguous_format)
        return on_device(cpu, devices.index_of(device))

    def empty_strided(
        size: Any, stride: Any, *, dtype: Any = None, layout: Any = None, device: Any = None,
        pin_memory: Any = None,
    ) -> torch.Tensor:
        return on_device(torch.empty_strided(size, stride, dtype=dtype), devices.index_of(device))

    return [("empty.memory_format", empty_memory_format), ("empty_strided", empty_strided)]


def _copy_kernels(device_type: str) -> _Kernels:
    """Copies between the CPU and the device (a copy to the CPU is a host read)."""
    set_source_tensor = torch.ops.aten.set_.source_Tensor

    def copy_from(src: torch.Tensor, dst: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        src_ours, dst_ours = _is_ours(src, device_type), _is_ours(dst, device_type)
        if src_ours and not dst_ours:
            _emulated_reads.record("copy to cpu")
        (cpu_alias(dst) if dst_ours else dst).copy_(cpu_alias(src) if src_ours else src)
        return dst

    def copy_from_and_resize(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        if dst.shape != src.shape:
            if dst.numel() != 0:
                raise RuntimeError("_copy_from_and_resize can resize an empty destination only")
            fresh = on_device(torch.empty(src.shape, dtype=dst.dtype), dst.device.index)
            metadata(set_source_tensor, dst, fresh)
        return copy_from(src, dst)

    return [("_copy_from", copy_from), ("_copy_from_and_resize", copy_from_and_resize)]


def _storage_kernels() -> _Kernels:
    """``resize_`` and the ``set_`` overloads: a tensor's view of its storage."""
    set_source_tensor = torch.ops.aten.set_.source_Tensor

    def resize_(self: torch.Tensor, size: Any, memory_format: Any = None) -> torch.Tensor:
        size = list(size)
        numel = 1
        for s in size:
            numel *= s
        available = self.untyped_storage().nbytes() - self.storage_offset() * self.element_size()
        if numel * self.element_size() <= available:  # fits: new metadata over the same memory
            return metadata(
                torch.ops.aten.set_.source_Storage_storage_offset, self, self.untyped_storage(),
                self.storage_offset(), size, torch.empty(size, device="meta").stride(),
            )
        fresh = on_device(torch.empty(size, dtype=self.dtype), self.device.index)
        if self.numel():
            keep = min(self.numel(), numel)
            cpu_alias(fresh).view(-1)[:keep].copy_(cpu_alias(self).reshape(-1)[:keep])
        return metadata(set_source_tensor, self, fresh)

    def set_empty(self: torch.Tensor) -> torch.Tensor:
        fresh = on_device(torch.empty(0, dtype=self.dtype), self.device.index)
        return metadata(set_source_tensor, self, fresh)

    def metadata_only(overload: Any) -> Callable[..., Any]:
        def kernel(*args: Any, **kwargs: Any) -> Any:
            return overload.redispatch(CPU_KEYS, *args, **kwargs)

        return kernel

    kernels: _Kernels = [("resize_", resize_), ("set_", set_empty)]
    for name in ("source_Storage", "source_Storage_storage_offset", "source_Tensor", "source_Tensor_storage_offset"):
        kernels.append((f"set_.{name}", metadata_only(getattr(torch.ops.aten.set_, name))))
    return kernels


def _convolution_kernels(fallback: _Fallback) -> _Kernels:
    """PrivateUse1 convolutions dispatch to ``*_overrideable``, which has no CPU kernel."""
    convolution_plan = _Plan(torch.ops.aten.convolution.default)

    def convolution(
        input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Any,
        padding: Any, dilation: Any, transposed: bool, output_padding: Any, groups: int,
    ) -> torch.Tensor:
        index = fallback.check_devices(convolution_plan, (input, weight, bias), {})
        cpu = [None if t is None else cpu_alias(t) for t in (input, weight, bias)]
        out = torch.ops.aten.convolution.default(*cpu, stride, padding, dilation, transposed, output_padding, groups)
        return on_device(out, index)

    def convolution_backward(
        grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, stride: Any,
        padding: Any, dilation: Any, transposed: bool, output_padding: Any, groups: int,
        output_mask: Any,
    ) -> tuple[torch.Tensor | None, ...]:
        index = int(input.device.index)
        bias_size = [weight.shape[1] * groups if transposed else weight.shape[0]]
        grads = torch.ops.aten.convolution_backward.default(
            cpu_alias(grad_output), cpu_alias(input), cpu_alias(weight), bias_size, stride,
            padding, dilation, transposed, output_padding, groups, output_mask,
        )
        return tuple(None if g is None else on_device(g, index) for g in grads)

    return [
        ("convolution_overrideable", convolution),
        ("convolution_backward_overrideable", convolution_backward),
    ]
