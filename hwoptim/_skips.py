"""The skip counter: ``skipped_steps``, ``zeroed_steps`` and the non-finite groups as one owner.

Each checked update adds one record, ``add(kind, flag, groups)``; nothing is computed on the
device until ``fold``, which runs every ``FOLD_EVERY`` records or when a count is read. Under
torch.compile the record is added as device arithmetic instead (a growing Python list would
recompile the caller at every update). ``groups``, the update's per-group norms, gives
``nonfinite``: which groups held the inf/nan of the last skipped or zeroed update.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["NONFINITE", "SKIPPED", "ZEROED", "SkipCounter"]

#: a flag > 0: the update was skipped (parameters and optimizer state untouched)
SKIPPED = 0
#: a flag > 0: the update was stepped with zeroed gradients
ZEROED = 1
#: a gradient norm: non-finite means the update was stepped with zeroed gradients
NONFINITE = 2
#: records between two folds
FOLD_EVERY = 256


def _hits(kind: int, values: Tensor) -> Tensor:
    """How many of ``values`` (records of ``kind``) count."""
    return _counted(kind, values).sum()


def _counted(kind: int, values: Tensor) -> Tensor:
    """Which of ``values`` (records of ``kind``) count, as bools."""
    return ~torch.isfinite(values) if kind == NONFINITE else values > 0


def _last_bad_groups(bad: Tensor, groups: Tensor, old: Tensor | None) -> Tensor:
    """The non-finite flags of the last row of ``groups`` whose ``bad`` is set, else ``old``
    (all False when None): on the device, no host sync."""
    rows = bad.shape[0]
    order = torch.arange(1, rows + 1, device=bad.device) * bad  # 0 where not bad
    last = order.argmax().reshape(1)
    flags = ~torch.isfinite(groups.index_select(0, last).reshape(-1))
    if old is None or old.shape != flags.shape:
        old = torch.zeros_like(flags)
    return torch.where(bad.any(), flags, old.to(flags.device))


class SkipCounter:
    """Counts skipped and zeroed updates on the device, with no host sync."""

    def __init__(self) -> None:
        #: the counts as float32 device tensors (None until an update was checked)
        self.skipped: Tensor | None = None
        self.zeroed: Tensor | None = None
        #: per group (a bool device tensor), whether it held an inf/nan at the last skipped
        #: or zeroed update; None until an update with per-group norms was checked
        self.nonfinite: Tensor | None = None
        self._pending: list[tuple[int, Tensor, Tensor | None]] = []

    def __getstate__(self) -> dict[str, object]:
        self.fold()
        return {"skipped": self.skipped, "zeroed": self.zeroed, "nonfinite": self.nonfinite}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.skipped = state["skipped"]  # type: ignore[assignment]
        self.zeroed = state["zeroed"]  # type: ignore[assignment]
        self.nonfinite = state.get("nonfinite")  # type: ignore[assignment]
        self._pending = []

    def add(self, kind: int, flag: Tensor, groups: Tensor | None = None) -> None:
        """Record one update's ``flag`` of ``kind`` (SKIPPED, ZEROED or NONFINITE) and its
        per-group norms ``groups`` (None: not known)."""
        if torch.compiler.is_compiling():
            self._add_now(kind, flag, groups)
            return
        self._pending.append((kind, flag, groups))
        if len(self._pending) >= FOLD_EVERY:
            self.fold()

    def _add_now(self, kind: int, flag: Tensor, groups: Tensor | None) -> None:
        """Add one record as device arithmetic (inside compiled code)."""
        bad = _counted(kind, flag.reshape(()))
        if groups is not None:
            old = self.nonfinite
            flags = ~torch.isfinite(groups)
            self.nonfinite = torch.where(bad, flags, torch.zeros_like(flags) if old is None else old.to(flags.device))
        one = bad.float()
        skipped = torch.zeros_like(one) if self.skipped is None else self.skipped
        zeroed = torch.zeros_like(one) if self.zeroed is None else self.zeroed
        if kind == SKIPPED:
            skipped = skipped + one.to(skipped.device)
        else:
            zeroed = zeroed + one.to(zeroed.device)
        self.skipped, self.zeroed = skipped, zeroed  # both exist once either does

    def fold(self) -> None:
        """Fold the pending records into the counts, on the device of the newest one."""
        pending = self._pending
        if not pending:
            return
        device = pending[-1][1].device  # where the gradients are now
        counts = [torch.zeros((), dtype=torch.float32, device=device) for _ in range(2)]
        for kind in (SKIPPED, ZEROED, NONFINITE):
            values = [f.reshape(()).to(device) for k, f, _ in pending if k == kind]
            if values:
                counts[kind != SKIPPED] += _hits(kind, torch.stack(values))
        self._fold_groups(pending, device)
        skipped, zeroed = counts
        self.skipped = skipped if self.skipped is None else self.skipped.to(device) + skipped
        self.zeroed = zeroed if self.zeroed is None else self.zeroed.to(device) + zeroed
        pending.clear()

    def _fold_groups(self, pending: list[tuple[int, Tensor, Tensor | None]], device: torch.device) -> None:
        """``nonfinite`` after the pending records: the flags of the last bad one with groups."""
        run: list[tuple[Tensor, Tensor]] = []  # (bad, groups) of one group count, in order
        for kind, flag, groups in pending:
            if groups is None:
                continue
            if run and run[-1][1].shape != groups.shape:  # the groups changed: start afresh
                self._fold_run(run, device)
                run = []
                self.nonfinite = None
            run.append((_counted(kind, flag.reshape(()).to(device)), groups.to(device)))
        if run:
            self._fold_run(run, device)

    def _fold_run(self, run: list[tuple[Tensor, Tensor]], device: torch.device) -> None:
        bad = torch.stack([b for b, _ in run])
        groups = torch.stack([g for _, g in run])
        self.nonfinite = _last_bad_groups(bad, groups, self.nonfinite)

    def materialize(self, device: torch.device, n_groups: int | None = None) -> None:
        """Make both counts tensors on ``device``, and the non-finite flags of ``n_groups``
        groups (before a compiled update: their None-ness would be compiled into it)."""
        self.fold()
        if n_groups is not None and (self.nonfinite is None or self.nonfinite.shape != (n_groups,)):
            self.nonfinite = torch.zeros(n_groups, dtype=torch.bool, device=device)
        if self.skipped is None:
            self.skipped = torch.zeros((), dtype=torch.float32, device=device)
        if self.zeroed is None:
            self.zeroed = torch.zeros((), dtype=torch.float32, device=device)

    def snapshot(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """The counts and flags, for ``restore`` (compile_step's undo of a failed first call)."""
        return self.skipped, self.zeroed, self.nonfinite

    def restore(self, snapshot: tuple[Tensor | None, Tensor | None, Tensor | None]) -> None:
        """Put back the counts and flags of ``snapshot``."""
        self.skipped, self.zeroed, self.nonfinite = snapshot

    def counts(self) -> tuple[int, int]:
        """(skipped, zeroed) as ints, for a checkpoint (a host sync)."""
        self.fold()
        return tuple(0 if c is None else int(c.item()) for c in (self.skipped, self.zeroed))  # type: ignore[return-value]

    def load(self, skipped: int, zeroed: int, device: torch.device | None) -> None:
        """Set the counts to a checkpoint's (None stays None when both are 0)."""
        self._pending.clear()
        if skipped == zeroed == 0 and self.skipped is None:
            return
        self.skipped = torch.tensor(float(skipped), device=device)
        self.zeroed = torch.tensor(float(zeroed), device=device)

    @property
    def pending(self) -> int:
        """Records not folded yet."""
        return len(self._pending)
