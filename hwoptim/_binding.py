"""The model binding: what a wrapper learns from the model it trains.

The model arrives through ``optim_context`` or ``initialize_count_status``. From it the
binding decides, once per model, whether micro-batches skip the gradient sync and how
(DDP/FSDP ``no_sync``, FSDP2's flag, or the backend's own), checks that the optimizer's
parameters are where the model computes, and keeps the optimizer's flat parameter list.
A copy of a wrapper holds no model: the binding is dropped and learnt again.
"""

from __future__ import annotations

import operator
from contextlib import AbstractContextManager
from typing import Any, Callable

import torch
from torch import Tensor

from hwoptim import _extensions
from hwoptim._window import AccumulationWindow
from hwoptim.backends.base import has_gradient_sync

__all__ = ["MicroBatchContext", "ModelBinding"]

_GROUP_PARAMS = operator.itemgetter("params")

NoSync = Callable[[Any], AbstractContextManager[Any]]


class ModelBinding:
    """The bound model, its pending sync skip and the optimizer's flat parameter list."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        no_sync: NoSync,
        *,
        custom_no_sync: bool,
        device: torch.device | None,
        forward_context: Callable[[], AbstractContextManager[Any]] | None,
    ) -> None:
        self._optimizer = optimizer
        self._no_sync = no_sync
        self._custom_no_sync = custom_no_sync  # a backend with its own no_sync is always asked
        self._device = device  # where the parameters must be (None: where the model's are)
        #: a context the forward runs in besides the sync skip (autocast), made per micro-batch
        self.forward_context = forward_context
        self._unbind()

    def _unbind(self) -> None:
        #: the bound model and its class (None: none yet)
        self.model: Any = None
        self.model_type: type | None = None
        #: the sync skip entered by a forward, waiting for its backward (None: none)
        self.pending: AbstractContextManager[Any] | None = None
        self._skips_sync = False
        self._params: list[Tensor] = []
        self._n_groups = self._n_params = -1

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("model", "model_type", "pending", "_params"):
            del state[key]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._unbind()

    def is_new(self, model: Any) -> bool:
        """Whether ``model`` is not the bound one (fully_shard changes a class in place)."""
        return model is not self.model or type(model) is not self.model_type

    def bind(self, model: Any, acc: int) -> None:
        """Check and remember ``model``; a refused model is not remembered."""
        self._check_placement(model)
        self.model = model
        self.model_type = type(model)
        # decided once: skipping needs a window to skip in and a collective to skip
        self._skips_sync = acc > 1 and (self._custom_no_sync or has_gradient_sync(model))

    def enter(self, model: Any, window: AccumulationWindow) -> None:
        """Start a micro-batch's forward: skip the sync unless it ends a window."""
        if self.pending is not None:  # a forward whose backward never ran
            self.release()
        if self._skips_sync and not window.should_sync():
            context = self._no_sync(model)
            context.__enter__()
            self.pending = context

    def release(self) -> None:
        """End the pending sync skip (after the backward, or after an exception)."""
        context, self.pending = self.pending, None
        if context is not None:
            context.__exit__(None, None, None)

    def params(self) -> list[Tensor]:
        """All the optimizer's parameters, group after group.

        Rebuilt when the number of groups or parameters changes (add_param_group, a
        reload, a group's list extended in place); a parameter swapped in place is not seen.
        """
        groups = self._optimizer.param_groups
        n_params = sum(map(len, map(_GROUP_PARAMS, groups)))
        if n_params != self._n_params or len(groups) != self._n_groups:
            self._params = [p for group in groups for p in group["params"]]
            self._n_groups = len(groups)
            self._n_params = n_params
        return self._params

    def forget_params(self) -> None:
        """Rebuild the parameter list at its next use (the parameters may be re-grouped)."""
        self._n_groups = self._n_params = -1

    def _check_placement(self, model: Any) -> None:
        """The optimizer's parameters must be on the model's device type (docs/devices.md)."""
        if not isinstance(model, torch.nn.Module):
            return
        device = self._device
        if device is not None:
            allowed = {device.type}
        else:
            allowed = {p.device.type for p in model.parameters()}
            if len(allowed) != 1:  # no parameters, or a model spread over devices on purpose
                return
        misplaced = [p for p in self.params() if p.device.type not in allowed]
        if not misplaced:
            return
        first = misplaced[0]
        where = f"the wrapper's device {device}" if device is not None else f"the model's device ({allowed.pop()})"
        raise RuntimeError(
            f"{len(misplaced)} of the optimizer's parameters are not on {where} (the first: "
            f"shape {tuple(first.shape)} on {first.device}); move the model to the device "
            "before building the optimizer (model.to(device) may replace the parameters), e.g. "
            "device = hwoptim.get_backend('auto').device(); model.to(device), then build the "
            f"optimizer and the wrapper{_extensions.placement_advice()}"
        )


class MicroBatchContext:
    """What ``optim_context`` returns, one per micro-batch (a plain class: a fifth of a
    generator context's cost). ``enter(model)`` binds the model and skips the sync when due;
    ``inner`` (autocast) is entered after it and left before; an exception releases the
    skip, since no backward will end it."""

    __slots__ = ("_binding", "_enter", "_inner", "_model")

    def __init__(
        self, enter: Callable[[Any], None], model: Any, binding: ModelBinding,
        inner: AbstractContextManager[Any] | None,
    ) -> None:
        self._enter = enter
        self._model = model
        self._binding = binding
        self._inner = inner

    def __enter__(self) -> None:
        self._enter(self._model)
        if self._inner is not None:
            try:
                self._inner.__enter__()
            except BaseException:
                self._binding.release()
                raise

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        try:
            if self._inner is not None:
                self._inner.__exit__(exc_type, exc, traceback)
        finally:
            if exc_type is not None:
                self._binding.release()
