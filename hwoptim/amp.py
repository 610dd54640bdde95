"""AmpOptimWrapper: OptimWrapper plus autocast and loss scaling, on any backend.

The wrapper asks its Backend for autocast and for the grad scaler, and never looks at the
device type itself. A scaler is made only where it does something: fp16 with
``loss_scale="dynamic"``, or any explicit scale. bf16 and fp32 have fp32's exponent range,
so "dynamic" means no scaler there, and no per-step sync for it. The scaling itself is the
precision policy's (hwoptim._precision), which the update core calls; this class only
chooses the policy, the autocast and the backend's gradient-sync skip.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

from hwoptim._numbers import check_flag
from hwoptim._precision import GradScaling, LossScale, NoScaling, check_scaler_state, parse_loss_scale
from hwoptim.backends.base import Backend, dtype_name
from hwoptim.backends.registry import DeviceSpec, get_backend
from hwoptim.compile import CompileStep
from hwoptim.num_items import ItemsGroup
from hwoptim.wrapper import OptimWrapper

__all__ = ["AmpOptimWrapper", "LossScale", "check_scaler_state", "parse_loss_scale"]


class AmpOptimWrapper(OptimWrapper):
    """OptimWrapper with mixed precision: autocast in ``optim_context`` and loss scaling.

    Args:
        optimizer: the torch optimizer (also accepted by keyword, as mmengine configs pass it).
        device: "auto", a backend name ("cuda", "npu", "cuda:1"), a torch.device or a Backend.
        dtype: None (the device's default), "float16", "bfloat16", "float32", "float64" or a
            torch.dtype. A dtype the device cannot autocast to is a ValueError naming those
            it can.
        loss_scale: "dynamic" (a dynamic scaler for fp16, none otherwise), a number (a fixed
            scale), a dict of GradScaler arguments, or None (no scaling).
        use_fsdp: use the backend's sharded scaler (FSDP): the same scale and the same
            skipped steps on every rank.
        accumulative_counts, clip_grad, num_items_group, save_partial_grads, exact_skip: as
            for OptimWrapper (exact_skip acts where no scaler is on: a scaler skips for
            real). Gradients are unscaled before clipping; a step with inf/nan gradients is
            skipped and the scale backs off. Saved partial gradients are still multiplied by
            the loss scale, which is saved with them.
        compile_step: as for OptimWrapper. With a scaler, its ``unscale_`` and ``update``
            run outside the compiled function, and so does its ``step`` for a non-fused
            optimizer (torch decides that skip on the host); a fused optimizer is stepped
            inside it with the scaler's found_inf, with no host sync.

    If a step raises, the scaler is put back to the start of a step (its record of this
    optimizer is dropped; the scale is left as it was) and the window's gradients are dropped.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | None = None,
        device: DeviceSpec = "auto",
        dtype: str | torch.dtype | None = None,
        loss_scale: LossScale = "dynamic",
        use_fsdp: bool = False,
        accumulative_counts: int = 1,
        clip_grad: Mapping[str, Any] | None = None,
        *,
        num_items_group: ItemsGroup = "auto",
        save_partial_grads: bool = False,
        exact_skip: bool = False,
        compile_step: CompileStep = False,
    ) -> None:
        if optimizer is None:
            raise TypeError("AmpOptimWrapper needs an optimizer; pass one, e.g. AmpOptimWrapper(optimizer=opt)")
        check_flag(use_fsdp, "use_fsdp")
        backend = get_backend(device)
        cast_dtype = backend.resolve_dtype(dtype)
        scaler_kwargs, fixed_scale = parse_loss_scale(loss_scale, cast_dtype)

        def precision(checked: torch.optim.Optimizer) -> NoScaling:
            if scaler_kwargs is None:
                return NoScaling(checked, dtype_name(cast_dtype))
            scaler = backend.grad_scaler(sharded=use_fsdp, **scaler_kwargs)
            return GradScaling(checked, scaler, fixed_scale)

        self.backend = backend
        self.device: torch.device = backend.device()
        self.cast_dtype: torch.dtype = cast_dtype
        self._compose(
            optimizer, accumulative_counts, clip_grad, num_items_group=num_items_group,
            save_partial_grads=save_partial_grads, exact_skip=exact_skip, compile_step=compile_step,
            precision=precision, no_sync=backend.no_sync,
            custom_no_sync=type(backend).no_sync is not Backend.no_sync, device=self.device,
            forward_context=functools.partial(backend.autocast, cast_dtype),
        )

    def _repr_extra(self) -> list[str]:
        return [
            f"  device={self.device!s} ({self.backend.name}),",
            f"  dtype={dtype_name(self.cast_dtype)},",
            f"  loss_scaler={self._precision.describe()},",
        ]
