"""hwoptim.mmengine's logging: the wrappers' values in mmengine's MessageHub without a host sync.

The device-side history buffer, the optimizer step hook that fills it (``join``/``leave``),
hwoptim's warnings in mmengine's logger, ``message_hub``, and the warning for a Runner that
holds hwoptim's wrappers in mmengine's own OptimWrapperDict. Only hwoptim.mmengine imports
this module, and it does the subscribing (docs/architecture.md).
"""

from __future__ import annotations

import logging
import sys
import weakref
from collections.abc import Iterable
from typing import Any, cast

import numpy as np
import torch
from mmengine.logging import HistoryBuffer, MessageHub, MMLogger, print_log
from mmengine.optim import OptimWrapperDict as _MMOptimWrapperDict
from torch import Tensor

from hwoptim import _warn
from hwoptim.wrapper import OptimWrapper
from hwoptim.wrapper_dict import OptimWrapperDict

# -- logging without host syncs --------------------------------------------------------------

#: values queued on the device before they are folded into one tensor (no sync either way)
_FOLD_EVERY = 256
#: above this many param groups only the named ones are logged as train/grad_norm/<group>
MAX_LOGGED_GROUPS = 32


class DeviceHistoryBuffer(HistoryBuffer):  # type: ignore[misc]
    """A HistoryBuffer that takes device tensors and reads them only when it is read.

    ``push(tensor)`` queues a scalar tensor without reading it. The first read of the history
    (``mean``, ``current``, ``statistics``, ``data``, custom statistics: they all go through
    ``_log_history``) moves every queued value to the host in one transfer. A buffer pickles
    and deep-copies as a plain HistoryBuffer, so MessageHub checkpoints load without hwoptim.
    """

    def __init__(self, log_history: Iterable[float] = (), count_history: Iterable[float] = (),
                 max_length: int = 1000000) -> None:
        self._queued: list[Tensor] = []
        self._folded: list[Tensor] = []
        super().__init__(list(log_history), list(count_history), max_length)

    @classmethod
    def from_buffer(cls, buffer: HistoryBuffer) -> DeviceHistoryBuffer:
        """A DeviceHistoryBuffer holding ``buffer``'s history (a resumed MessageHub's)."""
        logs, counts = buffer.data
        return cls(logs.tolist(), counts.tolist(), buffer.max_length)

    def push(self, value: Tensor) -> None:
        """Queue one value (a one-element tensor on any device; not read now)."""
        queued = self._queued
        queued.append(value)
        if len(queued) >= _FOLD_EVERY:  # bound the number of tensors kept alive
            self._fold()

    @property
    def pending(self) -> int:
        """How many pushed values have not been moved to the host yet."""
        return len(self._queued) + sum(t.numel() for t in self._folded)

    def _fold(self) -> None:
        queued, self._queued = self._queued, []
        try:  # one wrapper's values: same shape, device and dtype
            folded = torch.stack(queued)
        except RuntimeError:
            device = queued[-1].device
            folded = torch.stack([t.detach().reshape(()).to(device, torch.float32) for t in queued])
        self._folded.append(folded.detach().reshape(-1).float())
        total = sum(t.numel() for t in self._folded)
        while len(self._folded) > 1 and total - self._folded[0].numel() >= self.max_length:
            total -= self._folded.pop(0).numel()  # older than the buffer keeps anyway

    def _materialize(self) -> None:
        """Move the queued values to the host: one transfer, the only sync this class makes."""
        if self._queued:
            self._fold()
        if not self._folded:
            return
        chunks, self._folded = self._folded, []
        device = chunks[-1].device
        values = torch.cat([c.to(device) for c in chunks]).tolist()
        logs = np.append(self.__dict__["_logs"], values)
        counts = np.append(self.__dict__["_counts"], np.ones(len(values)))
        self.__dict__["_logs"] = logs[-self.max_length :]
        self.__dict__["_counts"] = counts[-self.max_length :]

    # HistoryBuffer and every statistics method read these two attributes: reading either
    # brings the queued values in first.
    @property
    def _log_history(self) -> np.ndarray:
        self._materialize()
        return cast(np.ndarray, self.__dict__["_logs"])

    @_log_history.setter
    def _log_history(self, value: np.ndarray) -> None:
        self.__dict__["_logs"] = value

    @property
    def _count_history(self) -> np.ndarray:
        self._materialize()
        return cast(np.ndarray, self.__dict__["_counts"])

    @_count_history.setter
    def _count_history(self, value: np.ndarray) -> None:
        self.__dict__["_counts"] = value

    def __reduce__(self) -> tuple[Any, ...]:
        logs, counts = self._log_history, self._count_history
        return (HistoryBuffer, (logs.tolist(), counts.tolist(), self.max_length))


def _buffer(hub: Any, key: str) -> DeviceHistoryBuffer:
    """The hub's DeviceHistoryBuffer for ``key``, made (or converted, after a resume) once."""
    scalars = hub.log_scalars  # the hub's own dict; mmengine assigns buffers into it too
    buffer = scalars.get(key)
    if type(buffer) is DeviceHistoryBuffer:
        return buffer
    if buffer is None:
        # Through update_scalar once, so that the key is among the hub's resumed keys and its
        # history is saved in checkpoints, as mmengine's own train/grad_norm is.
        hub.update_scalar(key, 0.0)
        converted = DeviceHistoryBuffer(max_length=hub.log_scalars[key].max_length)
    else:
        converted = DeviceHistoryBuffer.from_buffer(buffer)
    scalars[key] = converted
    return converted


class _LogAfterStep:
    """An optimizer step post-hook: queue the wrapper's grad norm and loss scale for logging.

    Runs after each optimizer step (an update the loss scaler skips without stepping the
    optimizer is not logged). Holds the wrapper weakly; the optimizer holds this hook.
    """

    def __init__(self, wrapper: OptimWrapper) -> None:
        self._wrapper = weakref.ref(wrapper)
        self.grad_norm_key = "train/grad_norm"
        self.loss_scale_key = "train/loss_scale"
        self.item_loss_key = "train/item_loss"
        self.handle: Any = None  # the optimizer's handle, to remove this hook
        self.stepped = False  # whether the optimizer has stepped since the wrapper joined
        # the per-group keys, made once per set of group names: (names, {group: key})
        self._group_keys: tuple[tuple[Any, ...], dict[Any, str]] = ((), {})

    def name(self, name: str) -> None:
        """Log under ``train/<name>.grad_norm`` (a member of an OptimWrapperDict)."""
        self.grad_norm_key = f"train/{name}.grad_norm"
        self.loss_scale_key = f"train/{name}.loss_scale"
        self.item_loss_key = f"train/{name}.item_loss"
        self._group_keys = ((), {})

    def group_keys(self, names: tuple[Any, ...]) -> dict[Any, str]:
        """``{group: "train/grad_norm/<group>"}`` of the groups logged: none for one group
        (that is train/grad_norm), only the named ones past MAX_LOGGED_GROUPS."""
        known, keys = self._group_keys
        if names != known:
            logged = names if len(names) <= MAX_LOGGED_GROUPS else [n for n in names if isinstance(n, str)]
            keys = {} if len(names) < 2 else {n: f"{self.grad_norm_key}/{n}" for n in logged}
            self._group_keys = (names, keys)
        return keys

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        wrapper = self._wrapper()
        if wrapper is None:
            return
        # once per wrapper, a look at the Runner that drives it; not inside a compiled
        # update (compile_step): dynamo cannot trace the walk up the stack
        if not self.stepped and not torch.compiler.is_compiling():
            self.stepped = True
            _check_the_runners_dict(wrapper)
        norm = wrapper.last_grad_norm
        scale = wrapper.loss_scale
        # None unless this update's window gave num_items. The attribute, not the property:
        # reading last_loss is the user's "I log now", which checks for empty windows.
        item_loss = wrapper._last_loss
        if norm is None and scale is None and item_loss is None:
            return
        self._queue(wrapper, norm, scale, item_loss)

    # run eagerly inside a compiled update too: the queues change length at every push, which
    # traced code would guard on and recompile for (nothing in here is worth compiling)
    @torch.compiler.disable  # type: ignore[untyped-decorator]
    def _queue(self, wrapper: OptimWrapper, norm: Tensor | None, scale: Tensor | None,
               item_loss: Tensor | None) -> None:
        """Push this update's values into the current MessageHub's device-side buffers."""
        hub = MessageHub.get_current_instance()
        if item_loss is not None:  # a new tensor per update: nothing overwrites it
            _buffer(hub, self.item_loss_key).push(item_loss)
        if norm is not None:
            _buffer(hub, self.grad_norm_key).push(norm)
            groups = wrapper.last_grad_norms
            if len(groups) > 1:
                for group, key in self.group_keys(tuple(groups)).items():
                    _buffer(hub, key).push(groups[group])
        if scale is not None:
            # the scaler updates this tensor in place after the step: keep this step's value
            _buffer(hub, self.loss_scale_key).push(scale.clone())


#: the joined wrappers' hooks (kept across a re-import, so that no wrapper gets two)
_hooks: weakref.WeakKeyDictionary[OptimWrapper, _LogAfterStep] = globals().get(
    "_hooks", weakref.WeakKeyDictionary()
)


def join(wrapper: OptimWrapper) -> None:
    """Make ``wrapper`` log to mmengine's MessageHub (its class already passes isinstance).

    Called by the wrappers' constructors when mmengine is imported; calling it again does
    nothing. An OptimWrapperDict names its members' keys after them.
    """
    if isinstance(wrapper, OptimWrapperDict):
        for name, member in wrapper.items():
            join(member)
            _hooks[member].name(name)
        return
    if wrapper in _hooks:
        return
    hook = _LogAfterStep(wrapper)
    hook.handle = wrapper.optimizer.register_step_post_hook(hook)
    _hooks[wrapper] = hook


def leave(wrapper: OptimWrapper) -> None:
    """Stop ``wrapper`` logging to mmengine's MessageHub (it still passes isinstance).

    For a loop of your own in a process that imports mmengine for something else, where
    nothing reads the hub: each update then costs nothing for logging. Does nothing for a
    wrapper that is not joined.
    """
    if isinstance(wrapper, OptimWrapperDict):
        for member in wrapper.values():
            leave(member)
        return
    hook = _hooks.pop(wrapper, None)
    if hook is not None:
        hook.handle.remove()


# -- what mmengine code reads of a wrapper: its log, message_hub, the Runner's dict ----------

def _log_warning(message: str, category: type[Warning]) -> None:
    """hwoptim's warnings in mmengine's current logger too, where mmengine's wrapper logs its
    own (print_log to the "current" logger): under a Runner they reach the run's log file.

    Nothing is logged before a logger exists (no Runner): the Python warning is all there
    is, and mmengine would make a console logger just for this line.
    """
    if MMLogger._instance_dict:  # ManagerMixin's own registry of the made instances
        print_log(f"hwoptim: {message}", logger="current", level=logging.WARNING)




def _message_hub(wrapper: OptimWrapper) -> Any:
    """mmengine's current MessageHub: the one this wrapper's values go to at its next update.

    mmengine's wrapper keeps the hub that was current when it was built; hwoptim writes
    to the hub that is current at each update, and this attribute says which one that is.
    """
    return MessageHub.get_current_instance()


def _no_message_hub(wrappers: OptimWrapperDict) -> Any:
    """mmengine's OptimWrapperDict has no message_hub either: the members have one each."""
    raise AttributeError("an OptimWrapperDict has no message_hub; use wrappers[name].message_hub")



#: the mmengine OptimWrapperDicts already warned about (a warning once per Runner's dict)
_warned_dicts: weakref.WeakSet[Any] = globals().get("_warned_dicts", weakref.WeakSet())


def _driving_runner() -> Any:
    """The Runner whose train loop is on the call stack (None outside one)."""
    runner_module = sys.modules.get("mmengine.runner")
    if runner_module is None:  # no Runner can be running
        return None
    frame = sys._getframe(1)
    while frame is not None:
        loop = frame.f_locals.get("self")
        if isinstance(loop, runner_module.BaseLoop):
            return loop.runner
        frame = frame.f_back  # type: ignore[assignment]
    return None


def _check_the_runners_dict(wrapper: OptimWrapper) -> None:
    """Warn when ``wrapper`` is in mmengine's own OptimWrapperDict under a Runner.

    Given ``optim_wrapper=dict(name=wrapper, ...)`` of built wrappers, mmengine's Runner
    wraps them in its own OptimWrapperDict (its runner module holds mmengine's class), which
    passes neither the training length nor the names on: hwoptim's dict does. Called at a
    wrapper's first optimizer step (the stack is walked once per wrapper).
    """
    runner = _driving_runner()
    held = getattr(runner, "optim_wrapper", None)
    if held is None or isinstance(held, OptimWrapperDict) or not isinstance(held, _MMOptimWrapperDict):
        return
    if held in _warned_dicts or not any(member is wrapper for member in held.values()):
        return
    _warned_dicts.add(held)
    names = [name for name, member in held.items() if isinstance(member, OptimWrapper)]
    listed = ", ".join(f"{name}=..." for name in names)
    _warn.warn(
        f"mmengine's Runner holds hwoptim's wrappers {names} in mmengine's own "
        "OptimWrapperDict (it builds one when optim_wrapper is a dict of built wrappers): "
        "its initialize_count_status does nothing, so the last partial accumulation "
        "window of training will not step, and every member logs under the same "
        "train/grad_norm and train/loss_scale keys. Give the Runner hwoptim's dict: "
        f"optim_wrapper=hwoptim.OptimWrapperDict({listed})"
    )
