"""The bridge to mmengine's Runner: hwoptim's wrappers wherever mmengine expects its own.

An mmengine config takes hwoptim in one line, in either form::

    optim_wrapper = dict(type=hwoptim.AmpOptimWrapper, dtype="bfloat16", ...)  # Python config

    custom_imports = dict(imports=["hwoptim.mmengine"])                         # any config
    optim_wrapper = dict(type="hwoptim.AmpOptimWrapper", dtype="bfloat16", ...)

Importing this module registers ``OptimWrapper``, ``AmpOptimWrapper`` and ``OptimWrapperDict``
in mmengine's ``OPTIM_WRAPPERS`` registry under the scope "hwoptim" (mmengine's ``scope.Name``
convention), and ``OptimWrapperConstructor`` in ``OPTIM_WRAPPER_CONSTRUCTORS``: it builds
through :func:`hwoptim.build_optim_wrapper`, so a config can hold one wrapper config per
submodule (GANs) and name optimizers by ``"module:Class"``, which mmengine's default
constructor cannot.

Every hwoptim wrapper built while mmengine is imported joins it (:func:`join`, which this
module subscribes to hwoptim's registration point, hwoptim._extensions; the core imports this
module only once a wrapper is made while mmengine is imported, so ``import hwoptim`` never
imports mmengine and a plain loop pays nothing):

- mmengine's Runner, strategies, schedulers and hooks check ``isinstance(w, OptimWrapper)``
  (or ``OptimWrapperDict``, ``BaseOptimWrapper``). Those are ABCs, so hwoptim's classes are
  registered as their virtual subclasses (``ABCMeta.register``, public API): the checks pass
  without hwoptim subclassing mmengine and without patching anything in it.
- ``train/grad_norm`` (with clip_grad) and ``train/loss_scale`` (with a loss scaler) reach
  the current ``MessageHub`` after every update without a host sync: an optimizer step hook
  (torch's public ``register_step_post_hook``) queues the device tensors in a
  :class:`DeviceHistoryBuffer`, which reads all queued values in one transfer when the log
  processor asks, at the logging interval. In an OptimWrapperDict the keys are
  ``train/<name>.grad_norm`` and ``train/<name>.loss_scale``, as ``get_lr()`` names them.
  With several param groups each group's norm (``wrapper.last_grad_norms``) goes there too,
  as ``train/grad_norm/<group>`` (``train/<name>.grad_norm/<group>`` in a dict); past
  ``MAX_LOGGED_GROUPS`` groups (paramwise_cfg's group per parameter), only the groups
  with a ``"name"``.
  :func:`leave` stops this for a wrapper whose process imports mmengine for other reasons.
  With ``num_items`` the window's loss per item (``wrapper.last_loss``) goes there too,
  as ``train/item_loss``.
- hwoptim's warnings also become records of mmengine's current logger (once one exists),
  as mmengine's wrapper logs its own, so a Runner's log file holds them; ``message_hub``
  is the current MessageHub; and a Runner that wraps hwoptim's wrappers in mmengine's own
  OptimWrapperDict (given a dict of built wrappers) is warned about at the first update.
- Item-weighted accumulation (docs/variable-size-batches.md): a model that mixes in
  :class:`ItemWeightedTrainStep` returns its losses as sums together with a ``num_items``
  entry, and its ``train_step`` passes the count to ``update_params``; under DDP,
  ``model_wrapper_cfg=dict(type="hwoptim.ItemWeightedDistributedDataParallel")`` does
  the same in the wrapper's ``train_step``.
- Safe resuming (docs/migrating-from-mmengine.md): mmengine's checkpoint loaders run inside
  :func:`safe_loading`, so the Runner resumes with torch's ``weights_only`` unpickler
  (torch >= 2.6's default) and no ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``: its MessageHub's
  HistoryBuffers and numpy values are allowed through checked stand-ins, only while
  mmengine loads a checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import pickle
import sys
import weakref
from abc import ABCMeta
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NoReturn, cast

import numpy as np
import torch
from mmengine.logging import HistoryBuffer, MessageHub, MMLogger, print_log
from mmengine.model import MMDistributedDataParallel as _MMDistributedDataParallel
from mmengine.optim import OptimWrapper as _MMOptimWrapper
from mmengine.optim import OptimWrapperDict as _MMOptimWrapperDict
from mmengine.registry import MODEL_WRAPPERS as _MM_MODEL_WRAPPERS
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS as _MM_CONSTRUCTORS
from mmengine.registry import OPTIM_WRAPPERS as _MM_OPTIM_WRAPPERS
from mmengine.registry import OPTIMIZERS as _MM_OPTIMIZERS
from mmengine.registry import Registry
from mmengine.runner.checkpoint import CheckpointLoader as _MMCheckpointLoader
from torch import Tensor, nn

from hwoptim import _extensions, _warn
from hwoptim.amp import AmpOptimWrapper
from hwoptim.backends import get_backend
from hwoptim.build import build_optim_wrapper, resolve_optimizer_type
from hwoptim.wrapper import OptimWrapper
from hwoptim.wrapper_dict import OptimWrapperDict

__all__ = [
    "MAX_LOGGED_GROUPS",
    "MODEL_WRAPPERS",
    "NUM_ITEMS",
    "OPTIM_WRAPPERS",
    "OPTIM_WRAPPER_CONSTRUCTORS",
    "DeviceHistoryBuffer",
    "ItemWeightedDistributedDataParallel",
    "ItemWeightedTrainStep",
    "OptimWrapperConstructor",
    "join",
    "leave",
    "safe_globals",
    "safe_loading",
]

SCOPE = "hwoptim"

# -- isinstance: virtual subclasses of mmengine's ABCs ----------------------------------------

# mmengine's BaseOptimWrapper has ABCMeta as its metaclass; registering with OptimWrapper also
# makes hwoptim's classes virtual subclasses of BaseOptimWrapper (ABCMeta looks through the
# registrations of subclasses). OptimWrapperDict is registered on its own: in mmengine it is
# an OptimWrapper subclass, and the Runner tells the two apart with isinstance.
if not isinstance(_MMOptimWrapper, ABCMeta):  # pragma: no cover - mmengine 0.10 has it
    raise ImportError(
        "mmengine.optim.OptimWrapper is not an ABC in this mmengine version, so hwoptim's "
        "wrappers cannot pass its isinstance checks; use mmengine 0.10"
    )
_MMOptimWrapper.register(OptimWrapper)
_MMOptimWrapperDict.register(OptimWrapperDict)


# -- the registries of the scope "hwoptim" ----------------------------------------------------

def _scope_registry(parent: Any, name: str) -> Any:
    """``parent``'s child registry of the scope "hwoptim" (the existing one on a re-import)."""
    existing = parent.children.get(SCOPE)
    return existing if existing is not None else Registry(name, parent=parent, scope=SCOPE)


#: mmengine's OPTIM_WRAPPERS for the scope "hwoptim": ``type="hwoptim.AmpOptimWrapper"``
OPTIM_WRAPPERS = _scope_registry(_MM_OPTIM_WRAPPERS, "optim_wrapper")
#: mmengine's OPTIM_WRAPPER_CONSTRUCTORS for the scope "hwoptim"
OPTIM_WRAPPER_CONSTRUCTORS = _scope_registry(_MM_CONSTRUCTORS, "optimizer wrapper constructor")
#: mmengine's MODEL_WRAPPERS for the scope "hwoptim": "hwoptim.ItemWeightedDistributedDataParallel"
MODEL_WRAPPERS = _scope_registry(_MM_MODEL_WRAPPERS, "model_wrapper")
for _cls in (OptimWrapper, AmpOptimWrapper, OptimWrapperDict):
    OPTIM_WRAPPERS.register_module(module=_cls, force=True)


@OPTIM_WRAPPER_CONSTRUCTORS.register_module(force=True)
class OptimWrapperConstructor:
    """``constructor="hwoptim.OptimWrapperConstructor"``: build with hwoptim.build_optim_wrapper.

    What it adds to mmengine's DefaultOptimWrapperConstructor:

    - one wrapper config per submodule name builds an OptimWrapperDict (GANs), where
      mmengine needs a constructor of your own (``type="hwoptim.OptimWrapperDict"`` may say
      so explicitly)::

          optim_wrapper = dict(constructor="hwoptim.OptimWrapperConstructor",
                               generator=dict(type="AmpOptimWrapper", optimizer=...),
                               discriminator=dict(optimizer=...))

    - optimizer types as torch.optim names, classes, ``"package.module:Class"``, or any name
      in mmengine's OPTIMIZERS registry; wrapper types as "OptimWrapper", "AmpOptimWrapper",
      their scoped names ("hwoptim.AmpOptimWrapper"), classes or ``"module:Class"``;
    - every key checked when the wrapper is built, the config never modified;
    - the model placed on the device of the config's AmpOptimWrapper(s) before the
      optimizer is built, when it is elsewhere. The Runner puts the model on
      ``mmengine.device.get_device()``, which is "cpu" for every device mmengine does not
      know (XPU, HPU, plugin devices, hwoptim.testing.emulated), and on those devices
      ``model.to()`` replaces the parameters: placing it later would leave the optimizer
      with stale CPU copies. On CUDA, NPU, MLU and MPS the Runner already put it there and
      nothing moves.
    """

    def __init__(self, optim_wrapper_cfg: Mapping[str, Any], paramwise_cfg: Mapping[str, Any] | None = None):
        if not isinstance(optim_wrapper_cfg, Mapping):
            raise TypeError(f"optim_wrapper_cfg must be a dict; got {type(optim_wrapper_cfg).__name__}")
        cfg = dict(optim_wrapper_cfg)
        if paramwise_cfg is not None:
            if "optimizer" not in cfg and "type" not in cfg:
                raise ValueError(
                    "paramwise_cfg applies to one wrapper; with one config per submodule, put a "
                    "paramwise_cfg inside each submodule's config"
                )
            cfg["paramwise_cfg"] = paramwise_cfg
        self.cfg = _hwoptim_cfg(cfg)

    def __call__(self, model: nn.Module) -> OptimWrapper:
        device = _amp_device(self.cfg)
        if device is not None and not isinstance(model, nn.parallel.DistributedDataParallel):
            # by type, as the wrapper checks placement (mps and mps:0 are one place)
            misplaced = next((p for p in model.parameters() if p.device.type != device.type), None)
            if misplaced is not None:
                print_log(f"hwoptim: moving the model from {misplaced.device} to the "
                          f"AmpOptimWrapper's device {device} before building the optimizer",
                          logger="current")
                # a torch.device, not a str: BaseModel.to rewrites strings naming "npu"
                model.to(device)
        return build_optim_wrapper(model, self.cfg)


def _amp_device(cfg: Mapping[str, Any]) -> torch.device | None:
    """The one device of the AmpOptimWrapper configs in ``cfg`` (None: none, or several)."""
    if "optimizer" in cfg or "type" in cfg:
        members: Iterable[Any] = (cfg,)
    else:
        members = cfg.values()
    devices = {
        get_backend(member.get("device", "auto")).device()
        for member in members
        if isinstance(member, Mapping) and _is_amp(member.get("type"))
    }
    return devices.pop() if len(devices) == 1 else None


def _is_amp(wrapper_type: Any) -> bool:
    if isinstance(wrapper_type, type):
        return issubclass(wrapper_type, AmpOptimWrapper)
    return bool(wrapper_type == "AmpOptimWrapper")


def _hwoptim_cfg(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` in hwoptim.build_optim_wrapper's terms: scoped wrapper names unscoped, and
    optimizer names that only mmengine's OPTIMIZERS registry knows resolved to classes.
    ``type="hwoptim.OptimWrapperDict"`` (or the class) says the other keys are the names."""
    out = dict(cfg)
    wrapper_type = out.get("type")
    if isinstance(wrapper_type, str) and wrapper_type.startswith(SCOPE + "."):
        wrapper_type = out["type"] = wrapper_type[len(SCOPE) + 1 :]
    if wrapper_type in ("OptimWrapperDict", OptimWrapperDict):
        del out["type"]
        if "optimizer" in out:
            raise ValueError(
                "an OptimWrapperDict config holds one wrapper config per submodule name, "
                "not an 'optimizer'; e.g. dict(type='hwoptim.OptimWrapperDict', "
                "generator=dict(optimizer=...), discriminator=dict(optimizer=...))"
            )
    if "optimizer" not in out and "type" not in out:  # one config per submodule
        return {name: _hwoptim_cfg(sub) if isinstance(sub, Mapping) else sub for name, sub in out.items()}
    optimizer = out.get("optimizer")
    if isinstance(optimizer, Mapping) and isinstance(optimizer.get("type"), str):
        out["optimizer"] = dict(optimizer, type=_optimizer_type(optimizer["type"]))
    return out


def _optimizer_type(name: str) -> Any:
    """A torch.optim name or "module:Class" as it is; else mmengine's OPTIMIZERS entry."""
    try:
        resolve_optimizer_type(name)
        return name
    except ValueError:
        found = _MM_OPTIMIZERS.get(name)
        if found is None:
            raise
        return found


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


def _placement_advice() -> str:
    """The misplaced-parameters error's advice under mmengine's Runner, which moves the model."""
    if "mmengine.runner" not in sys.modules:
        return ""
    return (
        "; under mmengine's Runner, which puts the model on mmengine.device.get_device() (the "
        "CPU on devices mmengine does not know), add constructor='hwoptim.OptimWrapperConstructor' "
        "to the optim_wrapper config: it places the model on the wrapper's device first"
    )


_extensions.subscribe(__name__, on_new_wrapper=join, placement_advice=_placement_advice)


# -- what mmengine code reads of a wrapper: its log, message_hub, the Runner's dict ----------

def _log_warning(message: str, category: type[Warning]) -> None:
    """hwoptim's warnings in mmengine's current logger too, where mmengine's wrapper logs its
    own (print_log to the "current" logger): under a Runner they reach the run's log file.

    Nothing is logged before a logger exists (no Runner): the Python warning is all there
    is, and mmengine would make a console logger just for this line.
    """
    if MMLogger._instance_dict:  # ManagerMixin's own registry of the made instances
        print_log(f"hwoptim: {message}", logger="current", level=logging.WARNING)


_warn.subscribe(__name__, _log_warning)


def _message_hub(wrapper: OptimWrapper) -> Any:
    """mmengine's current MessageHub: the one this wrapper's values go to at its next update.

    mmengine's wrapper keeps the hub that was current when it was built; hwoptim writes
    to the hub that is current at each update, and this attribute says which one that is.
    """
    return MessageHub.get_current_instance()


def _no_message_hub(wrappers: OptimWrapperDict) -> Any:
    """mmengine's OptimWrapperDict has no message_hub either: the members have one each."""
    raise AttributeError("an OptimWrapperDict has no message_hub; use wrappers[name].message_hub")


#: mmengine's OptimWrapper.message_hub, on hwoptim's classes while mmengine is imported
OptimWrapper.message_hub = property(_message_hub)  # type: ignore[attr-defined]
OptimWrapperDict.message_hub = property(_no_message_hub)  # type: ignore[attr-defined]

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


# -- item-weighted accumulation: num_items from the model's losses ---------------------------

#: the entry of a model's losses dict that holds the micro-batch's item count
NUM_ITEMS = "num_items"


class ItemWeightedTrainStep:
    """Mix into an mmengine ``BaseModel`` whose losses are sums over items: ``train_step``
    passes the item count to ``update_params(loss, num_items=...)``.

    The model's ``loss`` mode returns its losses summed over the micro-batch's items, and
    the count under ``"num_items"`` (an int or an integer tensor, left on the device)::

        class LM(hwoptim.mmengine.ItemWeightedTrainStep, BaseModel):
            def forward(self, tokens, labels, mode="tensor"):
                ...
                return dict(loss=F.cross_entropy(logits, labels, ignore_index=-100,
                                                 reduction="sum"),
                            num_items=(labels != -100).sum())

    ``train_step`` is BaseModel's, except that ``num_items`` is taken out of the dict
    before ``parse_losses`` sums the keys containing "loss" (so it is neither summed nor
    logged), and handed to the wrapper, which divides each window's gradients by its item
    count over every data-parallel rank. Under DDP use
    :class:`ItemWeightedDistributedDataParallel`: mmengine's own DDP wrapper runs a
    ``train_step`` of its own, which ``parse_losses`` here refuses with that advice.
    """

    def train_step(self, data: Any, optim_wrapper: Any) -> dict[str, Tensor]:
        """BaseModel.train_step with the item count passed to ``update_params``."""
        model: Any = self
        with optim_wrapper.optim_context(model):
            data = model.data_preprocessor(data, True)
            losses = model._run_forward(data, mode="loss")
        return _update_with_items(model, losses, optim_wrapper)[1]

    def parse_losses(self, losses: Mapping[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """BaseModel.parse_losses, refusing a ``num_items`` that no train_step took out."""
        if NUM_ITEMS in losses:
            raise ValueError(
                f"the losses hold {NUM_ITEMS!r}, but the train_step that called parse_losses "
                "does not pass it on: it is not ItemWeightedTrainStep's. Under DDP, mmengine's "
                "MMDistributedDataParallel runs its own train_step; use model_wrapper_cfg="
                "dict(type='hwoptim.ItemWeightedDistributedDataParallel') (FlexibleRunner: "
                "strategy=dict(type='DDPStrategy', model_wrapper=dict(type=...)))"
            )
        return cast(tuple[Tensor, dict[str, Tensor]], super().parse_losses(losses))  # type: ignore[misc]


def _update_with_items(
    model: Any, losses: Mapping[str, Any], optim_wrapper: Any
) -> tuple[Tensor, dict[str, Tensor]]:
    """Parse ``losses`` without its item count, and update with it; the parsed losses."""
    if NUM_ITEMS not in losses:
        raise ValueError(
            f"an ItemWeightedTrainStep model's losses must hold {NUM_ITEMS!r}, the number of "
            "items its summed losses cover (e.g. dict(loss=..., num_items=(labels != -100).sum()));"
            f" got the keys {sorted(losses)}"
        )
    losses = dict(losses)
    num_items = losses.pop(NUM_ITEMS)
    parsed, log_vars = model.parse_losses(losses)
    optim_wrapper.update_params(parsed, num_items=num_items)
    return parsed, log_vars


@MODEL_WRAPPERS.register_module(force=True)
class ItemWeightedDistributedDataParallel(_MMDistributedDataParallel):  # type: ignore[misc]
    """mmengine's MMDistributedDataParallel whose ``train_step`` passes the module's
    ``num_items`` to ``update_params`` (see :class:`ItemWeightedTrainStep`)::

        model_wrapper_cfg = dict(type="hwoptim.ItemWeightedDistributedDataParallel")

    The item counts are summed over the DDP process group at each update.
    """

    def train_step(self, data: Any, optim_wrapper: Any) -> dict[str, Tensor]:
        with optim_wrapper.optim_context(self):
            data = self.module.data_preprocessor(data, training=True)
            losses = self._run_forward(data, mode="loss")
        parsed, log_vars = _update_with_items(self.module, losses, optim_wrapper)
        if self.detect_anomalous_params:
            from mmengine.model.utils import detect_anomalous_params

            detect_anomalous_params(parsed, model=self)
        return log_vars


# -- safe loading: resuming with torch's weights_only unpickler -------------------------------
#
# mmengine 0.10 loads checkpoints with torch.load's default, weights_only=True since torch 2.6,
# and its own checkpoints hold more than that unpickler takes: the MessageHub's HistoryBuffers
# (numpy arrays inside, and HistoryBuffer's statistics methods, which pickle as
# getattr(HistoryBuffer, "mean")) and numpy scalars in its runtime info (the "eta"). hwoptim's
# own state dicts need nothing (tests/test_mmengine_safe_load.py). While mmengine loads a
# checkpoint, the globals below are allowed, and only these; see docs/migrating-from-mmengine.md.

#: the statistics methods HistoryBuffer defines itself and pickles by name
_BUFFER_STATISTICS = ("min", "max", "current", "mean")
#: what a HistoryBuffer's pickled state holds (mmengine's __getstate__: its __dict__)
_BUFFER_STATE = frozenset({"max_length", "_log_history", "_count_history"})
#: torch >= 2.6: weights_only is torch.load's default, and allow lists take (global, name)
_WEIGHTS_ONLY_DEFAULT = torch.torch_version.TorchVersion(torch.__version__) >= "2.6"


def _refuse(message: str) -> NoReturn:
    raise pickle.UnpicklingError(f"hwoptim.mmengine refused this checkpoint: {message}")


def _check_history(values: Any, name: str) -> int:
    """The length of a HistoryBuffer's saved history: a 1-d array or list of real numbers."""
    if isinstance(values, np.ndarray):
        if values.ndim != 1 or values.dtype.kind not in "biuf":
            _refuse(f"a HistoryBuffer's {name} must be a 1-d numeric array; got {values.dtype} "
                    f"of shape {values.shape}")
        return len(values)
    if not isinstance(values, (list, tuple)):
        _refuse(f"a HistoryBuffer's {name} must be an array or a list; got {type(values).__name__}")
    bad = next((v for v in values if not isinstance(v, (int, float, np.integer, np.floating))), None)
    if bad is not None:
        _refuse(f"a HistoryBuffer's {name} must hold numbers; got a {type(bad).__name__}")
    return len(values)


def _check_buffer(logs: Any, counts: Any, max_length: Any) -> None:
    if _check_history(logs, "log history") != _check_history(counts, "count history"):
        _refuse("a HistoryBuffer's log and count histories differ in length")
    if type(max_length) is not int or max_length < 1:
        _refuse(f"a HistoryBuffer's max_length must be a positive int; got {max_length!r}")


class _CheckedHistoryBuffer(HistoryBuffer):  # type: ignore[misc]
    """HistoryBuffer's stand-in while a checkpoint loads: checks what the checkpoint gives,
    then becomes a plain HistoryBuffer (its ``__class__`` set back), so that nothing of it
    stays behind. It takes both pickled forms: mmengine's (``__new__``, then the instance
    dict through ``__setstate__``) and DeviceHistoryBuffer's (a call with lists)."""

    def __new__(cls, *args: Any) -> _CheckedHistoryBuffer:
        made = cast(_CheckedHistoryBuffer, super().__new__(cls))
        _unfinished.add(made)  # until its state is checked; see safe_loading
        return made

    def __init__(self, *args: Any) -> None:
        if len(args) > 3:
            _refuse(f"HistoryBuffer takes at most 3 arguments; the checkpoint gives {len(args)}")
        log_history, count_history, max_length = args + ((), (), 1000000)[len(args):]
        _check_buffer(log_history, count_history, max_length)
        super().__init__(list(log_history), list(count_history), max_length)
        self._finish()

    def _finish(self) -> None:
        _unfinished.discard(self)
        self.__class__ = HistoryBuffer

    def __setstate__(self, state: Any) -> None:
        if type(state) is not dict:
            _refuse(f"a HistoryBuffer's state must be a dict; got {type(state).__name__}")
        keys = set(state) - {"statistics_methods"}
        if keys != _BUFFER_STATE:
            _refuse(f"a HistoryBuffer's state holds the keys {sorted(map(str, keys))}; "
                    f"expected {sorted(_BUFFER_STATE)}")
        _check_buffer(state["_log_history"], state["_count_history"], state["max_length"])
        # mmengine's __setstate__ registers the saved statistics methods class-wide; here
        # they are only checked: each must be the method this process registered by that
        # name (custom ones: HistoryBuffer.register_statistics before resuming)
        self._set_default_statistics()
        methods = state.get("statistics_methods", {})
        if type(methods) is not dict:
            _refuse(f"a HistoryBuffer's statistics methods must be a dict; got {type(methods).__name__}")
        for name, method in methods.items():
            if HistoryBuffer._statistics_methods.get(name) is not method:
                _refuse(f"the HistoryBuffer statistics method {name!r} is not the one registered "
                        "in this process; register custom statistics "
                        "(HistoryBuffer.register_statistics) before resuming")
        self.__dict__.update(
            max_length=state["max_length"],
            _log_history=np.asarray(state["_log_history"]),
            _count_history=np.asarray(state["_count_history"]),
        )
        self._finish()


#: stand-ins made but not given their state yet: a checkpoint that leaves one so is refused
_unfinished: weakref.WeakSet[_CheckedHistoryBuffer] = weakref.WeakSet()


def _buffer_statistic(owner: Any, name: Any) -> Any:
    """What a checkpoint's ``getattr`` may fetch: one of HistoryBuffer's own statistics
    methods (how its pickled state names them), nothing else."""
    if owner not in (HistoryBuffer, _CheckedHistoryBuffer) or name not in _BUFFER_STATISTICS:
        what = owner.__qualname__ if isinstance(owner, type) else f"a {type(owner).__name__}"
        _refuse(f"getattr({what}, {name!r}): a checkpoint may only name HistoryBuffer's "
                f"statistics methods {list(_BUFFER_STATISTICS)} this way")
    return getattr(HistoryBuffer, name)


def _numpy_globals() -> list[Any]:
    """numpy arrays, dtypes and scalars of numeric types, under numpy 1's and 2's names."""
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # pragma: no cover - numpy < 2
        multiarray = importlib.import_module("numpy.core.multiarray")
    found: list[Any] = [np.ndarray, np.dtype]
    for fn in (multiarray._reconstruct, multiarray.scalar):
        found += [(fn, f"numpy.{package}.multiarray.{fn.__name__}") for package in ("core", "_core")]
    # a dtype is rebuilt through np.dtype, then its state set: that needs its own type
    numeric = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
               np.uint64, np.float16, np.float32, np.float64]
    found += [type(np.dtype(t)) for t in numeric]
    return found


def safe_globals() -> list[Any]:
    """The globals ``safe_loading`` allows, in the form torch.serialization takes."""
    return [
        (_CheckedHistoryBuffer, f"{HistoryBuffer.__module__}.{HistoryBuffer.__qualname__}"),
        (_buffer_statistic, "builtins.getattr"),
        *_numpy_globals(),
    ]


@contextlib.contextmanager
def safe_loading() -> Iterator[None]:
    """Within the block, ``torch.load(..., weights_only=True)`` takes mmengine's checkpoints.

    Allows the globals of :func:`safe_globals`: HistoryBuffer and ``getattr`` through checked
    stand-ins, numpy's arrays, numeric dtypes and scalars. mmengine's checkpoint loading
    (Runner.resume, load_checkpoint) runs inside it while this module is imported; use it
    for a ``torch.load`` of such a checkpoint of your own. torch keeps one allow list per
    process: a load in another thread meanwhile sees the same. Globals already allowed
    stay allowed after the block.
    """
    if not _WEIGHTS_ONLY_DEFAULT:
        raise RuntimeError(
            f"hwoptim.mmengine.safe_loading needs torch >= 2.6; this is torch {torch.__version__}, "
            "whose allow lists cannot name the checked stand-ins"
        )
    present = set(torch.serialization.get_safe_globals())
    # only what is not allowed yet, so that leaving the block takes away nothing of anyone else's
    added = [g for g in safe_globals() if g not in present]
    _unfinished.clear()
    try:
        with torch.serialization.safe_globals(added):
            yield
        if _unfinished:
            _refuse("it holds a HistoryBuffer without its state")
    finally:
        _unfinished.clear()


def _loading_safely(loader: Callable[..., Any]) -> Callable[..., Any]:
    """``loader`` (one of mmengine's checkpoint loaders) run inside :func:`safe_loading`."""

    @functools.wraps(loader)  # mmengine logs the loader's __name__
    def load(*args: Any, **kwargs: Any) -> Any:
        with safe_loading():
            return loader(*args, **kwargs)

    load._hwoptim_safe_loading = True  # type: ignore[attr-defined]
    return load


def _install_safe_loading() -> None:
    """Run every checkpoint loader mmengine has registered inside :func:`safe_loading`.

    Every checkpoint mmengine loads (Runner and FlexibleRunner resume and load_checkpoint,
    the strategies, ``mmengine.runner.load_checkpoint``) goes through
    ``CheckpointLoader.load_checkpoint``, which picks a loader by the path's scheme:
    re-registering each through mmengine's public ``register_scheme`` scopes the allow list
    to those loads. Once per loader, also on a re-import. On torch < 2.6 mmengine's loads
    are not weights_only and nothing is needed.
    """
    if not _WEIGHTS_ONLY_DEFAULT:  # pragma: no cover - torch < 2.6
        return
    for prefix, loader in list(_MMCheckpointLoader._schemes.items()):
        if not getattr(loader, "_hwoptim_safe_loading", False):
            _MMCheckpointLoader.register_scheme(prefix, _loading_safely(loader), force=True)


_install_safe_loading()
