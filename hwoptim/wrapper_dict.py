"""OptimWrapperDict: several named wrappers under one name (GANs, one optimizer per part).

mmengine's semantics: each wrapper is driven on its own (``d["generator"].update_params``);
the dict gives per-name views (param_groups, lr, momentum, state dict) and zeroes all
gradients at once. Unlike mmengine, every inherited member works or says clearly what to
call instead, ``initialize_count_status`` reaches every wrapper, and loading a state dict
with missing or unknown names raises before anything is loaded.
"""

from __future__ import annotations

import contextlib
from collections.abc import ItemsView, Iterator, KeysView, Mapping, ValuesView
from typing import Any, NoReturn

from torch import Tensor

from hwoptim import _extensions
from hwoptim.clip import GroupName
from hwoptim.wrapper import OptimWrapper

__all__ = ["OptimWrapperDict"]


class OptimWrapperDict(OptimWrapper):
    """Named OptimWrappers behind one object.

    Example::

        wrappers = OptimWrapperDict(generator=OptimWrapper(g_opt),
                                    discriminator=AmpOptimWrapper(d_opt, device="auto"))
        with wrappers["discriminator"].optim_context(model.discriminator):
            d_loss = ...
        wrappers["discriminator"].update_params(d_loss)
    """

    #: no fake "base" parameter group here either: None, as on every member (mmengine's
    #: ReduceOnPlateauLR reads it of any wrapper; a dict there would be misread)
    base_param_settings: None = None

    def __init__(self, **optim_wrappers: OptimWrapper) -> None:
        for name, wrapper in optim_wrappers.items():
            if not isinstance(wrapper, OptimWrapper) or isinstance(wrapper, OptimWrapperDict):
                raise TypeError(
                    "OptimWrapperDict only accepts OptimWrapper instances, "
                    f"but got {name}: {type(wrapper).__name__}"
                )
        # No OptimWrapper.__init__: there is no single optimizer. Every member OptimWrapper
        # defines is overridden below.
        self.optim_wrappers: dict[str, OptimWrapper] = dict(optim_wrappers)
        _extensions.wrapper_created(self)

    # -- what must be called on a named wrapper ------------------------------------------

    def _call_named(self, method: str) -> NoReturn:
        names = ", ".join(repr(n) for n in self.optim_wrappers) or "(none)"
        raise NotImplementedError(
            f"`{method}` should be called by each optimizer separately: "
            f"use wrappers[name].{method}(...) with name in {names}"
        )

    def update_params(
        self, loss: Tensor, step_kwargs: dict[str, Any] | None = None,
        zero_kwargs: dict[str, Any] | None = None, *, num_items: int | Tensor | None = None,
    ) -> NoReturn:
        """Not here: call ``update_params`` of the wrapper that owns the loss."""
        self._call_named("update_params")

    def backward(
        self, loss: Tensor, *, num_items: int | Tensor | None = None, **kwargs: Any
    ) -> NoReturn:
        """Not here: call ``backward`` of the wrapper that owns the loss."""
        self._call_named("backward")

    def step(self, **kwargs: Any) -> NoReturn:
        """Not here: call ``step`` of the wrapper to update."""
        self._call_named("step")

    @contextlib.contextmanager
    def optim_context(self, model: Any) -> Iterator[None]:
        """Not here: enter ``optim_context`` of the wrapper whose model runs."""
        self._call_named("optim_context")
        yield  # pragma: no cover

    def scale_loss(self, loss: Tensor) -> NoReturn:
        """Not here: each wrapper scales by its own accumulation window."""
        self._call_named("scale_loss")

    def should_update(self) -> NoReturn:
        """Not here: each wrapper has its own window."""
        self._call_named("should_update")

    def should_sync(self) -> NoReturn:
        """Not here: each wrapper has its own window."""
        self._call_named("should_sync")

    def save_sharded(self, checkpoint_id: Any, model: Any, **kwargs: Any) -> NoReturn:
        """Not here: each wrapper saves a sharded checkpoint with the model it trains."""
        self._call_named("save_sharded")

    def load_sharded(self, checkpoint_id: Any, model: Any, **kwargs: Any) -> NoReturn:
        """Not here: each wrapper loads a sharded checkpoint with the model it trains."""
        self._call_named("load_sharded")

    # -- what applies to every wrapper -----------------------------------------------------

    def zero_grad(self, **kwargs: Any) -> None:
        """Zero the gradients of every wrapper (kwargs go to each optimizer.zero_grad)."""
        for wrapper in self.optim_wrappers.values():
            wrapper.zero_grad(**kwargs)

    def initialize_count_status(
        self, model: Any, init_counts: int, max_counts: int | None
    ) -> None:
        """Initialize the counters of every wrapper (mmengine's version does nothing).

        When ``model`` has a submodule with a wrapper's name, that wrapper gets the
        submodule, else the whole model.
        """
        for name, wrapper in self.optim_wrappers.items():
            part = getattr(model, name, None) if model is not None else None
            wrapper.initialize_count_status(part if part is not None else model, init_counts, max_counts)

    # -- per-name views ------------------------------------------------------------------

    @property
    def inner_count(self) -> dict[str, int]:  # type: ignore[override]
        """``{name: inner_count}``."""
        return {name: w.inner_count for name, w in self.optim_wrappers.items()}

    @property
    def accumulative_counts(self) -> dict[str, int]:  # type: ignore[override]
        """``{name: accumulative_counts}``."""
        return {name: w.accumulative_counts for name, w in self.optim_wrappers.items()}

    @property
    def clip_grad_kwargs(self) -> dict[str, dict[str, Any] | None]:  # type: ignore[override]
        """``{name: clip_grad_kwargs}`` (None where a wrapper does not clip)."""
        return {name: w.clip_grad_kwargs for name, w in self.optim_wrappers.items()}

    @property
    def loss_scale(self) -> dict[str, Tensor | None]:  # type: ignore[override]
        """``{name: loss_scale}`` (None where a wrapper has no scaler)."""
        return {name: w.loss_scale for name, w in self.optim_wrappers.items()}

    @property
    def loss_scaler(self) -> dict[str, Any]:
        """``{name: loss_scaler}`` (None where a wrapper has no scaler)."""
        return {name: w.loss_scaler for name, w in self.optim_wrappers.items()}

    @property
    def optimizer(self) -> NoReturn:  # type: ignore[override]
        """Not here: each wrapper has its own optimizer."""
        names = ", ".join(repr(n) for n in self.optim_wrappers) or "(none)"
        raise AttributeError(
            "OptimWrapperDict has no single optimizer: use wrappers[name].optimizer with "
            f"name in {names}"
        )

    @property
    def param_groups(self) -> dict[str, list[dict[str, Any]]]:  # type: ignore[override]
        """``{name: param_groups}``."""
        return {name: w.param_groups for name, w in self.optim_wrappers.items()}

    @property
    def defaults(self) -> dict[str, dict[str, Any]]:
        """``{name: optimizer.defaults}``."""
        return {name: w.defaults for name, w in self.optim_wrappers.items()}

    @property
    def last_grad_norm(self) -> dict[str, Tensor | None]:  # type: ignore[override]
        """``{name: last_grad_norm}``."""
        return {name: w.last_grad_norm for name, w in self.optim_wrappers.items()}

    @property
    def last_grad_norms(self) -> dict[str, dict[GroupName, Tensor]]:  # type: ignore[override]
        """``{name: last_grad_norms}``: each wrapper's per-group norms."""
        return {name: w.last_grad_norms for name, w in self.optim_wrappers.items()}

    @property
    def nonfinite_groups(self) -> dict[str, dict[GroupName, Tensor]]:  # type: ignore[override]
        """``{name: nonfinite_groups}``: each wrapper's groups of its last bad update."""
        return {name: w.nonfinite_groups for name, w in self.optim_wrappers.items()}

    @property
    def last_loss(self) -> dict[str, Tensor | None]:  # type: ignore[override]
        """``{name: last_loss}`` (each wrapper's item-weighted mean loss, or None)."""
        return {name: w.last_loss for name, w in self.optim_wrappers.items()}

    @property
    def skipped_steps(self) -> dict[str, Tensor | None]:  # type: ignore[override]
        """``{name: skipped_steps}``."""
        return {name: w.skipped_steps for name, w in self.optim_wrappers.items()}

    @property
    def zeroed_steps(self) -> dict[str, Tensor | None]:  # type: ignore[override]
        """``{name: zeroed_steps}``."""
        return {name: w.zeroed_steps for name, w in self.optim_wrappers.items()}

    def get_lr(self) -> dict[str, list[float]]:
        """``{"<name>.lr": [...]}`` for every wrapper."""
        return {
            f"{name}.{key}": value
            for name, wrapper in self.optim_wrappers.items()
            for key, value in wrapper.get_lr().items()
        }

    def get_momentum(self) -> dict[str, list[float]]:
        """``{"<name>.momentum": [...]}`` for every wrapper."""
        return {
            f"{name}.{key}": value
            for name, wrapper in self.optim_wrappers.items()
            for key, value in wrapper.get_momentum().items()
        }

    def state_dict(self) -> dict[str, Any]:
        """``{name: wrapper.state_dict()}``."""
        return {name: w.state_dict() for name, w in self.optim_wrappers.items()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load ``{name: state}``; every name must match, and every part is checked before
        any is loaded."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict; got {type(state_dict).__name__}")
        unknown = sorted(set(state_dict) - set(self.optim_wrappers))
        missing = sorted(set(self.optim_wrappers) - set(state_dict))
        if unknown or missing:
            raise ValueError(
                "the state dict does not match this OptimWrapperDict: "
                f"unknown name(s) {unknown}, missing name(s) {missing}"
            )
        plans = {
            name: wrapper._plan_load(state_dict[name])
            for name, wrapper in self.optim_wrappers.items()
        }
        for name, wrapper in self.optim_wrappers.items():
            wrapper._apply_load(plans[name])

    # -- copies ----------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """The named wrappers, each copied as OptimWrapper.__getstate__ says."""
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        _extensions.wrapper_created(self)  # the members log under their names again

    # -- mapping protocol ------------------------------------------------------------------

    def items(self) -> ItemsView[str, OptimWrapper]:
        """(name, wrapper) pairs."""
        return self.optim_wrappers.items()

    def values(self) -> ValuesView[OptimWrapper]:
        """The wrappers."""
        return self.optim_wrappers.values()

    def keys(self) -> KeysView[str]:
        """The names."""
        return self.optim_wrappers.keys()

    def __getitem__(self, name: str) -> OptimWrapper:
        try:
            return self.optim_wrappers[name]
        except KeyError:
            raise KeyError(
                f"Cannot find {name!r} in OptimWrapperDict; it has {list(self.optim_wrappers)}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self.optim_wrappers

    def __iter__(self) -> Iterator[str]:
        return iter(self.optim_wrappers)

    def __len__(self) -> int:
        return len(self.optim_wrappers)

    def __repr__(self) -> str:
        return "\n".join(f"name: {name}\n{wrapper!r}" for name, wrapper in self.items())
