"""The skip counter: ``skipped_steps`` and ``zeroed_steps`` as one owner.

Each checked update adds one record, ``add(kind, flag)``; nothing is computed on the device
until ``fold``, which runs every ``FOLD_EVERY`` records or when a count is read. Under
torch.compile the record is added as device arithmetic instead (a growing Python list would
recompile the caller at every update).
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
    return (~torch.isfinite(values)).sum() if kind == NONFINITE else (values > 0).sum()


class SkipCounter:
    """Counts skipped and zeroed updates on the device, with no host sync."""

    def __init__(self) -> None:
        #: the counts as float32 device tensors (None until an update was checked)
        self.skipped: Tensor | None = None
        self.zeroed: Tensor | None = None
        self._pending: list[tuple[int, Tensor]] = []

    def __getstate__(self) -> dict[str, object]:
        self.fold()
        return {"skipped": self.skipped, "zeroed": self.zeroed}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.skipped = state["skipped"]  # type: ignore[assignment]
        self.zeroed = state["zeroed"]  # type: ignore[assignment]
        self._pending = []

    def add(self, kind: int, flag: Tensor) -> None:
        """Record one update's ``flag`` of ``kind`` (SKIPPED, ZEROED or NONFINITE)."""
        if torch.compiler.is_compiling():
            self._add_now(kind, flag)
            return
        self._pending.append((kind, flag))
        if len(self._pending) >= FOLD_EVERY:
            self.fold()

    def _add_now(self, kind: int, flag: Tensor) -> None:
        """Add one record as device arithmetic (inside compiled code)."""
        one = _hits(kind, flag.reshape(())).float()
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
            values = [f.reshape(()).to(device) for k, f in pending if k == kind]
            if values:
                counts[kind != SKIPPED] += _hits(kind, torch.stack(values))
        skipped, zeroed = counts
        self.skipped = skipped if self.skipped is None else self.skipped.to(device) + skipped
        self.zeroed = zeroed if self.zeroed is None else self.zeroed.to(device) + zeroed
        pending.clear()

    def materialize(self, device: torch.device) -> None:
        """Make both counts tensors on ``device`` (before a compiled update: their
        None-ness would be compiled into it)."""
        self.fold()
        if self.skipped is None:
            self.skipped = torch.zeros((), dtype=torch.float32, device=device)
        if self.zeroed is None:
            self.zeroed = torch.zeros((), dtype=torch.float32, device=device)

    def snapshot(self) -> tuple[Tensor | None, Tensor | None]:
        """The counts, for ``restore`` (compile_step's undo of a failed first call)."""
        return self.skipped, self.zeroed

    def restore(self, snapshot: tuple[Tensor | None, Tensor | None]) -> None:
        """Put back the counts of ``snapshot``."""
        self.skipped, self.zeroed = snapshot

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
