"""OptimWrapper: the public API and the hot path, composing the owners of the state.

The public surface and the counter arithmetic are mmengine's, so code and configs written
for mmengine's OptimWrapper move over unchanged. The wrapper holds no state of its own but
the optimizer: each piece has one owner (docs/architecture.md has the map) --

- ``_window`` (hwoptim._window): the accumulation counters and the loss factor;
- ``_items`` (hwoptim.num_items): the ``num_items`` window;
- ``_guard`` (hwoptim._guard): the clip, the non-finite policy and the one update body;
- ``_skips`` (hwoptim._skips): ``skipped_steps`` and ``zeroed_steps``;
- ``_precision`` (hwoptim._precision): no scaling, or a GradScaler;
- ``_binding`` (hwoptim._binding): the model, its sync skip, the parameter list;

and checkpoints are hwoptim._checkpoint's. Everything that can be decided at construction
is; ``update_params`` does no parsing, builds nothing it could have built once, and never
reads a device tensor back to the host.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import Any, Callable

import torch
from torch import Tensor

from hwoptim import _checkpoint, _extensions, _sharded
from hwoptim._binding import MicroBatchContext, ModelBinding, NoSync
from hwoptim._guard import Guard
from hwoptim._numbers import check_flag
from hwoptim._precision import NoScaling
from hwoptim._skips import SkipCounter
from hwoptim._window import AccumulationWindow, check_accumulative_counts
from hwoptim.backends.base import skip_gradient_sync
from hwoptim.clip import GroupName, parse_clip_grad
from hwoptim.compile import CompileStep, parse_compile_step
from hwoptim.num_items import ItemsGroup, ItemWindow, check_items_group

__all__ = ["STATE_KEY", "OptimWrapper", "check_accumulative_counts"]

#: the key state_dict() adds next to the optimizer's own keys
STATE_KEY = _checkpoint.STATE_KEY
_EMPTY: Mapping[str, Any] = {}
_NO_PARAMS: list[Tensor] = []


class OptimWrapper:
    """An optimizer with gradient accumulation, clipping and sync skipping, mmengine-compatible.

    Args:
        optimizer: the torch optimizer to drive.
        accumulative_counts: micro-batches per optimizer update (an int >= 1). The loss of
            each micro-batch is divided by the window length, so the accumulated gradient
            is the mean, as mmengine does.
        clip_grad: None, ``dict(max_norm=..., norm_type=2)`` (type "norm", the default) or
            ``dict(type="value", clip_value=...)``. Validated here; the dict is never changed.
            ``per_group=True`` clips each param group by its own norm instead of the total
            (``max_norm`` may then be a dict ``{group name: max_norm}``; a group it does not
            name is not clipped): see ``last_grad_norms`` for the groups' names.
        num_items_group: where ``update_params(..., num_items=n)`` sums item counts over
            ranks: "auto" (the group the model's gradients are averaged over: DDP's,
            FSDP2/HSDP's data-parallel groups, else the default group when
            torch.distributed is initialized), "local" (this rank only) or a ProcessGroup.
            See docs/variable-size-batches.md.
        save_partial_grads: ``state_dict()`` taken inside an accumulation window also saves
            the gradients accumulated so far, so a resume from it is exact wherever the
            checkpoint falls. Off by default: such a checkpoint is larger by one copy of
            the gradients (see docs/checkpoints.md for DDP and FSDP).
        exact_skip: with clipping, a non-fused optimizer and no loss scaler, skip an update
            whose gradient norm is inf or nan for real (``skipped_steps``), by restoring on
            the device what the step changed; it costs a copy of those tensors per update.
            Otherwise such an update steps with zeroed gradients (``zeroed_steps``).
        compile_step: False (eager), True, or a dict of ``torch.compile`` keyword arguments:
            run each update (clip, non-finite guard, skip counts, optimizer step) as one
            ``torch.compile``-d function; pays off with many parameter tensors and non-fused
            optimizers (docs/compile.md).

    Example::

        wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1),
                               accumulative_counts=4, clip_grad=dict(max_norm=1.0))
        wrapper.initialize_count_status(model, 0, len(loader))
        for x, y in loader:
            with wrapper.optim_context(model):
                loss = loss_fn(model(x), y)
            wrapper.update_params(loss)

    ``last_grad_norm``, ``skipped_steps``, ``last_loss`` and ``loss_scale`` are device
    tensors ``update_params`` never reads: read them every N steps (docs/logging.md).
    """

    #: mmengine's fake "base" parameter group, which hwoptim does not make; mmengine's
    #: ReduceOnPlateauLR reads this attribute of any wrapper
    base_param_settings: None = None

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        accumulative_counts: int = 1,
        clip_grad: Mapping[str, Any] | None = None,
        *,
        num_items_group: ItemsGroup = "auto",
        save_partial_grads: bool = False,
        exact_skip: bool = False,
        compile_step: CompileStep = False,
    ) -> None:
        self._compose(
            optimizer, accumulative_counts, clip_grad, num_items_group=num_items_group,
            save_partial_grads=save_partial_grads, exact_skip=exact_skip, compile_step=compile_step,
        )

    def _compose(
        self,
        optimizer: torch.optim.Optimizer,
        accumulative_counts: Any,
        clip_grad: Any,
        *,
        num_items_group: Any,
        save_partial_grads: Any,
        exact_skip: Any,
        compile_step: Any,
        precision: Callable[[torch.optim.Optimizer], NoScaling] = NoScaling,
        no_sync: NoSync = skip_gradient_sync,
        custom_no_sync: bool = False,
        device: torch.device | None = None,
        forward_context: Callable[[], AbstractContextManager[Any]] | None = None,
    ) -> None:
        """Check every argument, then build the owners (the constructors' common part)."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}: build "
                "one first, or use hwoptim.build_optim_wrapper with a config"
            )
        acc = check_accumulative_counts(accumulative_counts)
        clip = parse_clip_grad(clip_grad)
        if clip is not None:
            clip.check_groups(optimizer.param_groups)
        group = check_items_group(num_items_group)
        save_partial_grads = check_flag(save_partial_grads, "save_partial_grads")
        exact_skip = check_flag(exact_skip, "exact_skip")
        compile_kwargs = parse_compile_step(compile_step)

        self.optimizer = optimizer
        #: mmengine's view of the clip config: the keyword arguments, without "type"
        self.clip_grad_kwargs: dict[str, Any] | None = None if clip is None else clip.kwargs
        self._save_partial_grads = save_partial_grads
        self._window = AccumulationWindow(acc)
        self._items = ItemWindow(group)
        self._skips = SkipCounter()
        self._precision = precision(optimizer)
        self._guard = Guard(
            optimizer, clip, self._precision, self._skips, exact_skip=exact_skip,
            compile_kwargs=compile_kwargs, owner=type(self).__name__,
        )
        self._binding = ModelBinding(
            optimizer, no_sync, custom_no_sync=custom_no_sync, device=device,
            forward_context=forward_context,
        )
        _extensions.wrapper_created(self)

    # -- the training step ---------------------------------------------------------------

    def update_params(
        self,
        loss: Tensor,
        step_kwargs: dict[str, Any] | None = None,
        zero_kwargs: dict[str, Any] | None = None,
        *,
        num_items: int | Tensor | None = None,
    ) -> None:
        """Scale the loss for accumulation, backward, and on the last micro-batch of a
        window: clip, step and zero the gradients.

        Args:
            loss: the micro-batch's loss (a mean; with ``num_items``, a sum).
            step_kwargs: keyword arguments of ``optimizer.step``.
            zero_kwargs: keyword arguments of ``optimizer.zero_grad``.
            num_items: ``loss`` sums the losses of this many items (an int or an integer
                tensor); the update divides the gradients by the window's item count over
                the data-parallel ranks (docs/variable-size-batches.md). Every micro-batch
                of a window gives it, or none does.

        After an exception the wrapper stays usable (see ``backward`` and ``step``); if
        ``zero_grad`` raises, the step was taken and the gradients are dropped anyway.

        .. note::
            Incurs no host sync (a loss scaler's non-fused step is torch's own).
        """
        if num_items is None:
            self.backward(self.scale_loss(loss))
        else:
            self.backward(loss, num_items=num_items)
            self._window.check_end_known()
        if self.should_update():
            self.step(**(step_kwargs or _EMPTY))
            try:
                self.zero_grad(**(zero_kwargs or _EMPTY))
            except BaseException:
                self._abandon_step()
                raise

    def backward(self, loss: Tensor, *, num_items: int | Tensor | None = None, **kwargs: Any) -> None:
        """``loss.backward(**kwargs)`` (on the scaled loss under a loss scaler) and count the micro-batch.

        Args:
            loss: the loss to backpropagate.
            num_items: ``loss`` sums that many items' losses; the next ``step`` divides the
                gradients by the window's total (see ``update_params``).
            kwargs: keyword arguments of ``Tensor.backward``.

        A gradient-sync skip entered by ``optim_context`` ends here, after the backward,
        so FSDP (which reads its flag during backward) skips the collective too. If the
        backward raises, the skip ends and the micro-batch is not counted (``zero_grad()``
        drops what torch accumulated before the failure).

        .. note::
            Incurs no host sync: a tensor ``num_items`` stays on the device.
        """
        items = self._items
        try:
            if num_items is None:
                if items.loss is not None:
                    items.check_plain()
                self._precision.scale(loss).backward(**kwargs)  # type: ignore[no-untyped-call]
                items.plain = True
            else:
                count = items.check(loss, num_items)
                self._precision.scale(loss).backward(**kwargs)  # type: ignore[no-untyped-call]
                items.add(loss, count)  # only once its gradients are there
        finally:
            binding = self._binding
            if binding.pending is not None:
                binding.release()
        self._window.inner += 1

    def step(self, **kwargs: Any) -> None:
        """Divide by the window's item count (with ``num_items``), unscale, clip, and
        ``optimizer.step(**kwargs)``.

        With clipping, a step whose gradient norm is inf or nan (or a ``num_items`` window
        without items) never puts a non-finite value into the parameters (``skipped_steps``,
        ``zeroed_steps``; docs/architecture.md, "The guard"). If anything in here raises,
        the window's gradients are dropped and nothing is counted.

        .. note::
            Incurs no host sync, except a loss scaler's step of a non-fused optimizer
            (torch's GradScaler reads its found_inf there).
        """
        try:
            items = self._items
            if items.loss is not None or self._guard.needs_params:
                params = self._binding.params()
                empty = items.divide(params, self._binding.model)
            else:
                params, empty = _NO_PARAMS, items.divide(_NO_PARAMS, None)
            self._guard.update(params, empty, kwargs)
        except BaseException:
            self._abandon_step()
            raise

    def _abandon_step(self) -> None:
        """Drop a failed update: its gradients, item count, found_inf and scaler stage."""
        self._precision.abandon()
        self.optimizer.__dict__.pop("found_inf", None)
        self.optimizer.zero_grad(set_to_none=True)
        self._items.reset()

    def zero_grad(self, **kwargs: Any) -> None:
        """``optimizer.zero_grad(**kwargs)``; the window's item count is dropped with the
        gradients it described."""
        self.optimizer.zero_grad(**kwargs)
        self._items.reset()

    # -- the forward ---------------------------------------------------------------------

    def optim_context(self, model: Any) -> AbstractContextManager[None]:
        """Run the forward of ``model`` in here; it skips the gradient sync while accumulating.

        Args:
            model: the model whose forward runs in the block (a plain module, DDP, FSDP).

        On a micro-batch that will not update, the model's gradient sync (DDP and FSDP
        ``no_sync()``, FSDP2 ``set_requires_gradient_sync(False)``, or the backend's
        ``no_sync(model)``) is off from here until that micro-batch's backward has run,
        whether ``update_params`` is called inside this block or after it (mmengine's
        pattern). AmpOptimWrapper also runs the forward in autocast here.

        .. note::
            Incurs no host sync.
        """
        binding = self._binding
        forward_context = binding.forward_context
        return MicroBatchContext(
            self._enter_micro_batch, model, binding, None if forward_context is None else forward_context()
        )

    def _enter_micro_batch(self, model: Any) -> None:
        """Start a micro-batch's forward: bind a new model, then skip the sync if due."""
        binding = self._binding
        if model is not binding.model or type(model) is not binding.model_type:
            self._bind_model(model)
        binding.enter(model, self._window)

    def _bind_model(self, model: Any) -> None:
        """Bind ``model``: sync skip, placement check, clip function, item reduction."""
        self._binding.bind(model, self._window.acc)
        self._items.reduction = None
        self._guard.bind(model)

    # -- accumulation counters (mmengine's arithmetic) -------------------------------------

    def initialize_count_status(self, model: Any, init_counts: int, max_counts: int | None) -> None:
        """Tell the wrapper where training resumes and where it ends.

        Args:
            model: the model trained (bound here as by ``optim_context``), or None.
            init_counts: the iteration training resumes at (0 for a fresh start).
            max_counts: the total number of iterations (usually ``len(loader) * epochs``), so
                that the last, shorter window steps with the right loss factor; None when the
                end is unknown.

        Warns on a resume inside a window unless ``load_state_dict`` restored that window's
        gradients (``save_partial_grads=True``), and on BatchNorm with accumulation (batch
        statistics see micro-batches, not the whole window).
        """
        window = self._window
        init_counts, max_counts = window.start(init_counts, max_counts)
        if model is not None:
            self._bind_model(model)
        window.resume(init_counts, max_counts)
        window.check_batch_norm(model)

    def should_update(self) -> bool:
        """Whether the micro-batch just backpropagated ends a window (checked after backward).

        Right after ``update_params`` it tells whether that call stepped the optimizer: the
        place to step a per-update lr scheduler.
        """
        return self._window.should_update()

    def should_sync(self) -> bool:
        """Whether the coming micro-batch ends a window, so its gradients must be synced."""
        return self._window.should_sync()

    def scale_loss(self, loss: Tensor) -> Tensor:
        """Divide the loss by the length of its accumulation window.

        Args:
            loss: the micro-batch's (mean) loss.

        Windows hold ``accumulative_counts`` micro-batches, except the last one before
        ``max_counts``, which holds the remainder. Past ``max_counts`` windows are full again
        (mmengine divides by zero there). Does not apply the loss scale (``backward`` does).
        """
        window = self._window
        if window.acc == 1:
            return loss
        return loss / window.loss_factor()

    @property
    def inner_count(self) -> int:
        """Micro-batches backpropagated so far (resumed runs start at init_counts)."""
        return self._window.inner

    @property
    def accumulative_counts(self) -> int:
        """Micro-batches per optimizer update (accelerate calls it gradient_accumulation_steps)."""
        return self._window.acc

    @property
    def _accumulative_counts(self) -> int:
        """mmengine's private name, read by its strategies (FlexibleRunner): keep it."""
        return self._window.acc

    # -- observability without host syncs ----------------------------------------------------

    @property
    def last_grad_norm(self) -> Tensor | None:
        """The total gradient norm before the last clipping, as a device tensor (None until
        then). Reading its value is a host sync: log it every N steps."""
        return self._guard.last_grad_norm

    @property
    def last_grad_norms(self) -> dict[GroupName, Tensor]:
        """Each param group's gradient norm before the last clipping, ``{name: 0-dim device
        tensor}``, from the same pass as ``last_grad_norm`` (unscaled under a loss scaler).

        A group's name is its ``"name"`` entry, else its index; groups sharing a name are
        one entry. Empty before the first clipped update, without ``clip_grad``
        (``max_norm=float("inf")`` measures only) and under FSDP1 (docs/logging.md).

        .. note:: Reading a value is a host sync: log them every N steps, in one read.
        """
        return self._guard.group_norms()

    @property
    def nonfinite_groups(self) -> dict[GroupName, Tensor]:
        """Which param groups held the inf/nan of the last skipped or zeroed update,
        ``{name: 0-dim bool device tensor}`` (the names of ``last_grad_norms``), so that the
        layer that blew up can be found.

        Decided on the device from the groups' norms, the same on every rank; all False
        while no update was bad. Empty where ``last_grad_norms`` is.

        .. note:: Reading a value is a host sync: read them every N steps (docs/logging.md).
        """
        return self._guard.nonfinite_groups()

    @property
    def loss_scaler(self) -> Any:
        """The loss scaler (a GradScaler), or None: no loss is scaled."""
        return self._precision.scaler

    @property
    def loss_scale(self) -> Tensor | None:
        """The current loss scale as a device tensor (None without a scaler or before the
        first step). Reading its value is a host sync: log it every N steps."""
        return self._precision.loss_scale

    @property
    def skipped_steps(self) -> Tensor | None:
        """How many updates were really skipped (parameters and optimizer state untouched:
        a loss scaler's, a fused optimizer's, ``exact_skip``'s) because a gradient was inf
        or nan or (``num_items``) the window held no item, as a device tensor (None until a
        step has been checked).

        .. note::
            Reading its value is a host sync: read it every N steps.
        """
        self._skips.fold()
        self._items.check_empty_windows()
        return self._skips.skipped

    @property
    def zeroed_steps(self) -> Tensor | None:
        """How many updates had an inf or nan gradient (or, with ``num_items``, no item) and
        were stepped with zeroed gradients instead of skipped, as a device tensor (None
        until a step has been checked).

        Momentum, weight decay and the step count act as for a zero gradient;
        ``fused=True`` or ``exact_skip=True`` skip these steps for real.

        .. note::
            Reading its value is a host sync: read it every N steps.
        """
        self._skips.fold()
        self._items.check_empty_windows()
        return self._skips.zeroed

    @property
    def last_loss(self) -> Tensor | None:
        """The item-weighted mean loss of the last update (``num_items``), as a device tensor:
        the window's loss sum over the data-parallel ranks divided by their item count (nan
        for a window without items); None for an update without ``num_items``.

        .. note::
            Reading its value is a host sync: log it every N steps.
        """
        self._items.check_empty_windows()
        return self._items.last_loss

    @property
    def _last_loss(self) -> Tensor | None:
        """``last_loss`` without the empty-window check (hwoptim.mmengine's logging hook)."""
        return self._items.last_loss

    # -- optimizer views ---------------------------------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's own parameter groups (no fake "base" group, unlike mmengine)."""
        return self.optimizer.param_groups

    @property
    def defaults(self) -> dict[str, Any]:
        """The optimizer's defaults."""
        return self.optimizer.defaults

    def get_lr(self) -> dict[str, list[float]]:
        """``{"lr": [lr of each parameter group]}``."""
        return {"lr": [group["lr"] for group in self.optimizer.param_groups]}

    def get_momentum(self) -> dict[str, list[float]]:
        """``{"momentum": [...]}``: each group's momentum, else betas[0] (Adam-style), else 0."""
        momentum = []
        for group in self.optimizer.param_groups:
            if "momentum" in group:
                momentum.append(group["momentum"])
            elif "betas" in group:
                momentum.append(group["betas"][0])
            else:
                momentum.append(0)
        return {"momentum": momentum}

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state dict plus ``"hwoptim"``: the counters, for an exact resume.

        With ``save_partial_grads=True`` inside a window it also holds the window's
        gradients (and item count); under a loss scaler, mmengine's ``"loss_scaler"``
        (docs/checkpoints.md has the layout). The tensors are the live ones: save the dict
        before training on.
        """
        return _checkpoint.save(
            self.optimizer, self._window, self._items, self._precision, self._binding.params(),
            partial_grads=self._save_partial_grads, model=self._binding.model,
        )

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict from hwoptim or mmengine (or a bare optimizer state dict).

        Args:
            state_dict: what ``state_dict()`` returned (never modified).

        Everything is checked first: on a mismatch this raises before any state has changed.
        """
        self._apply_load(self._plan_load(state_dict))

    def _plan_load(self, state_dict: Any) -> _checkpoint.LoadPlan:  # checks, changes nothing
        return _checkpoint.plan(state_dict, self.optimizer, self._window, self._precision, self._binding.params())

    def _apply_load(self, plan: _checkpoint.LoadPlan) -> None:  # applies a checked plan
        _checkpoint.apply(plan, self.optimizer, self._window, self._items, self._precision, self._binding.params())
        self._binding.forget_params()  # the parameters may have been re-grouped

    def save_sharded(
        self, checkpoint_id: str | os.PathLike[str], model: Any, *, async_save: bool = False,
        process_group: Any = None,
    ) -> Future[None] | None:
        """Save ``model``, the optimizer and this wrapper's state as one sharded checkpoint
        with torch.distributed.checkpoint; call it on every rank at the same point.

        Args:
            checkpoint_id: the checkpoint's folder (made if missing).
            model: the model the optimizer trains (FSDP2/HSDP, DDP or a plain module).
            async_save: ``dcp.async_save``: returns a Future, done once the checkpoint
                (checksums included) is complete; the state is copied to the host first.
            process_group: the group DCP coordinates over (None: the default group).

        Inside a window with ``save_partial_grads=True`` the window is saved too; under
        FSDP2 its gradients are first reduce-scattered into the shards (one collective).
        docs/checkpoints.md, "Sharded checkpoints with DCP", says what is exact.
        """
        return _sharded.save(
            checkpoint_id, model, self.optimizer, self._window, self._items, self._precision, self._skips,
            self._binding.params(), partial_grads=self._save_partial_grads, async_save=async_save,
            process_group=process_group,
        )

    def load_sharded(self, checkpoint_id: str | os.PathLike[str], model: Any, *, process_group: Any = None) -> None:
        """Load a checkpoint of ``save_sharded`` into ``model``, the optimizer and this wrapper.

        ``model`` is built and sharded as for training; the arguments are ``save_sharded``'s.
        Call it on every rank. Everything is checked, and read into fresh buffers, before
        anything changes: on an error nothing was loaded. A window-end checkpoint loads on
        any number of ranks, a mid-window one only on as many as saved it.
        """
        _sharded.load(
            checkpoint_id, model, self.optimizer, self._window, self._items, self._precision, self._skips,
            self._binding.params(), process_group=process_group,
        )
        self._binding.forget_params()

    # -- copies: pickle, torch.save, copy.deepcopy ------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """A copy holds everything but the model, plus the parameters' gradients (torch's
        ``Parameter`` drops them): docs/architecture.md, "Checkpoints and copies"."""
        return _checkpoint.copy_state(self.__dict__, self._binding.params())

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Rebuild a copy: it learns its model at the next ``optim_context`` or
        ``initialize_count_status``; the copied parameters get their gradients back."""
        grads = _checkpoint.restore_copy(self.__dict__, state)
        _checkpoint.give_grads(self._binding.params(), grads)
        self._guard.bind(None)
        _extensions.wrapper_created(self)  # the optimizer's hooks are not copied

    def __repr__(self) -> str:
        lines = [
            f"{type(self).__name__}(",
            f"  accumulative_counts={self._window.acc},",
            f"  clip_grad={self._guard.clip!r},",
            *self._guard.describe_compile(),
            *self._repr_extra(),
            "  optimizer=" + repr(self.optimizer).replace("\n", "\n  "),
            ")",
        ]
        return "\n".join(lines)

    def _repr_extra(self) -> list[str]:
        """Lines a subclass adds to the repr."""
        return []

