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

import sys
from abc import ABCMeta
from collections.abc import Iterable, Mapping
from typing import Any, cast

import torch
from mmengine.logging import print_log
from mmengine.model import MMDistributedDataParallel as _MMDistributedDataParallel
from mmengine.optim import OptimWrapper as _MMOptimWrapper
from mmengine.optim import OptimWrapperDict as _MMOptimWrapperDict
from mmengine.registry import MODEL_WRAPPERS as _MM_MODEL_WRAPPERS
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS as _MM_CONSTRUCTORS
from mmengine.registry import OPTIM_WRAPPERS as _MM_OPTIM_WRAPPERS
from mmengine.registry import OPTIMIZERS as _MM_OPTIMIZERS
from mmengine.registry import Registry
from torch import Tensor, nn

from hwoptim import _extensions, _warn
from hwoptim._mmengine_log import (
    MAX_LOGGED_GROUPS,
    DeviceHistoryBuffer,
    _log_warning,
    _message_hub,
    _no_message_hub,
    join,
    leave,
)
from hwoptim._mmengine_safe_load import _install_safe_loading, safe_globals, safe_loading
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


def _placement_advice() -> str:
    """The misplaced-parameters error's advice under mmengine's Runner, which moves the model."""
    if "mmengine.runner" not in sys.modules:
        return ""
    return (
        "; under mmengine's Runner, which puts the model on mmengine.device.get_device() (the "
        "CPU on devices mmengine does not know), add constructor='hwoptim.OptimWrapperConstructor' "
        "to the optim_wrapper config: it places the model on the wrapper's device first"
    )


# -- joining: every wrapper made from now on logs to mmengine, its warnings too ---------------

_extensions.subscribe(__name__, on_new_wrapper=join, placement_advice=_placement_advice)
_warn.subscribe(__name__, _log_warning)
#: mmengine's OptimWrapper.message_hub, on hwoptim's classes while mmengine is imported
OptimWrapper.message_hub = property(_message_hub)  # type: ignore[attr-defined]
OptimWrapperDict.message_hub = property(_no_message_hub)  # type: ignore[attr-defined]
#: mmengine's checkpoint loaders load with torch's weights_only unpickler
_install_safe_loading()
DeviceHistoryBuffer.__module__ = __name__  # documented, and pickled by name, as hwoptim.mmengine's


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
