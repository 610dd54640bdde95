"""OptimWrapper: gradient accumulation, clipping and gradient-sync skipping around an optimizer.

The public surface and the counter arithmetic are mmengine's, so code and configs written
for mmengine's OptimWrapper move over unchanged. The state is small and explicit: the
accumulation counters (``_inner_count``, ``_max_counts``, ``_remainder_counts``), the model
the wrapper learned from ``optim_context``/``initialize_count_status``, and a pending
no-sync context. Everything that can be decided at construction is; ``update_params``
does no parsing, builds nothing it could have built once, and never reads a device tensor
back to the host.
"""

from __future__ import annotations

import inspect
import operator
import sys
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any, Callable

import torch
from torch import Tensor

from hwoptim import _warnings as warnings  # Python warnings, also in mmengine's log (_warnings.py)
from hwoptim._numbers import as_int, check_int
from hwoptim.backends.base import has_gradient_sync, skip_gradient_sync, unwrap_compiled
from hwoptim.clip import ClipFn, ClipGrad, nonfinite_flag, parse_clip_grad
from hwoptim.compile import CompiledUpdate, CompileStep, parse_compile_step
from hwoptim.num_items import (
    HostMirror,
    ItemsGroup,
    ItemsReduction,
    all_reduce_sum,
    check_num_items,
    items_reduction,
)

#: the key state_dict() adds next to the optimizer's own keys
STATE_KEY = "hwoptim"
#: keys that belong to a wrapper checkpoint but not to the optimizer's state dict
_WRAPPER_KEYS = frozenset({STATE_KEY, "loss_scaler", "base_param_settings"})
_EMPTY: Mapping[str, Any] = {}
#: what a wrapper derives from the model it is bound to (and host-side caches a copy must
#: not share), with the values of an unbound wrapper; a copy starts from these and rebuilds
#: the rest (see __getstate__). _params gets a fresh list of its own.
_BINDING: dict[str, Any] = {
    "_model": None, "_model_type": None, "_pending_no_sync": None, "_skips_sync": False,
    "_params": [], "_n_groups": -1, "_n_params": -1, "_clip_fn": None,
    "_items_reduction": None, "_empty_mirror": None,
}
#: updates between two folds of the lazily kept skip records into skipped_steps
_FOLD_EVERY = 256
_GROUP_PARAMS = operator.itemgetter("params")


def check_accumulative_counts(value: Any) -> int:
    """accumulative_counts as an int >= 1: any integer type (np.int64 too); bools and
    floats are refused."""
    return check_int(value, "accumulative_counts", 1)


def _takes_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether optimizer.step() skips itself when given a ``found_inf`` tensor attribute.

    Fused torch optimizers (Adam, AdamW, SGD, Adagrad with fused=True) do: they read
    ``optimizer.found_inf`` on the device, so a non-finite step is skipped with no host
    sync. Optimizers on the older protocol (a ``grad_scaler`` argument) do not.
    """
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    try:
        return "grad_scaler" not in inspect.signature(optimizer.step).parameters
    except (TypeError, ValueError):
        return False


def _bad_update(norm: Tensor | None, empty: Tensor | None) -> Tensor:
    """An update's found_inf: 1.0 when its gradient norm is inf or nan or (``num_items``)
    its window held no item, else 0.0; a float32 tensor on the device."""
    if norm is None:
        assert empty is not None, "an update without clipping has no norm to check"
        return empty
    found = nonfinite_flag(norm)
    return found if empty is None else torch.maximum(found, empty)


def _step_tensors(
    optimizer: torch.optim.Optimizer, params: list[Tensor], device: torch.device
) -> list[Tensor] | None:
    """``params`` and every value of their optimizer state, if all are tensors on
    ``device`` and every parameter has state already; else None (not restorable there)."""
    tensors = list(params)
    state = optimizer.state
    for param in params:
        entry = state.get(param)
        if not entry:
            return None
        for value in entry.values():
            if value is None:
                continue
            if not isinstance(value, Tensor) or value.device != device:
                return None
            tensors.append(value)
    return tensors


def _keeps_own_grads(model: Any) -> bool:
    """Whether ``model`` is (or holds) FSDP1 or FSDP2 modules, which accumulate the gradients
    of a window's unreduced micro-batches outside the optimizer's parameters' ``.grad``."""
    root = unwrap_compiled(model)
    if not isinstance(root, torch.nn.Module):
        return False
    fsdp1: tuple[type, ...] = ()
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FullyShardedDataParallel

        fsdp1 = (FullyShardedDataParallel,)
    return any(
        isinstance(m, fsdp1) or callable(getattr(m, "set_requires_gradient_sync", None))
        for m in root.modules()
    )


def _check_items_window(window: Any) -> tuple[Tensor, Tensor | None, int] | None:
    """A saved num_items window, (loss sum, device item count or None, host item count)."""
    if window is None:
        return None
    where = f"state dict entry {STATE_KEY}.items_window"
    if not isinstance(window, Mapping) or not {"loss", "items", "host_items"} <= set(window):
        raise ValueError(f"{where} must be a dict with 'loss', 'items' and 'host_items'; got {window!r:.80}")
    loss, items, host_items = window["loss"], window["items"], window["host_items"]
    for name, value in (("loss", loss), ("items", items)):
        if value is None and name == "items":
            continue
        if not isinstance(value, Tensor) or value.numel() != 1 or value.is_complex():
            raise ValueError(f"{where}.{name} must be a one-element real tensor; got {value!r:.80}")
    host_items = check_int(host_items, f"{where}.host_items", 0)
    return loss, items, host_items


def _unpatched_step(optimizer: torch.optim.Optimizer) -> Callable[..., Any]:
    """``optimizer.step`` without torch's LR-scheduler wrapper, which compile_step calls.

    An LR scheduler replaces ``optimizer.step`` by a wrapper that notes the call, in a file
    torch.compile refuses to trace: through it the step would run uncompiled after a graph
    break. The caller notes the call itself (``_opt_called``), as the wrapper would.
    """
    step = optimizer.step
    wrapped = getattr(step, "__wrapped__", None)
    if getattr(step, "_wrapped_by_lr_sched", False) and wrapped is not None:
        return wrapped.__get__(optimizer, type(optimizer))  # type: ignore[no-any-return]
    return step


def _rank() -> int:
    """This process's rank in the default process group; 0 outside torch.distributed."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def join_mmengine(wrapper: OptimWrapper) -> None:
    """Let ``wrapper`` work under mmengine's Runner (isinstance, logging): hwoptim.mmengine.

    Called by the constructors only when mmengine is already imported, so that a config
    giving the class itself (``type=hwoptim.AmpOptimWrapper``) needs no custom_imports.
    """
    try:
        from hwoptim.mmengine import join
    except ImportError as exc:  # mmengine is imported, but not the parts a Runner needs
        warnings.warn(
            f"mmengine is imported, but hwoptim cannot join its Runner ({exc}); "
            'install what it needs with pip install "hwoptim[mmengine]"',
            UserWarning,
            stacklevel=3,
        )
        return
    join(wrapper)


def _has_batch_norm(model: Any) -> bool:
    if not isinstance(model, torch.nn.Module):
        return False
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


#: the placement error's advice under mmengine's Runner, which moves the model itself
_MMENGINE_PLACEMENT = (
    ". Under mmengine's Runner, which puts the model on mmengine.device.get_device() (the "
    "CPU on devices mmengine does not know), add constructor='hwoptim.OptimWrapperConstructor' "
    "to the optim_wrapper config: it places the model on the wrapper's device first"
)


class OptimWrapper:
    """An optimizer with gradient accumulation, clipping and sync skipping, mmengine-compatible.

    Args:
        optimizer: the torch optimizer to drive.
        accumulative_counts: micro-batches per optimizer update (an int >= 1). The loss of
            each micro-batch is divided by the window length, so the accumulated gradient
            is the mean, as mmengine does.
        clip_grad: None, ``dict(max_norm=..., norm_type=2)`` (type "norm", the default) or
            ``dict(type="value", clip_value=...)``. Validated here; the dict is never changed.
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
            whose gradient norm is inf or nan for real, with no host sync: the parameters
            and the optimizer state it would change are copied before the step and copied
            back on the device after it when the norm was not finite (counted in
            ``skipped_steps``). Off by default: it costs a copy of those tensors per update.
            Without it, or where the state cannot be restored on the device, such an update
            is a step with zeroed gradients (counted in ``zeroed_steps``; see ``step``).
        compile_step: False (eager), True, or a dict of ``torch.compile`` keyword arguments:
            run each update (clip, non-finite guard, skip counts, optimizer step) as one
            function compiled by ``torch.compile``, once per wrapper; a scaler's unscale
            and update, and the ``num_items`` division, run eagerly around it. Pays off with
            many parameter tensors and non-fused optimizers; see ``_update_body`` for what
            is compiled and docs/compile.md for the costs.

    Example::

        wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1),
                               accumulative_counts=4, clip_grad=dict(max_norm=1.0))
        wrapper.initialize_count_status(model, 0, len(loader))
        for x, y in loader:
            with wrapper.optim_context(model):
                loss = loss_fn(model(x), y)
            wrapper.update_params(loss)

    Logging: ``last_grad_norm``, ``skipped_steps``, ``last_loss`` (with ``num_items``) and
    AmpOptimWrapper's ``loss_scale`` are device tensors that ``update_params`` never reads.
    Reading one (``float()``, ``.item()``, printing it) waits for the device to finish its
    queued work, so do it every N steps, all values in one transfer::

        if step % 100 == 0:  # one host sync per 100 steps
            norm, skipped = torch.stack(
                [wrapper.last_grad_norm, wrapper.skipped_steps]
            ).tolist()
    """

    #: the loss scaler; only AmpOptimWrapper ever sets one
    loss_scaler: Any = None
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
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "optimizer must be a torch.optim.Optimizer (build one first, or use "
                f"hwoptim.build_optim_wrapper with a config); got {type(optimizer).__name__}"
            )
        accumulative_counts = check_accumulative_counts(accumulative_counts)
        clip = parse_clip_grad(clip_grad)
        if isinstance(num_items_group, str) and num_items_group not in ("auto", "local"):
            raise ValueError(
                f"num_items_group must be 'auto', 'local' or a ProcessGroup; got {num_items_group!r}"
            )
        for name, flag in (("save_partial_grads", save_partial_grads), ("exact_skip", exact_skip)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False; got {flag!r}")
        compile_kwargs = parse_compile_step(compile_step)

        self.optimizer = optimizer
        self._accumulative_counts = accumulative_counts
        self._clip: ClipGrad | None = clip
        #: mmengine's view of the clip config: the keyword arguments, without "type"
        self.clip_grad_kwargs: dict[str, Any] | None = None if clip is None else clip.kwargs
        self._inner_count = 0
        self._max_counts = -1
        self._remainder_counts = -1
        self._warned_unknown_end = False
        self._save_partial_grads = save_partial_grads
        #: the inner_count whose window's gradients load_state_dict restored (-1: none)
        self._grads_restored_at = -1

        #: the total gradient norm before the last clipping, as a device tensor (None until
        #: then); turning it into a number is a host sync, so log it every N steps
        self.last_grad_norm: Tensor | None = None
        self._skipped: Tensor | None = None
        self._zeroed: Tensor | None = None
        # Counted lazily: each update only appends here its found_inf (a fused optimizer's
        # or the scaler's: > 0 is a real skip) or, for a step run with zeroed gradients,
        # its norm (non-finite = zeroed) or flag; the lists are folded into _skipped and
        # _zeroed every _FOLD_EVERY updates or when either count is read.
        self._pending_found: list[Tensor] = []
        self._pending_norms: list[Tensor] = []
        self._pending_zeroed: list[Tensor] = []  # flags (> 0: zeroed) where no norm tells
        self._takes_found_inf = _takes_found_inf(optimizer)
        self._exact_skip = exact_skip and not self._takes_found_inf  # fused: skips anyway
        self._zero_clamped = clip is not None and clip.kind == "value"

        # Item-weighted accumulation (num_items): the current window's item count (a host
        # int for int counts, a device tensor for tensor counts) and its summed loss; which
        # kind the window's micro-batches are; where counts are summed over ranks (decided
        # at the first such update per model); how many windows had no items.
        self._window_loss: Tensor | None = None
        self._window_items: Tensor | None = None
        self._window_host_items = 0
        self._plain_in_window = False
        self._items_group: ItemsGroup = num_items_group
        self._items_reduction: ItemsReduction | None = None
        self._last_loss: Tensor | None = None
        self._empty_windows: Tensor | None = None
        self._empty_mirror: HostMirror | None = None
        self._warned_empty = False

        self._model: Any = None
        self._pending_no_sync: AbstractContextManager[Any] | None = None
        self._no_sync: Callable[[Any], AbstractContextManager[Any]] = skip_gradient_sync
        self._model_type: type | None = None
        self._skips_sync = False  # decided per model by _bind_model
        self._custom_no_sync = False  # AmpOptimWrapper: its backend overrides no_sync()
        self._clip_fn: ClipFn | None = None
        # The flat parameter list clipping and the guard walk, rebuilt when the number of
        # groups or of parameters in them changes (add_param_group, params.extend(...)).
        self._params: list[Tensor] = []
        self._n_groups = -1
        self._n_params = -1
        self._rebuild_clip_fn()
        #: compile_step's compiled update (None: eager); compiled at the first update
        self._compiled: CompiledUpdate | None = None
        if compile_kwargs is not None:
            self._compiled = CompiledUpdate(self._update_body, compile_kwargs, type(self).__name__)
        self._optimizer_step: Callable[..., Any] | None = None  # compile_step's, at first use
        self._found_buf: Tensor | None = None  # compile_step: found_inf for a fused optimizer
        self._scaler_steps = False  # AmpOptimWrapper: its scaler steps a non-fused optimizer
        if "mmengine" in sys.modules:  # a dict lookup: plain loops never import the bridge
            join_mmengine(self)

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

        ``num_items``: ``loss`` is the *sum* of the losses of this many items (an int, or an
        integer tensor on any device), and the update divides the gradients by the item
        count of the whole window summed over the data-parallel ranks, instead of dividing
        each loss by the window length: the gradient of the mean over every item of the
        update, whatever the micro-batch sizes. Give it for every micro-batch of a window
        or for none. See docs/variable-size-batches.md.

        After an exception the wrapper stays usable: see ``backward`` and ``step`` for what
        each one leaves behind. If ``zero_grad(**zero_kwargs)`` raises, the step has been
        taken and the gradients are dropped anyway, so the next window starts from zero.
        """
        if num_items is None:
            self.backward(self.scale_loss(loss))
        else:
            self.backward(loss, num_items=num_items)
            if self._max_counts == -1 and not self._warned_unknown_end and self._accumulative_counts > 1:
                self._warn_unknown_end(self._accumulative_counts, stacklevel=3)
        if self.should_update():
            self.step(**(step_kwargs or _EMPTY))
            try:
                self.zero_grad(**(zero_kwargs or _EMPTY))
            except BaseException:
                self._abandon_step()
                raise

    def backward(
        self, loss: Tensor, *, num_items: int | Tensor | None = None, **kwargs: Any
    ) -> None:
        """``loss.backward(**kwargs)`` and count the micro-batch.

        A gradient-sync skip entered by ``optim_context`` ends here, after the backward,
        so FSDP (which reads its flag during backward) skips the collective too.
        ``num_items``: ``loss`` sums that many items' losses; the next ``step`` divides the
        gradients by the window's total (see ``update_params``). Errors are raised before
        anything runs. If the backward raises, the sync skip ends all the same and the
        micro-batch is not counted; gradients torch accumulated before the failure stay
        (they cannot be told apart): call ``zero_grad()`` to drop the window if that matters.
        """
        try:
            if num_items is None:
                if self._window_loss is not None:
                    raise ValueError(self._mixed_window_message("without"))
                self._scaled(loss).backward(**kwargs)  # type: ignore[no-untyped-call]
                self._plain_in_window = True
            else:
                count = self._check_items(num_items)
                self._scaled(loss).backward(**kwargs)  # type: ignore[no-untyped-call]
                self._add_items(loss, count)  # only once its gradients are there
        finally:
            if self._pending_no_sync is not None:
                self._release_no_sync()
        self._inner_count += 1

    def _scaled(self, loss: Tensor) -> Tensor:
        """The tensor backward runs on (AmpOptimWrapper: the loss times the loss scale)."""
        return loss

    def step(self, **kwargs: Any) -> None:
        """Clip (when configured) and step the optimizer.

        A window of ``num_items`` micro-batches first has its gradients divided by its
        item count over all data-parallel ranks (``_divide_by_items``), so the clip sees
        the norm of the per-item mean. With clipping, a step whose gradient norm is inf or
        nan never puts a non-finite value into the parameters, and needs no host sync to
        ensure it; the same holds for a ``num_items`` window without items. A fused
        optimizer skips such a step on the device (counted in ``skipped_steps``); any other
        one steps with zeroed gradients (counted in ``zeroed_steps``: momentum, weight decay
        and the optimizer's step count still act), unless ``exact_skip=True`` undoes it.

        If anything in here raises (a bad ``step_kwargs``, ``error_if_nonfinite``), the
        window's gradients are dropped (set to None) and nothing is counted, so the next
        window starts clean; the optimizer keeps whatever its failed ``step`` did.
        """
        try:
            empty = self._divide_by_items()
            if self._compiled is not None:
                self._compiled_step(None, empty, kwargs)
                return
            if self._clip_fn is None and empty is None:
                self.optimizer.step(**kwargs)
                return
            norm = None if self._clip_fn is None else self._clip_grads()
            if self._takes_found_inf:
                self._step_skipping(_bad_update(norm, empty), kwargs)
            elif self._exact_skip:
                self._step_restoring(norm, _bad_update(norm, empty), kwargs)
            else:
                self._step_zeroing(norm, empty, kwargs)
        except BaseException:
            self._abandon_step()
            raise

    def _step_skipping(self, found_inf: Tensor, kwargs: Mapping[str, Any]) -> None:
        """A fused optimizer skips a step itself, on the device, when ``found_inf`` > 0."""
        optimizer = self.optimizer
        optimizer.found_inf = found_inf  # type: ignore[attr-defined]
        try:
            optimizer.step(**kwargs)
        finally:
            del optimizer.found_inf  # type: ignore[attr-defined]
        self._count_skipped(found_inf)

    def _step_zeroing(self, norm: Tensor | None, empty: Tensor | None, kwargs: Mapping[str, Any]) -> None:
        """Any other optimizer steps with the gradients of a bad update zeroed (an empty
        window's are zero already: divided by an infinite count)."""
        if norm is not None:
            self._zero_nonfinite_grads(norm, [p.grad for p in self._params if p.grad is not None])
        self.optimizer.step(**kwargs)
        if empty is None and norm is not None:
            self._count_nonfinite(norm)  # no device work until the fold
        else:
            self._count_zeroed(_bad_update(norm, empty))

    def _step_restoring(
        self, norm: Tensor | None, found_inf: Tensor, kwargs: Mapping[str, Any],
        step: Callable[..., Any] | None = None, all_params: list[Tensor] | None = None,
    ) -> None:
        """``exact_skip``: a zeroed step, then undone on the device when ``found_inf`` > 0.

        What a step changes is the parameters with a gradient and their optimizer state.
        Both are copied before it and, for a bad update, copied back after it
        (``torch.where`` on the device: no host sync). Where that cannot be exact, decided
        on the host from the state's layout alone -- a parameter whose state the step is
        about to create, a state value that is not a tensor on the flag's device (the host
        step count of a non-capturable Adam on a GPU), or a state tensor the step replaced
        by one of another shape -- nothing is restored and the update counts as zeroed.
        ``step``, ``all_params``: what steps the optimizer and the flat parameter list
        (compile_step passes its own: decided outside the compiled code), by default
        ``optimizer.step`` and ``_flat_params()``.
        """
        if all_params is None:
            all_params = self._flat_params()
        params = [p for p in all_params if p.grad is not None]
        if norm is not None:
            self._zero_nonfinite_grads(norm, [p.grad for p in params if p.grad is not None])
        device = found_inf.device
        before = _step_tensors(self.optimizer, params, device)
        saved = None
        if before is not None:
            with torch.no_grad():
                saved = torch._foreach_mul(before, 1)  # copies, in their dtypes, in one call
        (self.optimizer.step if step is None else step)(**kwargs)
        after = None if saved is None else _step_tensors(self.optimizer, params, device)
        if (
            after is None
            or saved is None
            or len(after) != len(saved)
            or any(a.shape != s.shape or a.dtype != s.dtype for a, s in zip(after, saved))
        ):
            self._count_zeroed(found_inf)
            return
        skip = found_inf.reshape(()).bool()
        with torch.no_grad():  # where(), not a blend: a nan the step made must not survive
            for live, copy in zip(after, saved):
                torch.where(skip, copy, live, out=live)
        self._count_skipped(found_inf)

    def _zero_nonfinite_grads(self, norm: Tensor, grads: list[Tensor]) -> None:
        """Make the step of a non-finite norm a step with zero gradients, on the device."""
        # After clipping by an inf/nan norm every finite gradient is already 0 (clip
        # coefficient 0); value clipping leaves clamped values, so zero them here. Then the
        # nan ones become 0 too, and the step cannot put a non-finite value anywhere. No
        # foreach op maps nan to 0, hence the loop: a fused optimizer avoids its cost.
        if self._zero_clamped and grads:  # no gradients at all: step like mmengine
            torch._foreach_mul_(grads, torch.isfinite(norm).float())
        for grad in grads:
            grad.nan_to_num_(0.0, 0.0, 0.0)

    def _abandon_step(self) -> None:
        """Make the wrapper usable after an exception in ``step``: drop the window's
        gradients (they may be half unscaled, clipped or zeroed), its item count and any
        found_inf left on the optimizer, so the next window starts from zero."""
        self.optimizer.__dict__.pop("found_inf", None)
        self.optimizer.zero_grad(set_to_none=True)
        self._reset_window()

    # -- compile_step ---------------------------------------------------------------------

    def _update_body(
        self,
        params: list[Tensor],
        found: Tensor | None,
        empty: Tensor | None,
        kwargs: dict[str, Any],
    ) -> Tensor | None:
        """One update once the gradients are final: what ``compile_step`` compiles.

        The eager step's work, in one function: clip (when configured); then, for an
        update whose norm is inf or nan or (``num_items``) whose window held no item, the
        same guard as eagerly -- a fused optimizer skips on the device, any other one steps
        with zeroed gradients, or with ``exact_skip`` has the step undone -- counted
        through ``_count_*``, which under torch.compile add to ``skipped_steps`` and
        ``zeroed_steps`` as device arithmetic (no Python list grows, so nothing is compiled
        again for it); and the optimizer's step. ``found``: the scaler's found_inf after
        its unscale (None without a scaler); its skip is counted here, and a non-fused
        optimizer under a scaler is stepped by the scaler, outside (torch decides that
        skip on the host). A fused optimizer reads ``found_inf``, set by the caller: the
        scaler's, or ``_found_buf``, filled here. The caller decides the parameter list
        and every per-wrapper constant and does the host-side work before (the item
        count's all-reduce and division, the scaler's unscale).
        """
        step = self._optimizer_step
        assert step is not None
        norm = None
        if self._clip_fn is not None:
            # set before the step, as eagerly: a step post-hook logs it (hwoptim.mmengine)
            norm = self.last_grad_norm = self._clip_fn(params)
        if found is not None:  # a scaler: its found_inf says (an empty window included)
            self._count_skipped(found)
            if not self._scaler_steps:
                step(**kwargs)  # a fused optimizer, with the scaler's found_inf
            return norm
        if norm is None and empty is None:  # nothing to check
            if not self._scaler_steps:
                step(**kwargs)
            return norm
        bad = _bad_update(norm, empty)
        if self._takes_found_inf:
            assert self._found_buf is not None
            self._found_buf.copy_(bad)
            step(**kwargs)
            self._count_skipped(bad)
        elif self._exact_skip:
            self._step_restoring(norm, bad, kwargs, step, params)
        else:
            if norm is not None:  # compiled, this pass fuses with the clip
                self._zero_nonfinite_grads(norm, [p.grad for p in params if p.grad is not None])
            step(**kwargs)
            self._count_zeroed(bad)
        return norm

    def _compiled_step(
        self, found: Tensor | None, empty: Tensor | None, kwargs: dict[str, Any]
    ) -> None:
        """Run one update through compile_step's function; see ``_update_body``."""
        compiled = self._compiled
        assert compiled is not None
        optimizer = self.optimizer
        params = self._flat_params()
        checked = found is not None or empty is not None or self._clip_fn is not None
        if checked and (self._skipped is None or self._zeroed is None or self._found_buf is None):
            self._init_counters(params)
        sets_found = checked and self._takes_found_inf
        if sets_found:
            # set here rather than in the compiled function: no try/finally to trace
            optimizer.found_inf = self._found_buf if found is None else found  # type: ignore[attr-defined]
        args = (params, found, empty, kwargs)
        try:
            if compiled.ready:
                norm = compiled(*args)
            else:
                self._optimizer_step = _unpatched_step(optimizer)
                norm = compiled.first_call(self._undo_first_call, *args)
        finally:
            if sets_found:
                del optimizer.found_inf  # type: ignore[attr-defined]
        if norm is not None:
            self.last_grad_norm = norm
        if getattr(optimizer.step, "_wrapped_by_lr_sched", False):
            optimizer._opt_called = True  # type: ignore[attr-defined] # what the wrapper notes

    def _init_counters(self, params: list[Tensor]) -> None:
        """Device tensors for the skip counts and a fused optimizer's found_inf before the
        first compiled update: their None-ness would be compiled into it otherwise."""
        self._fold_skipped()
        device = params[0].device if params else torch.device("cpu")
        zero = torch.zeros((), dtype=torch.float32, device=device)
        if self._skipped is None:
            self._skipped = zero.clone()
        if self._zeroed is None:
            self._zeroed = zero.clone()
        self._found_buf = zero

    def _undo_first_call(self) -> Callable[[], None]:
        """Save what the update body changes before the optimizer's step (the gradients,
        the counts); the function returned puts it back. compile_step's first call, which
        may fail inside the compiler halfway, is undone so before it runs uncompiled."""
        grads = [p.grad for p in self._flat_params() if p.grad is not None]
        saved = [g.detach().clone() for g in grads]
        counts = (self._skipped, self._zeroed, self.last_grad_norm)

        def undo() -> None:
            with torch.no_grad():
                for grad, value in zip(grads, saved):
                    grad.copy_(value)
            self._skipped, self._zeroed, self.last_grad_norm = counts

        return undo

    def zero_grad(self, **kwargs: Any) -> None:
        """``optimizer.zero_grad(**kwargs)``; an item count gathered since the last step is
        dropped with the gradients it described."""
        self.optimizer.zero_grad(**kwargs)
        self._reset_window()

    # -- item-weighted accumulation (num_items) ---------------------------------------------

    @property
    def last_loss(self) -> Tensor | None:
        """The item-weighted mean loss of the last update, as a device tensor.

        With ``num_items``: the sum of the window's losses over all data-parallel ranks
        divided by their total item count, i.e. the mean loss per item of exactly what the
        update optimised (nan for a window without items). None when the last update was
        made without ``num_items`` (then the loss you passed is the number to log) or
        before the first update. Reading its value is a host sync: log it every N steps.
        """
        self._check_empty_windows()
        return self._last_loss

    def _check_items(self, num_items: Any) -> int | Tensor:
        """A micro-batch's count, checked on the host (no device read) before its backward."""
        count = check_num_items(num_items)
        if self._plain_in_window:
            raise ValueError(self._mixed_window_message("with"))
        return count

    def _add_items(self, loss: Tensor, count: int | Tensor) -> None:
        """Add a micro-batch's count and summed loss to the window, on the device: no
        host sync (an int count stays on the host)."""
        summed = loss.detach().float()
        if self._window_loss is not None:
            summed = self._window_loss + summed
        if isinstance(count, int):
            self._window_host_items += count  # ints stay on the host: a copy would wait
        else:
            count = count.to(summed.device, torch.float32, non_blocking=True)
            if self._window_items is not None:
                count = self._window_items + count
            self._window_items = count
        self._window_loss = summed

    def _mixed_window_message(self, kind: str) -> str:
        other = "without" if kind == "with" else "with"
        return (
            f"a micro-batch {kind} num_items in an accumulation window whose earlier "
            f"micro-batches were {other} it: give num_items for every micro-batch of a "
            "window (the loss summed over its items) or for none (the loss a mean)"
        )

    def _divide_by_items(self) -> Tensor | None:
        """At an update: divide the gradients by the window's item count over all
        data-parallel ranks, so they are the gradient of the mean over every item.

        Runs before unscaling and clipping, so the clip sees the true norm. Returns None
        when the window gave no ``num_items``, else a float32 flag, 1.0 when the window
        held no item: its gradients stay zero and the caller skips the update like a
        non-finite one (counted in ``skipped_steps``).
        """
        totals = self._window_totals()
        if totals is None:
            return None
        items, loss_sum, divisor = totals
        return self._divide_grads(items, loss_sum, divisor)

    def _window_totals(self) -> tuple[Tensor, Tensor, float] | None:
        """The window's (items, loss sum) over all data-parallel ranks and the divisor the
        gradient collective used; resets the window. Host bookkeeping and one all-reduce
        of ``[items, loss]`` (a collective, not a host sync); None without ``num_items``."""
        loss_sum = self._window_loss
        if loss_sum is None:
            self._plain_in_window = False
            self._last_loss = None
            return None
        items = self._window_items
        host_items = self._window_host_items
        self._reset_window()
        if items is None:
            items = torch.full_like(loss_sum, host_items)
        elif host_items:
            items = items + host_items
        reduction = self._items_reduction
        if reduction is None:
            reduction = self._items_reduction = items_reduction(self._model, self._items_group)
        if reduction.groups:
            totals = torch.stack([items, loss_sum])
            all_reduce_sum(totals, reduction)
            items, loss_sum = totals[0], totals[1]
        return items, loss_sum, reduction.divisor

    def _divide_grads(self, items: Tensor, loss_sum: Tensor, divisor: float) -> Tensor:
        """Tensor work only, no branch on a value: the gradients divided by
        ``items / divisor`` (DDP/FSDP already divided by ``divisor``, the data-parallel
        size: this turns their mean into the per-item one); ``last_loss``; the flag of a
        window without items, counted for the warning."""
        empty = items <= 0
        # Divide (not multiply by a reciprocal rounded to float32): a float64 model gets
        # its gradients divided by the exact count. An empty window divides by inf: its
        # gradients, zero sums over no item, stay zero.
        per_item = torch.where(empty, torch.inf, items / divisor)
        grads = [p.grad for p in self._flat_params() if p.grad is not None]
        if grads:
            torch._foreach_div_(grads, per_item)
        self._last_loss = loss_sum / items
        flag = empty.float()
        self._empty_windows = flag if self._empty_windows is None else self._empty_windows + flag
        return flag

    def _reset_window(self) -> None:
        self._window_loss = self._window_items = None
        self._window_host_items = 0
        self._plain_in_window = False

    def _check_empty_windows(self) -> None:
        """Warn once that windows without items were skipped, when the host can tell
        without waiting: called where the user reads the counters to log them."""
        empty = self._empty_windows
        if empty is None or self._warned_empty:
            return
        if self._empty_mirror is None:
            self._empty_mirror = HostMirror(empty.device)
        seen = self._empty_mirror.refresh(empty)
        if seen:
            self._warned_empty = True
            warnings.warn(
                f"{int(seen)} update(s) had no items (num_items summed to 0 over the window "
                "and every data-parallel rank): they were skipped (counted in skipped_steps) "
                "or, for a non-fused optimizer, stepped with zero gradients (zeroed_steps); "
                "check the data (all padding?) or the count you pass",
                UserWarning,
                stacklevel=3,
            )

    def optim_context(self, model: Any) -> AbstractContextManager[None]:
        """Run the forward of ``model`` in here; it skips the gradient sync while accumulating.

        On a micro-batch that will not update, the model's gradient synchronisation (DDP and
        FSDP ``no_sync()``, FSDP2 ``set_requires_gradient_sync(False)``) is switched off on
        entry and stays off until the backward of that micro-batch has run, whether
        ``update_params`` is called inside this block or after it (mmengine's pattern).
        It must outlive the block: DDP reads its flag in the forward, but FSDP1 and FSDP2
        read theirs in the backward, so a skip that ended with the block (as mmengine's
        does) would leave FSDP communicating on every micro-batch. How the model's sync is
        switched is its backend's ``no_sync(model)``. AmpOptimWrapper also runs the forward
        in autocast here. A plain module has no gradient sync to skip; for it (in fp32) this
        does nothing.
        """
        return _OptimContext(self, model, self._forward_context())

    def _forward_context(self) -> AbstractContextManager[Any] | None:
        """A context the forward runs in besides the sync skip (AmpOptimWrapper: autocast)."""
        return None

    # -- accumulation counters (mmengine's arithmetic) -------------------------------------

    def initialize_count_status(
        self, model: Any, init_counts: int, max_counts: int | None
    ) -> None:
        """Tell the wrapper where training resumes and where it ends.

        ``max_counts`` (usually ``len(loader) * epochs``) lets the last, shorter window step
        with the right loss factor; ``None`` means the end is unknown. Warns on a resume
        inside a window unless ``load_state_dict`` restored that window's gradients (saved
        with ``save_partial_grads=True``), since its earlier micro-batches are lost
        otherwise, and on BatchNorm with accumulation (batch statistics see micro-batches,
        not the whole window).
        """
        init_counts = check_int(init_counts, "init_counts", 0)
        if max_counts is not None:
            number = as_int(max_counts)
            if number is None or number < 0:
                raise ValueError(f"max_counts must be an int >= 0 or None; got {max_counts!r}")
            max_counts = number
        if max_counts is not None and init_counts > max_counts:
            raise ValueError(
                f"init_counts ({init_counts}) is past max_counts ({max_counts}); "
                "pass the iteration training resumes at and the total number of iterations"
            )
        if model is not None:
            self._bind_model(model)
        acc = self._accumulative_counts
        mid_window = init_counts % acc != 0 and init_counts != max_counts  # max: the last one ended
        if mid_window and init_counts != self._grads_restored_at:
            warnings.warn(
                f"Resumed iteration number {init_counts} is not divisible by "
                f"accumulative_counts={acc}: the first window after resuming misses "
                f"{init_counts % acc} micro-batch(es) whose gradients were not saved; "
                "build the wrapper with save_partial_grads=True to save them in "
                "state_dict(), or checkpoint at the end of a window",
                UserWarning,
                stacklevel=2,
            )
        if acc > 1 and _has_batch_norm(model):
            warnings.warn(
                "Gradient accumulative may slightly decrease performance because the model "
                "has BatchNorm layers: their statistics see each micro-batch, not the window",
                UserWarning,
                stacklevel=2,
            )
        self._inner_count = init_counts
        if max_counts is None:
            self._max_counts = self._remainder_counts = -1
            self._warned_unknown_end = True  # the caller said so on purpose
        else:
            self._max_counts = max_counts
            self._remainder_counts = max_counts % acc

    def should_update(self) -> bool:
        """Whether the micro-batch just backpropagated ends a window (checked after backward).

        Right after ``update_params`` it tells whether that call stepped the optimizer: the
        place to step a per-update lr scheduler.
        """
        return (
            self._inner_count % self._accumulative_counts == 0
            or self._inner_count == self._max_counts
        )

    def should_sync(self) -> bool:
        """Whether the coming micro-batch ends a window, so its gradients must be synced."""
        following = self._inner_count + 1
        return following % self._accumulative_counts == 0 or following == self._max_counts

    def scale_loss(self, loss: Tensor) -> Tensor:
        """Divide the loss by the length of its accumulation window.

        Windows hold ``accumulative_counts`` micro-batches, except the last one before
        ``max_counts``, which holds the remainder. Past ``max_counts`` windows are full again
        (mmengine divides by zero there).
        """
        acc = self._accumulative_counts
        if acc == 1:
            return loss
        return loss / self._loss_factor(acc)

    def _loss_factor(self, acc: int) -> int:
        max_counts = self._max_counts
        if max_counts == -1:
            if not self._warned_unknown_end:
                self._warn_unknown_end(acc, stacklevel=5)  # user > update_params > scale_loss
            return acc
        inner = self._inner_count
        if inner >= max_counts or inner < max_counts - self._remainder_counts:
            return acc
        return self._remainder_counts

    def _warn_unknown_end(self, acc: int, stacklevel: int) -> None:
        self._warned_unknown_end = True
        warnings.warn(
            f"accumulating gradients over {acc} micro-batches without "
            "initialize_count_status(model, init_counts, max_counts): the last, "
            "partial window of training will not step; call it with the total "
            "number of iterations (or max_counts=None to say the end is unknown)",
            UserWarning,
            stacklevel=stacklevel,
        )

    @property
    def inner_count(self) -> int:
        """Micro-batches backpropagated so far (resumed runs start at init_counts)."""
        return self._inner_count

    @property
    def accumulative_counts(self) -> int:
        """Micro-batches per optimizer update (accelerate calls it gradient_accumulation_steps)."""
        return self._accumulative_counts

    @property
    def loss_scale(self) -> Tensor | None:
        """The loss scale as a device tensor; None here (no scaler), see AmpOptimWrapper."""
        return None

    # -- observability without host syncs ----------------------------------------------------

    @property
    def skipped_steps(self) -> Tensor | None:
        """How many updates were really skipped (parameters and optimizer state untouched)
        because a gradient was inf or nan, or (``num_items``) the window held no item, as a
        device tensor.

        Real skips are those of a loss scaler, of a fused optimizer (which takes found_inf)
        and of ``exact_skip``. None until a step has been checked (checks happen when
        clipping or loss scaling is on, or with ``num_items``). Read it every N steps for
        logging; reading its value is a host sync.
        """
        self._fold_skipped()
        self._check_empty_windows()
        return self._skipped

    @property
    def zeroed_steps(self) -> Tensor | None:
        """How many updates had an inf or nan gradient (or, with ``num_items``, no item) and
        were stepped with zeroed gradients instead of skipped, as a device tensor (None
        until a step has been checked).

        This is what a non-fused optimizer gets without a loss scaler: no non-finite value
        reaches the parameters, but momentum, weight decay and the optimizer's step count
        act as for a zero gradient. A fused optimizer (``fused=True``) or
        ``exact_skip=True`` skips these steps for real, on the device.
        """
        self._fold_skipped()
        self._check_empty_windows()
        return self._zeroed

    def _count_skipped(self, found_inf: Tensor) -> None:
        """Note an update's found_inf (> 0: skipped). No device work until the fold."""
        if torch.compiler.is_compiling():
            self._count_on_device(found_inf > 0, zeroed=False)
            return
        self._pending_found.append(found_inf)
        if len(self._pending_found) >= _FOLD_EVERY:
            self._fold_skipped()

    def _count_nonfinite(self, norm: Tensor) -> None:
        """Note the norm of an update stepped with zeroed gradients (inf/nan: zeroed)."""
        if torch.compiler.is_compiling():
            self._count_on_device(~torch.isfinite(norm), zeroed=True)
            return
        self._pending_norms.append(norm)
        if len(self._pending_norms) >= _FOLD_EVERY:
            self._fold_skipped()

    def _count_zeroed(self, found_inf: Tensor) -> None:
        """Note the flag of an update stepped with zeroed gradients (> 0: zeroed)."""
        if torch.compiler.is_compiling():
            self._count_on_device(found_inf > 0, zeroed=True)
            return
        self._pending_zeroed.append(found_inf)
        if len(self._pending_zeroed) >= _FOLD_EVERY:
            self._fold_skipped()

    def _count_on_device(self, flag: Tensor, *, zeroed: bool) -> None:
        """Add ``flag`` (a bool tensor) to ``zeroed_steps`` or ``skipped_steps`` now, as
        device arithmetic.

        For code compiled by torch.compile (compile_step's update, or a user's compiled
        train step calling ``update_params``): appending to the pending lists would change
        the Python state the compiled code is guarded on, and compile it again at every
        update.
        """
        one = flag.reshape(()).float()
        skipped = torch.zeros_like(one) if self._skipped is None else self._skipped
        count = torch.zeros_like(one) if self._zeroed is None else self._zeroed
        if zeroed:
            count = count + one.to(count.device)
        else:
            skipped = skipped + one.to(skipped.device)
        self._skipped, self._zeroed = skipped, count  # both exist once either does, as eagerly

    def _fold_skipped(self) -> None:
        """Fold the pending records into skipped_steps and zeroed_steps, on the device."""
        found, norms, flags = self._pending_found, self._pending_norms, self._pending_zeroed
        if not found and not norms and not flags:
            return
        device = (found or norms or flags)[-1].device  # where the gradients are now
        skipped = torch.zeros((), dtype=torch.float32, device=device)
        zeroed = torch.zeros((), dtype=torch.float32, device=device)
        if found:
            skipped += (torch.stack([f.reshape(()).to(device) for f in found]) > 0).sum()
        if norms:
            zeroed += (~torch.isfinite(torch.stack([n.reshape(()).to(device) for n in norms]))).sum()
        if flags:
            zeroed += (torch.stack([f.reshape(()).to(device) for f in flags]) > 0).sum()
        self._skipped = skipped if self._skipped is None else self._skipped.to(device) + skipped
        self._zeroed = zeroed if self._zeroed is None else self._zeroed.to(device) + zeroed
        found.clear()
        norms.clear()
        flags.clear()

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

        With ``save_partial_grads=True`` and inside a window, ``"hwoptim"`` also holds
        ``"grads"``: {index: gradient} in the optimizer state dict's parameter numbering
        (parameters without a gradient are left out), ``"grads_rank"``: the data-parallel
        rank they belong to, and with ``num_items`` ``"items_window"``: the window's item
        count and loss sum so far. Like the optimizer's state, the tensors are the live
        ones, not copies: save the dict (``torch.save``) before training on.
        """
        state = self.optimizer.state_dict()
        counters: dict[str, Any] = {
            "inner_count": self._inner_count,
            "max_counts": self._max_counts,
            "accumulative_counts": self._accumulative_counts,
        }
        if self._save_partial_grads and not self.should_update():
            if _keeps_own_grads(self._model):
                warnings.warn(
                    "save_partial_grads: this model is FSDP-sharded, and FSDP keeps the "
                    "window's gradients inside itself, not in the parameters' .grad: they "
                    "are not saved, and a resume from this checkpoint misses the window's "
                    "earlier micro-batches; checkpoint at the end of a window instead",
                    UserWarning,
                    stacklevel=2,
                )
            else:
                params = self._flat_params()
                counters["grads"] = {
                    i: p.grad.detach() for i, p in enumerate(params) if p.grad is not None
                }
                counters["grads_rank"] = _rank()
                if self._window_loss is not None:  # num_items: the window's count so far
                    counters["items_window"] = {
                        "loss": self._window_loss,
                        "items": self._window_items,
                        "host_items": self._window_host_items,
                    }
        state[STATE_KEY] = counters
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict from hwoptim or mmengine (or a bare optimizer state dict).

        The argument is never modified. Everything is checked first: on a mismatch this
        raises before any state has changed.
        """
        plan = self._check_state_dict(state_dict)
        self._apply_state_dict(state_dict, plan)

    def _check_state_dict(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """Validate ``state_dict`` against this wrapper; return what to apply."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict; got {type(state_dict).__name__}")
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(
                    f"not an optimizer state dict: it has no {key!r} key "
                    f"(keys: {sorted(map(str, state_dict))})"
                )
        saved_groups = state_dict["param_groups"]
        groups = self.optimizer.param_groups
        if len(saved_groups) != len(groups):
            raise ValueError(
                f"the state dict has {len(saved_groups)} parameter group(s), "
                f"the optimizer has {len(groups)}"
            )
        for i, (saved, group) in enumerate(zip(saved_groups, groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"parameter group {i}: the state dict has {len(saved['params'])} "
                    f"parameter(s), the optimizer has {len(group['params'])}"
                )
        plan: dict[str, Any] = {}
        counters = state_dict.get(STATE_KEY)
        if counters is not None:
            plan["counters"] = self._check_counters(counters)
            if "grads" in counters:
                plan["grads"] = self._check_grads(counters["grads"], counters.get("grads_rank", 0))
                if plan["grads"] is not None:
                    plan["items_window"] = _check_items_window(counters.get("items_window"))
        return plan

    def _check_grads(self, grads: Any, rank: Any) -> list[Tensor | None] | None:
        """The saved partial gradients, one per parameter (None: no gradient); None when
        they belong to another data-parallel rank and cannot be used here."""
        where = f"state dict entry {STATE_KEY}.grads"
        if not isinstance(grads, Mapping):
            raise ValueError(f"{where} must be a dict {{index: tensor}}; got {type(grads).__name__}")
        rank = check_int(rank, f"state dict entry {STATE_KEY}.grads_rank", 0)
        params = self._flat_params()
        restored: list[Tensor | None] = [None] * len(params)
        for index, grad in grads.items():
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(params):
                raise ValueError(
                    f"{where}: {index!r} is not a parameter index of this optimizer "
                    f"(0 to {len(params) - 1})"
                )
            if not isinstance(grad, Tensor) or not grad.is_floating_point():
                raise ValueError(f"{where}[{index}] must be a floating-point tensor; got {grad!r:.80}")
            if grad.shape != params[index].shape:
                raise ValueError(
                    f"{where}[{index}] has shape {tuple(grad.shape)}, the parameter "
                    f"{tuple(params[index].shape)}"
                )
            restored[index] = grad
        here = _rank()
        if rank != here:
            warnings.warn(
                f"the checkpoint's partial gradients were saved by data-parallel rank {rank}, "
                f"this is rank {here}: they are not loaded here, and this rank's first window "
                "after resuming misses its earlier micro-batches. Save and load each rank's "
                "own state_dict() for an exact resume (docs/checkpoints.md)",
                UserWarning,
                stacklevel=4,
            )
            return None
        return restored

    def _check_counters(self, counters: Any) -> tuple[int, int]:
        if not isinstance(counters, Mapping):
            raise ValueError(f"state dict entry {STATE_KEY!r} must be a dict; got {counters!r}")
        try:
            inner, max_counts, acc = (
                counters["inner_count"],
                counters["max_counts"],
                counters["accumulative_counts"],
            )
        except KeyError as exc:
            raise ValueError(f"state dict entry {STATE_KEY!r} lacks {exc.args[0]!r}") from None
        inner = check_int(inner, f"state dict {STATE_KEY}.inner_count", 0)
        max_counts = check_int(max_counts, f"state dict {STATE_KEY}.max_counts", -1)
        acc = check_int(acc, f"state dict {STATE_KEY}.accumulative_counts", 1)
        if acc != self._accumulative_counts:
            warnings.warn(
                f"the checkpoint was saved with accumulative_counts={acc}; this wrapper uses "
                f"{self._accumulative_counts}: windows follow the new value from here on",
                UserWarning,
                stacklevel=4,
            )
        return inner, max_counts

    def _apply_state_dict(self, state_dict: Mapping[str, Any], plan: dict[str, Any]) -> None:
        optimizer_state = {k: v for k, v in state_dict.items() if k not in _WRAPPER_KEYS}
        self.optimizer.load_state_dict(optimizer_state)
        if "counters" in plan:
            inner, max_counts = plan["counters"]
            self._inner_count = inner
            self._max_counts = max_counts
            self._remainder_counts = -1 if max_counts == -1 else max_counts % self._accumulative_counts
        if plan.get("grads") is not None:
            self._restore_grads(plan["grads"])
            self._restore_items_window(plan["items_window"])
        self._n_groups = self._n_params = -1  # parameters may have been re-grouped

    def _restore_grads(self, grads: list[Tensor | None]) -> None:
        """Put a window's saved gradients back: copies, on each parameter's device and in
        its dtype; a parameter without a saved gradient gets none."""
        for param, grad in zip(self._flat_params(), grads):
            param.grad = None if grad is None else grad.to(param.device, param.dtype, copy=True)
        self._grads_restored_at = self._inner_count

    def _restore_items_window(self, window: tuple[Tensor, Tensor | None, int] | None) -> None:
        """The num_items count of the restored window (none: its micro-batches had none)."""
        self._reset_window()
        if window is None:
            return
        loss, items, host_items = window
        params = self._flat_params()
        device = params[0].device if params else loss.device
        self._window_loss = loss.to(device, torch.float32, copy=True)
        self._window_items = None if items is None else items.to(device, torch.float32, copy=True)
        self._window_host_items = host_items

    # -- copies: pickle, torch.save, copy.deepcopy ------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """What a copy holds: everything but the binding to a model.

        A copy (``pickle``, ``torch.save``, ``copy.deepcopy``) gets its own optimizer with
        its state, the counters, the clip config, the loss scaler and the logged tensors.
        It holds no model: the model is the caller's, and copying it along would duplicate
        the weights or fail (DDP and FSDP modules do not pickle). So, like a new wrapper,
        a copy learns its model at the next ``optim_context`` or
        ``initialize_count_status``, and rebuilds from it what derives from it: the clip
        function (FSDP1 clips through its module), the sync skip, the parameter list, the
        groups ``num_items`` are summed over. A sync skip entered by a forward whose
        backward has not run stays with the original. Under mmengine the copy logs to the
        MessageHub as the original does (torch does not copy the optimizer's hooks: the
        copy adds its own).
        To continue training a copy, copy the model with it, in one call, so that the
        copied optimizer steps the copied model's parameters::

            model2, wrapper2 = copy.deepcopy((model, wrapper))
        """
        state = self.__dict__.copy()
        for key in _BINDING:
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        for key, unbound in _BINDING.items():
            setattr(self, key, [] if key == "_params" else unbound)
        self._rebuild_clip_fn()
        if "mmengine" in sys.modules:  # the optimizer's logging hook is not copied: add it
            join_mmengine(self)

    # -- internals ----------------------------------------------------------------------------

    def _enter_micro_batch(self, model: Any) -> None:
        # fully_shard (FSDP2) changes a module's class in place: that is a new model too
        if model is not self._model or type(model) is not self._model_type:
            self._bind_model(model)
        if self._pending_no_sync is not None:  # a forward whose backward never ran
            self._release_no_sync()
        if self._skips_sync and not self.should_sync():
            context = self._no_sync(model)
            context.__enter__()
            self._pending_no_sync = context

    def _release_no_sync(self) -> None:
        context, self._pending_no_sync = self._pending_no_sync, None
        if context is not None:
            context.__exit__(None, None, None)

    def _bind_model(self, model: Any) -> None:
        """Remember the model: it decides how to skip syncs and (FSDP1) how to clip."""
        self._check_params_of(model)  # first: a refused model is not remembered
        self._model = model
        self._model_type = type(model)
        # Decided once per model: skipping needs a window to skip in and a collective to
        # skip; entering a no-op context per micro-batch costs as much as a small kernel.
        # A backend with its own no_sync (a vendor's data-parallel wrapper) is always asked.
        self._skips_sync = self._accumulative_counts > 1 and (
            self._custom_no_sync or has_gradient_sync(model)
        )
        self._items_reduction = None  # found again for this model at its first update
        self._rebuild_clip_fn()

    def _check_params_of(self, model: Any) -> None:
        """Once per model: the optimizer's parameters must be where the model computes.

        An optimizer built before ``model.to(device)`` breaks this on every device whose
        tensors are not shallow-copy compatible with the CPU's (all out-of-tree ones, such
        as NPUs and hwoptim.testing.emulated): ``to()`` gives the module new parameters and
        the optimizer keeps stepping the old CPU ones, so training silently does nothing.
        Only a parameter on another device type than the wrapper's (or, for a wrapper
        without a device, than every parameter of the model) is refused: parameters that are
        merely not the model's (a learnable loss temperature, the other model of a GAN) are
        fine, as in mmengine.
        """
        if not isinstance(model, torch.nn.Module):
            return
        device = self._placement_device()
        if device is not None:
            allowed = {device.type}
        else:
            allowed = {p.device.type for p in model.parameters()}
            if len(allowed) != 1:  # no parameters, or a model spread over devices on purpose
                return
        misplaced = [p for p in self._flat_params() if p.device.type not in allowed]
        if not misplaced:
            return
        first = misplaced[0]
        where = f"the wrapper's device {device}" if device is not None else f"the model's device ({allowed.pop()})"
        advice = _MMENGINE_PLACEMENT if "mmengine.runner" in sys.modules else ""
        raise RuntimeError(
            f"{len(misplaced)} of the optimizer's parameters are not on {where} (the first: "
            f"shape {tuple(first.shape)} on {first.device}). Move the model to the device "
            "before building the optimizer: on many devices model.to(device) replaces the "
            "parameters, and an optimizer built earlier keeps the old ones. For example: "
            "device = hwoptim.get_backend('auto').device(); model.to(device); then build the "
            f"optimizer and the wrapper (device=device){advice}"
        )

    def _placement_device(self) -> torch.device | None:
        """The device the parameters must be on; None here (AmpOptimWrapper has one)."""
        return None

    def _rebuild_clip_fn(self) -> None:
        if self._clip is not None:
            scaled = self.loss_scaler is not None
            self._clip_fn = self._clip.clip_fn(self._model, scaled=scaled)

    def _clip_grads(self) -> Tensor:
        assert self._clip_fn is not None
        norm = self._clip_fn(self._flat_params())
        self.last_grad_norm = norm
        return norm

    def _flat_params(self) -> list[Tensor]:
        """All the optimizer's parameters, group after group.

        Rebuilt when the number of groups or of parameters changes: add_param_group, a
        reload, or a group's list extended in place (progressive unfreezing). Counting is
        one pass in C over the groups, a fraction of what clipping itself spends in Python
        per parameter; a parameter swapped for another in place (same count) is not seen.
        """
        groups = self.optimizer.param_groups
        n_params = sum(map(len, map(_GROUP_PARAMS, groups)))
        if n_params != self._n_params or len(groups) != self._n_groups:
            self._params = [p for group in groups for p in group["params"]]
            self._n_groups = len(groups)
            self._n_params = n_params
        return self._params

    def __repr__(self) -> str:
        lines = [
            f"{type(self).__name__}(",
            f"  accumulative_counts={self._accumulative_counts},",
            f"  clip_grad={self._clip!r},",
            *self._repr_compile(),
            *self._repr_extra(),
            "  optimizer=" + repr(self.optimizer).replace("\n", "\n  "),
            ")",
        ]
        return "\n".join(lines)

    def _repr_extra(self) -> list[str]:
        return []

    def _repr_compile(self) -> list[str]:
        compiled = self._compiled
        if compiled is None:
            return []
        state = "" if compiled.compiled else f"  # uncompiled: {compiled.reason}"
        return [f"  compile_step={compiled.kwargs or True!r},{state}"]


class _OptimContext:
    """What ``optim_context`` returns, one per micro-batch.

    A plain class rather than a generator-based context manager: the forward of every
    micro-batch enters one, and this costs a fifth as much. On entry the wrapper starts the
    micro-batch (sync skip), then ``inner`` (autocast) is entered; on exit ``inner`` is left
    first. An exception releases the sync skip, since no backward will end it.
    """

    __slots__ = ("_inner", "_model", "_wrapper")

    def __init__(self, wrapper: OptimWrapper, model: Any, inner: AbstractContextManager[Any] | None):
        self._wrapper = wrapper
        self._model = model
        self._inner = inner

    def __enter__(self) -> None:
        self._wrapper._enter_micro_batch(self._model)
        if self._inner is not None:
            try:
                self._inner.__enter__()
            except BaseException:
                self._wrapper._release_no_sync()
                raise

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        try:
            if self._inner is not None:
                self._inner.__exit__(exc_type, exc, traceback)
        finally:
            if exc_type is not None:
                self._wrapper._release_no_sync()

