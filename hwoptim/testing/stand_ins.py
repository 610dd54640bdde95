"""The stand-ins of the built-in backends: what each backend calls, faked on the CPU.

Each one fakes exactly the vendor surface its backend touches, the way the real thing
provides it: torch_npu is an importable module whose import creates ``torch.npu``;
``torch.cuda``, ``torch.xpu``, ``torch.mps`` and ``torch.backends.mps`` are replaced
(torch's own internals still reach the real modules for anything not faked).

Facts about the torch build (``torch.xpu._is_compiled``, ``torch.backends.mps.is_built``)
are never faked: torch reads them to decide what to import from its C extension, which
this build does not have.
"""

from __future__ import annotations

import types

import torch

from hwoptim.testing.mock import VendorMock, register_stand_in

#: the version string stand-in vendor modules report
MOCK_VERSION = "0.0+hwoptim.mock"


@register_stand_in("cpu")
def cpu(mock: VendorMock) -> None:
    """The CPU needs no vendor: mocking it only makes device="auto" pick it."""


@register_stand_in("cuda")
def cuda(mock: VendorMock) -> None:
    """torch.cuda with the mock's GPUs (bf16 supported, as on Ampere and newer).

    No stream is capturing a CUDA graph: torch's optimizers ask, once CUDA is available,
    through torch.cuda.is_current_stream_capturing() or (torch 2.13+)
    torch.accelerator.current_stream().is_capturing(). On a CUDA build of torch without a
    GPU the real ones would reach the driver.
    """
    device = mock.device_module(
        "torch.cuda", real=torch.cuda, is_current_stream_capturing=lambda: False
    )
    mock.patch(torch, "cuda", device)
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "current_stream"):
        stream = mock.namespace("torch.cuda.Stream", is_capturing=lambda: False)
        current_stream = mock.record("torch.accelerator.current_stream", lambda device=None: stream)
        mock.patch(accelerator, "current_stream", current_stream)


@register_stand_in("xpu")
def xpu(mock: VendorMock) -> None:
    """torch.xpu as an XPU build of torch has it, with the mock's GPUs."""
    mock.patch(torch, "xpu", mock.device_module("torch.xpu", real=torch.xpu))
    mock.patch(torch.version, "xpu", MOCK_VERSION)


@register_stand_in("mps")
def mps(mock: VendorMock) -> None:
    """torch.backends.mps and torch.mps of a Mac with macOS 14 (so bf16 autocast)."""
    backends_mps = mock.namespace(
        "torch.backends.mps",
        real=torch.backends.mps,
        is_available=lambda: True,
        is_macos_or_newer=lambda major, minor: (major, minor) <= (14, 0),
        get_name=lambda: "hwoptim mock of an Apple GPU",
    )
    mock.patch(torch.backends, "mps", backends_mps)
    device = mock.device_module(
        "torch.mps",
        real=torch.mps,
        device_count=lambda: 1,
        current_allocated_memory=lambda: 0,
        driver_allocated_memory=lambda: 0,
    )
    mock.patch(torch, "mps", device)


@register_stand_in("npu")
def npu(mock: VendorMock) -> None:
    """An importable torch_npu whose import creates torch.npu and torch.version.cann,
    with torch_npu's own GradScaler at torch_npu.npu.amp.GradScaler."""
    scaler = mock.grad_scaler_class("torch_npu.npu.amp.GradScaler")
    amp = mock.namespace("torch_npu.npu.amp", GradScaler=scaler)
    device = mock.device_module("torch.npu", amp=amp)

    def imported(module: types.ModuleType) -> None:
        mock.patch(torch, "npu", device)
        mock.patch(torch.version, "cann", MOCK_VERSION)

    members = {"__version__": MOCK_VERSION, "npu": device}
    mock.vendor_module("torch_npu", members, on_import=imported)


#: the device type the generic stand-in reports as torch's current accelerator
GENERIC_DEVICE_TYPE = "privateuseone"


@register_stand_in("generic", backend=GENERIC_DEVICE_TYPE)
def generic(mock: VendorMock) -> None:
    """torch.accelerator reporting a PrivateUse1 device that no backend claims.

    Also on a torch without torch.accelerator (older than 2.6): the stand-in is then all
    there is, as it would be on a torch that has it.
    """
    accelerator = mock.device_module(
        "torch.accelerator",
        real=getattr(torch, "accelerator", None),
        current_accelerator=lambda check_available=False: torch.device(GENERIC_DEVICE_TYPE),
    )
    # torch.accelerator names two of the device-module functions differently.
    aliases = {"current_device_index": "current_device", "set_device_index": "set_device"}
    for alias, name in aliases.items():
        function = getattr(accelerator, name).__wrapped__
        setattr(accelerator, alias, mock.record(f"torch.accelerator.{alias}", function))
    mock.patch(torch, "accelerator", accelerator)
