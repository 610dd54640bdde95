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
import sys
import warnings
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any, Callable

import torch
from torch import Tensor

from hwoptim.backends.base import has_gradient_sync, skip_gradient_sync
from hwoptim.clip import ClipFn, ClipGrad, parse_clip_grad
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
#: updates between two folds of the lazily kept skip records into skipped_steps
_FOLD_EVERY = 256


def check_accumulative_counts(value: Any) -> int:
    """accumulative_counts must be an int >= 1 (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"accumulative_counts must be an int >= 1; got {value!r}")
    return value


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


def _found_inf(norm: Tensor) -> Tensor:
    """1.0 where ``norm`` is inf or nan, else 0.0, as a float32 tensor on norm's device."""
    found = (norm * 0.0).nan_to_num_(nan=1.0)  # inf*0 and nan*0 are nan; finite*0 is 0
    return found if found.dtype == torch.float32 else found.float()


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
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "optimizer must be a torch.optim.Optimizer (build one first, or use "
                f"hwoptim.build_optim_wrapper with a config); got {type(optimizer).__name__}"
            )
        check_accumulative_counts(accumulative_counts)
        clip = parse_clip_grad(clip_grad)
        if isinstance(num_items_group, str) and num_items_group not in ("auto", "local"):
            raise ValueError(
                f"num_items_group must be 'auto', 'local' or a ProcessGroup; got {num_items_group!r}"
            )

        self.optimizer = optimizer
        self._accumulative_counts = accumulative_counts
        self._clip: ClipGrad | None = clip
        #: mmengine's view of the clip config: the keyword arguments, without "type"
        self.clip_grad_kwargs: dict[str, Any] | None = None if clip is None else clip.kwargs
        self._inner_count = 0
        self._max_counts = -1
        self._remainder_counts = -1
        self._warned_unknown_end = False

        #: the total gradient norm before the last clipping, as a device tensor (None until
        #: then); turning it into a number is a host sync, so log it every N steps
        self.last_grad_norm: Tensor | None = None
        self._skipped: Tensor | None = None
        # Skips are counted lazily: each update only appends its found_inf (a fused
        # optimizer's or the scaler's) or its norm (non-finite = skipped) here, and the
        # lists are folded into _skipped every _FOLD_EVERY updates or when it is read.
        self._pending_found: list[Tensor] = []
        self._pending_norms: list[Tensor] = []
        self._takes_found_inf = _takes_found_inf(optimizer)
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
        self._params: list[Tensor] = []
        self._n_groups = -1
        self._rebuild_clip_fn()
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
        """
        if num_items is None:
            self.backward(self.scale_loss(loss))
        else:
            self.backward(loss, num_items=num_items)
            if self._max_counts == -1 and not self._warned_unknown_end and self._accumulative_counts > 1:
                self._warn_unknown_end(self._accumulative_counts, stacklevel=3)
        if self.should_update():
            self.step(**(step_kwargs or _EMPTY))
            self.zero_grad(**(zero_kwargs or _EMPTY))

    def backward(
        self, loss: Tensor, *, num_items: int | Tensor | None = None, **kwargs: Any
    ) -> None:
        """``loss.backward(**kwargs)`` and count the micro-batch.

        A gradient-sync skip entered by ``optim_context`` ends here, after the backward,
        so FSDP (which reads its flag during backward) skips the collective too.
        ``num_items``: ``loss`` sums that many items' losses; the next ``step`` divides the
        gradients by the window's total (see ``update_params``). Errors are raised before
        anything runs.
        """
        if num_items is None:
            if self._window_loss is not None:
                raise ValueError(self._mixed_window_message("without"))
            self._scaled(loss).backward(**kwargs)  # type: ignore[no-untyped-call]
            self._plain_in_window = True
        else:
            count = self._check_items(num_items)
            self._scaled(loss).backward(**kwargs)  # type: ignore[no-untyped-call]
            self._add_items(loss, count)  # only once its gradients are there
        self._inner_count += 1
        if self._pending_no_sync is not None:
            self._release_no_sync()

    def _scaled(self, loss: Tensor) -> Tensor:
        """The tensor backward runs on (AmpOptimWrapper: the loss times the loss scale)."""
        return loss

    def step(self, **kwargs: Any) -> None:
        """Clip (when configured) and step the optimizer.

        A window of ``num_items`` micro-batches first has its gradients divided by its
        item count over all data-parallel ranks (``_divide_by_items``), so the clip sees
        the norm of the per-item mean. With clipping, a step whose gradient norm is inf or nan never puts a non-finite
        value into the parameters, and needs no host sync to ensure it: a fused optimizer
        skips the step on the device; any other one steps with zeroed gradients.
        ``skipped_steps`` counts these steps.
        """
        empty = self._divide_by_items()
        if self._clip_fn is None:
            if empty is None:
                self.optimizer.step(**kwargs)
            else:  # an empty window's gradients are zero: skip (fused) or a zero step
                self._count_skipped(empty)
                self._step_with_found_inf(empty, kwargs)
            return
        norm = self._clip_grads()
        optimizer = self.optimizer
        if self._takes_found_inf:
            found_inf = _found_inf(norm)
            if empty is not None:
                found_inf = torch.maximum(found_inf, empty)
            self._count_skipped(found_inf)
            self._step_with_found_inf(found_inf, kwargs)
            return
        # After clipping by an inf/nan norm every finite gradient is already 0 (clip
        # coefficient 0); value clipping leaves clamped values, so zero them here. Then the
        # nan ones become 0 too, and the step cannot put a non-finite value anywhere. No
        # foreach op maps nan to 0, hence the loop: a fused optimizer avoids its cost.
        if empty is None:
            self._count_nonfinite(norm)
        else:  # counted once when an empty window also has a non-finite norm
            self._count_skipped(torch.maximum(_found_inf(norm), empty))
        grads = [param.grad for param in self._params if param.grad is not None]
        if self._zero_clamped:
            torch._foreach_mul_(grads, torch.isfinite(norm).float())
        for grad in grads:
            grad.nan_to_num_(0.0, 0.0, 0.0)
        optimizer.step(**kwargs)

    def _step_with_found_inf(self, found_inf: Tensor, kwargs: Mapping[str, Any]) -> None:
        """Step; an optimizer that takes ``found_inf`` skips itself on the device when it
        is > 0, any other steps (its gradients were zeroed for such a step)."""
        optimizer = self.optimizer
        if not self._takes_found_inf:
            optimizer.step(**kwargs)
            return
        optimizer.found_inf = found_inf  # type: ignore[attr-defined]
        try:
            optimizer.step(**kwargs)
        finally:
            del optimizer.found_inf  # type: ignore[attr-defined]

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
        grads = [
            p.grad for group in self.optimizer.param_groups for p in group["params"]
            if p.grad is not None
        ]
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
                "and every data-parallel rank): they were skipped and are counted in "
                "skipped_steps; check the data (all padding?) or the count you pass",
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
        inside a window (its earlier micro-batches are lost) and on BatchNorm with
        accumulation (batch statistics see micro-batches, not the whole window).
        """
        if isinstance(init_counts, bool) or not isinstance(init_counts, int) or init_counts < 0:
            raise ValueError(f"init_counts must be an int >= 0; got {init_counts!r}")
        if max_counts is not None and (
            isinstance(max_counts, bool) or not isinstance(max_counts, int) or max_counts < 0
        ):
            raise ValueError(f"max_counts must be an int >= 0 or None; got {max_counts!r}")
        if max_counts is not None and init_counts > max_counts:
            raise ValueError(
                f"init_counts ({init_counts}) is past max_counts ({max_counts}); "
                "pass the iteration training resumes at and the total number of iterations"
            )
        if model is not None:
            self._bind_model(model)
        acc = self._accumulative_counts
        if acc > 1 and init_counts % acc != 0:
            warnings.warn(
                f"Resumed iteration number {init_counts} is not divisible by "
                f"accumulative_counts={acc}: the first window after resuming misses "
                f"{init_counts % acc} micro-batch(es) whose gradients were not saved",
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
        """How many updates had a non-finite gradient and were skipped, as a device tensor.

        None until a step has been checked (checks happen when clipping or loss scaling is
        on). Read it every N steps for logging; reading its value is a host sync.
        """
        self._fold_skipped()
        self._check_empty_windows()
        return self._skipped

    def _count_skipped(self, found_inf: Tensor) -> None:
        """Note an update's found_inf (> 0: skipped). No device work until the fold."""
        self._pending_found.append(found_inf)
        if len(self._pending_found) >= _FOLD_EVERY:
            self._fold_skipped()

    def _count_nonfinite(self, norm: Tensor) -> None:
        """Note an update's gradient norm (inf/nan: skipped). No device work until the fold."""
        self._pending_norms.append(norm)
        if len(self._pending_norms) >= _FOLD_EVERY:
            self._fold_skipped()

    def _fold_skipped(self) -> None:
        found, norms = self._pending_found, self._pending_norms
        if not found and not norms:
            return
        device = (found or norms)[-1].device  # where the gradients are now
        count = torch.zeros((), dtype=torch.float32, device=device)
        if found:
            count += (torch.stack([f.reshape(()).to(device) for f in found]) > 0).sum()
        if norms:
            count += (~torch.isfinite(torch.stack([n.reshape(()).to(device) for n in norms]))).sum()
        if self._skipped is None:
            self._skipped = count
        else:
            self._skipped = self._skipped.to(device) + count
        found.clear()
        norms.clear()

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
        """The optimizer's state dict plus ``"hwoptim"``: the counters, for an exact resume."""
        state = self.optimizer.state_dict()
        state[STATE_KEY] = {
            "inner_count": self._inner_count,
            "max_counts": self._max_counts,
            "accumulative_counts": self._accumulative_counts,
        }
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
        return plan

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
        for name, value, low in (("inner_count", inner, 0), ("max_counts", max_counts, -1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"state dict {STATE_KEY}.{name} must be an int >= {low}; got {value!r}")
        check_accumulative_counts(acc)
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
        self._n_groups = -1  # parameters may have been re-grouped

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

    def _rebuild_clip_fn(self) -> None:
        if self._clip is not None:
            scaled = self.loss_scaler is not None
            self._clip_fn = self._clip.clip_fn(self._model, scaled=scaled)

    def _clip_grads(self) -> Tensor:
        groups = self.optimizer.param_groups
        if len(groups) != self._n_groups:  # add_param_group or a reload
            self._params = [p for group in groups for p in group["params"]]
            self._n_groups = len(groups)
        assert self._clip_fn is not None
        norm = self._clip_fn(self._params)
        self.last_grad_norm = norm
        return norm

    def __repr__(self) -> str:
        lines = [
            f"{type(self).__name__}(",
            f"  accumulative_counts={self._accumulative_counts},",
            f"  clip_grad={self._clip!r},",
            *self._repr_extra(),
            "  optimizer=" + repr(self.optimizer).replace("\n", "\n  "),
            ")",
        ]
        return "\n".join(lines)

    def _repr_extra(self) -> list[str]:
        return []


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

