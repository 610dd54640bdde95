"""The non-finite guard: clip, then keep an inf/nan update out of the parameters.

The policy is chosen once, at construction, from the optimizer and the options:

- ``FUSED``: a fused optimizer reads ``found_inf`` and skips the step on the device;
- ``EXACT``: ``exact_skip`` -- the step runs and is undone on the device when bad;
- ``ZERO``: any other optimizer steps with the bad gradients zeroed.

A precision policy with a scaler overrides all three with its own found_inf. ``_body`` is
the one update -- clip, decide, step, count -- that runs eagerly and, under
``compile_step``, compiled by torch.compile. docs/architecture.md ("The guard") explains the policies.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor

from hwoptim import _torch_compat
from hwoptim._grad_norm import _PLAIN, grads_by_mesh
from hwoptim._precision import NoScaling
from hwoptim._skips import NONFINITE, SKIPPED, ZEROED, SkipCounter
from hwoptim.clip import ClipFn, ClipGrad, GroupLayout, GroupName, nonfinite_flag
from hwoptim.compile import CompiledUpdate

__all__ = ["EXACT", "FUSED", "ZERO", "Guard"]

FUSED = 0  # ints, compared with ==: a copied wrapper's policy must still match
EXACT = 1
ZERO = 2


def _bad_update(norm: Tensor | None, empty: Tensor | None) -> Tensor:
    """1.0 when the norm is inf/nan or the window held no item, else 0.0 (float32, on the device)."""
    if norm is None:
        assert empty is not None, "an update without clipping has no norm to check"
        return empty
    found = nonfinite_flag(norm)
    return found if empty is None else torch.maximum(found, empty)


def _step_tensors(optimizer: torch.optim.Optimizer, params: list[Tensor], device: torch.device) -> list[Tensor] | None:
    """``params``, their optimizer state and the groups' tensors, if every value is a tensor
    on ``device``; else None (not restorable there). A parameter without state adds itself
    alone (an optimizer without any, or state the step is about to create: the caller
    compares this list before and after the step)."""
    tensors = list(params)
    state = optimizer.state
    for param in params:
        entry = state.get(param)
        if not entry:
            continue
        for value in entry.values():
            if value is None:
                continue
            if not isinstance(value, Tensor) or value.device != device:
                return None
            tensors.append(value)
    for group in optimizer.param_groups:  # state kept in a group (Prodigy's d, ...)
        for key, value in group.items():
            if key != "params" and isinstance(value, Tensor):
                if value.device != device:
                    return None
                tensors.append(value)
    return tensors


def _group_values(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each group's values other than its parameters and tensors (lr, a step counter)."""
    return [
        {k: v for k, v in group.items() if k != "params" and not isinstance(v, Tensor)}
        for group in optimizer.param_groups
    ]


def _same_values(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> bool:
    """Whether ``_group_values`` is unchanged: each value the same object or equal."""
    if len(before) != len(after):
        return False
    for old, new in zip(before, after):
        if old.keys() != new.keys():
            return False
        for key, value in old.items():
            other = new[key]
            if other is not value and (type(other) is not type(value) or (other == value) is not True):
                return False
    return True


def _note_steps(optimizer: torch.optim.Optimizer) -> list[bool]:
    """A one-element list a step post-hook of ``optimizer`` sets to True: whether a step
    completed since the caller last set it to False (compile_step's first call)."""
    seen = [False]

    def hook(opt: Any, args: Any, kwargs: Any) -> None:
        seen[0] = True

    optimizer.register_step_post_hook(hook)
    return seen


class Guard:
    """The clip function, the non-finite policy and the one update body (eager and compiled).

    Holds ``last_grad_norm`` and the per-group norms (``group_norms``) of the param groups'
    layout; writes the skip counter; calls the precision policy.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        clip: ClipGrad | None,
        precision: NoScaling,
        counter: SkipCounter,
        *,
        exact_skip: bool,
        compile_kwargs: Mapping[str, Any] | None,
        owner: str,
    ) -> None:
        self._optimizer = optimizer
        self.clip = clip
        self._precision = precision
        self._counter = counter
        self._fused = fused = _torch_compat.takes_found_inf(optimizer)
        #: the non-finite policy (without a scaler's found_inf)
        self.policy = FUSED if fused else EXACT if exact_skip else ZERO
        # value and per-group clipping leave finite gradients beside an inf/nan one: a bad
        # update's step must still see only zeros
        self._zero_clamped = clip is not None and (clip.kind == "value" or clip.per_group)
        #: the total gradient norm before the last clipping (a device tensor)
        self.last_grad_norm: Tensor | None = None
        #: each group's norm before the last clipping, in ``layout.names`` order (None: none
        #: yet, or a clip that has none: FSDP1's own)
        self.last_group_norms: Tensor | None = None
        #: the named groups of the optimizer's param groups (rebuilt with the parameter list)
        self.layout: GroupLayout | None = None
        self._clip_fn: ClipFn | None = None
        self._found_buf: Tensor | None = None  # FUSED: the found_inf the optimizer reads
        #: compile_step's compiled update (None: eager)
        self.compiled: CompiledUpdate | None = None
        self._compiled_step: Callable[..., Any] | None = None
        self._step_seen: list[bool] | None = None  # compile_step: [the step completed]
        if compile_kwargs is not None:
            self.compiled = CompiledUpdate(self._compiled_body, compile_kwargs, owner)
        #: whether an update walks the parameters even without a num_items window
        self.needs_params = clip is not None or self.compiled is not None
        self.bind(None)

    def describe_compile(self) -> list[str]:
        """compile_step's line in the wrapper's repr."""
        compiled = self.compiled
        if compiled is None:
            return []
        state = "" if compiled.compiled else f"  # uncompiled: {compiled.reason}"
        return [f"  compile_step={compiled.kwargs or True!r},{state}"]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # the model's (rebuilt by bind), and the optimizer's hook (a copy has none)
        state["_clip_fn"] = state["_compiled_step"] = state["_step_seen"] = None
        return state

    def layout_of(self, params: list[Tensor]) -> GroupLayout:
        """The group layout of ``params`` (the binding's list: the same object until the
        optimizer's groups change, so the check per update is one identity test)."""
        layout = self.layout
        if layout is None or layout.params is not params:
            layout = self.layout = GroupLayout(self._optimizer.param_groups, params, self.clip)
        return layout

    def group_norms(self) -> dict[GroupName, Tensor]:
        """``{group name: its norm before the last clipping}``, views of one device tensor."""
        norms, layout = self.last_group_norms, self.layout
        if norms is None or layout is None or norms.shape[0] != len(layout.names):
            return {}
        return dict(zip(layout.names, norms.unbind(0)))

    def nonfinite_groups(self) -> dict[GroupName, Tensor]:
        """``{group name: whether it held an inf/nan at the last skipped or zeroed update}``."""
        self._counter.fold()
        flags, layout = self._counter.nonfinite, self.layout
        if self.last_group_norms is None:  # no per-group norms (FSDP1's own clip): unknown
            return {}
        if flags is None or layout is None or flags.shape[0] != len(layout.names):
            return {}
        return dict(zip(layout.names, flags.unbind(0)))

    def bind(self, model: Any) -> None:
        """Build the clip function for ``model`` (FSDP1 clips through its module)."""
        if self.clip is not None:
            self._clip_fn = self.clip.clip_fn(model, scaled=self._precision.scales)

    def update(self, params: list[Tensor], empty: Tensor | None, kwargs: Mapping[str, Any]) -> None:
        """One update once the gradients are final: unscale, clip, guard, step, count."""
        precision = self._precision
        if self._clip_fn is not None:
            self.layout_of(params)
        found = precision.unscale(empty)
        if found is not None:
            empty = None  # the scaler's found_inf holds it
        if self.compiled is not None:
            self._run_compiled(params, found, empty, kwargs)
        elif found is None and empty is None and self._clip_fn is None:
            precision.step(**kwargs)  # nothing to check
        elif found is None and self.policy == FUSED:
            self._with_found_inf(params, self._found_buffer(params), None, empty, kwargs, precision.step)
        else:
            self._body(params, found, empty, kwargs, precision.step)
        precision.finish(kwargs, self.compiled is not None)

    def _found_buffer(self, params: list[Tensor]) -> Tensor:
        """FUSED's found_inf tensor, made once on the parameters' device."""
        if self._found_buf is None:
            device = params[0].device if params else torch.device("cpu")
            self._found_buf = torch.zeros((), dtype=torch.float32, device=device)
        return self._found_buf

    def _with_found_inf(
        self, params: list[Tensor], carrier: Tensor, found: Tensor | None, empty: Tensor | None,
        kwargs: Mapping[str, Any], step: Callable[..., Any] | None,
    ) -> Tensor | None:
        """Run ``_body`` with ``optimizer.found_inf`` set to ``carrier`` (a fused optimizer)."""
        optimizer = self._optimizer
        optimizer.found_inf = carrier  # type: ignore[attr-defined]
        try:
            return self._body(params, found, empty, kwargs, step)
        finally:
            del optimizer.found_inf  # type: ignore[attr-defined]

    def _body(
        self, params: list[Tensor], found: Tensor | None, empty: Tensor | None,
        kwargs: Mapping[str, Any], step: Callable[..., Any] | None,
    ) -> Tensor | None:
        """The update: clip; then the scaler's skip (``found``) or the policy; step; count."""
        norm = groups = None
        if self._clip_fn is not None:
            # set before the step: a step post-hook logs them (hwoptim.mmengine)
            norm, groups = self._clip_fn(params, self.layout)
            self.last_grad_norm, self.last_group_norms = norm, groups
        if found is not None:
            if step is not None:
                step(**kwargs)
            self._counter.add(SKIPPED, found, groups)
            return norm
        if norm is None and empty is None:
            if step is not None:
                step(**kwargs)
            return norm
        assert step is not None
        if self.policy == FUSED:
            bad = _bad_update(norm, empty)
            assert self._found_buf is not None
            self._found_buf.copy_(bad)
            step(**kwargs)
            self._counter.add(SKIPPED, bad, groups)
        elif self.policy == EXACT:
            self._step_restoring(params, norm, groups, _bad_update(norm, empty), kwargs, step)
        else:
            if norm is not None:
                self._zero_nonfinite_grads(norm, [p.grad for p in params if p.grad is not None])
            step(**kwargs)
            if empty is None and norm is not None:
                self._counter.add(NONFINITE, norm, groups)  # no device work until the fold
            else:
                self._counter.add(ZEROED, _bad_update(norm, empty), groups)
        return norm

    def _step_restoring(
        self, all_params: list[Tensor], norm: Tensor | None, groups: Tensor | None,
        found_inf: Tensor, kwargs: Mapping[str, Any], step: Callable[..., Any],
    ) -> None:
        """EXACT: copy what the step changes, step, copy back on the device when bad (a
        zeroed step, counted so, where the layout does not allow it: docs/architecture.md)."""
        params = [p for p in all_params if p.grad is not None]
        if norm is not None:
            self._zero_nonfinite_grads(norm, [p.grad for p in params if p.grad is not None])
        device = found_inf.device
        before = _step_tensors(self._optimizer, params, device)
        saved = None
        values = _group_values(self._optimizer)
        if before is not None:
            with torch.no_grad():
                saved = torch._foreach_mul(before, 1)  # copies, in their dtypes, in one call
        step(**kwargs)
        after = None if saved is None else _step_tensors(self._optimizer, params, device)
        if (
            after is None
            or saved is None
            or len(after) != len(saved)
            or any(a.shape != s.shape or a.dtype != s.dtype for a, s in zip(after, saved))
            # a Python value the step changed in a group could be put back only by reading
            # found_inf on the host, a sync: the update counts as zeroed
            or not _same_values(values, _group_values(self._optimizer))
        ):
            self._counter.add(ZEROED, found_inf, groups)
            return
        skip = found_inf.reshape(()).bool()
        with torch.no_grad():  # where(), not a blend: a nan the step made must not survive
            for live, copy in zip(after, saved):
                torch.where(skip, copy, live, out=live)
        self._counter.add(SKIPPED, found_inf, groups)

    def _zero_nonfinite_grads(self, norm: Tensor, grads: list[Tensor]) -> None:
        """Make the step of a non-finite norm a step with zero gradients, on the device."""
        # norm clipping by inf/nan already zeroed the finite gradients; value clipping did not
        if self._zero_clamped and grads:
            finite = torch.isfinite(norm).float()
            if set(map(type, grads)) == _PLAIN:
                torch._foreach_mul_(grads, finite)
            else:  # torch's foreach ops refuse DTensors of different meshes
                for bucket in grads_by_mesh(grads):
                    torch._foreach_mul_(bucket, finite)
        for grad in grads:  # no foreach op maps nan to 0
            grad.nan_to_num_(0.0, 0.0, 0.0)

    # -- compile_step ---------------------------------------------------------------------

    def _compiled_body(
        self, params: list[Tensor], found: Tensor | None, empty: Tensor | None, kwargs: dict[str, Any]
    ) -> tuple[Tensor, Tensor | None] | None:
        """What compile_step compiles: ``_body`` with the step decided outside it; returns
        the norms it set (the total and the groups'), or None without clipping."""
        norm = self._body(params, found, empty, kwargs, self._compiled_step)
        return None if norm is None else (norm, self.last_group_norms)

    def _run_compiled(
        self, params: list[Tensor], found: Tensor | None, empty: Tensor | None, kwargs: Mapping[str, Any]
    ) -> None:
        """Run one update through compile_step's function (found_inf set around it)."""
        compiled = self.compiled
        assert compiled is not None
        optimizer = self._optimizer
        checked = found is not None or empty is not None or self._clip_fn is not None
        if checked and (self._counter.skipped is None or self._counter.zeroed is None or self._found_buf is None):
            # their None-ness would be compiled into the function otherwise
            layout = self.layout if self._clip_fn is not None else None
            self._counter.materialize(
                params[0].device if params else torch.device("cpu"),
                None if layout is None else len(layout.names),
            )
            self._found_buffer(params)
        fused = self._fused
        carrier = (self._found_buf if found is None else found) if fused and checked else None
        if carrier is not None:
            optimizer.found_inf = carrier  # type: ignore[attr-defined]
        args = (params, found, empty, kwargs)
        try:
            if compiled.ready:
                norm = compiled(*args)
            else:
                self._compiled_step = self._precision.compiled_step(fused)
                if self._step_seen is None:  # registered before compiling: no recompile for it
                    self._step_seen = _note_steps(optimizer)
                norm = compiled.first_call(lambda: self._undo_first_call(params, found, empty), *args)
        finally:
            if carrier is not None:
                del optimizer.found_inf  # type: ignore[attr-defined]
        if norm is not None:
            self.last_grad_norm, self.last_group_norms = norm
        _torch_compat.note_scheduler_call(optimizer)

    def _undo_first_call(
        self, params: list[Tensor], found: Tensor | None, empty: Tensor | None
    ) -> Callable[[BaseException], tuple[tuple[Tensor, Tensor | None] | None] | None]:
        """Save what the body changes before the step; the function returned puts it back,
        or, when the failure came after the step (a second run would step twice), finishes
        the update and returns its result in a tuple (docs/compile.md)."""
        seen = self._step_seen
        assert seen is not None
        seen[0] = False
        grads = [p.grad for p in params if p.grad is not None]
        saved = [g.detach().clone() for g in grads]
        counts, norm, groups = self._counter.snapshot(), self.last_grad_norm, self.last_group_norms

        def undo(exc: BaseException) -> tuple[tuple[Tensor, Tensor | None] | None] | None:
            if seen[0]:
                from torch._dynamo.exc import TorchDynamoException  # imported by compiling

                if not isinstance(exc, TorchDynamoException):
                    raise exc  # the update's own error, after its step: as eagerly
                return (self._finish_after_step(counts, found, empty),)
            with torch.no_grad():
                for grad, value in zip(grads, saved):
                    grad.copy_(value)
            self._counter.restore(counts)
            self.last_grad_norm, self.last_group_norms = norm, groups
            return None

        return undo

    def _finish_after_step(
        self, counts: tuple[Tensor | None, Tensor | None, Tensor | None], found: Tensor | None,
        empty: Tensor | None,
    ) -> tuple[Tensor, Tensor | None] | None:
        """Count an update whose compiled first call failed after its step, unless it was
        counted (``exact_skip``'s copies were lost with the call: its step counts as zeroed)."""
        norm = self.last_grad_norm if self._clip_fn is not None else None
        groups = self.last_group_norms if norm is not None else None
        out = None if norm is None else (norm, groups)
        if any(now is not then for now, then in zip(self._counter.snapshot(), counts)):
            return out  # counted already (by identity: no device read)
        if found is not None:
            self._counter.add(SKIPPED, found, groups)
        elif norm is not None or empty is not None:
            bad = _bad_update(norm, empty)
            self._counter.add(SKIPPED if self.policy == FUSED else ZEROED, bad, groups)
        return out
