"""The accumulation window: mmengine's counters and the loss factor they give.

``inner`` counts backpropagated micro-batches; a window ends every ``acc`` of them, and
at ``max_counts`` (the end of training), where the last, shorter window holds the
remainder and divides its losses by it (docs/architecture.md has the map).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hwoptim._numbers import as_int, check_int
from hwoptim._torch_compat import has_batch_norm
from hwoptim._warn import warn

__all__ = ["AccumulationWindow", "check_accumulative_counts"]

#: the key of the wrapper's own entry in a state dict
STATE_KEY = "hwoptim"


def check_accumulative_counts(value: Any) -> int:
    """accumulative_counts as an int >= 1 (any integer type; bools and floats refused)."""
    return check_int(value, "accumulative_counts", 1)


class AccumulationWindow:
    """mmengine's accumulation counters: ``inner``, ``max_counts`` and the remainder rule."""

    def __init__(self, acc: int) -> None:
        self.acc = acc
        #: micro-batches backpropagated so far
        self.inner = 0
        #: the iteration training ends at (-1: unknown)
        self.max_counts = -1
        self._remainder = -1
        #: the unknown-end warning was given, or the caller said the end is unknown
        self.warned_unknown_end = False
        #: initialize_count_status(..., max_counts=None) said the end is unknown (saved so)
        self.end_unknown = False
        #: the inner count whose window's gradients a checkpoint restored (-1: none)
        self.grads_restored_at = -1

    def should_update(self) -> bool:
        """Whether the micro-batch just counted ends a window."""
        return self.inner % self.acc == 0 or self.inner == self.max_counts

    def should_sync(self) -> bool:
        """Whether the coming micro-batch ends a window."""
        following = self.inner + 1
        return following % self.acc == 0 or following == self.max_counts

    def loss_factor(self) -> int:
        """What the current micro-batch's loss is divided by (warns once if the end is unknown)."""
        acc, max_counts = self.acc, self.max_counts
        if max_counts == -1:
            if not self.warned_unknown_end:
                self.warn_unknown_end()
            return acc
        inner = self.inner
        last_start = max_counts - self._remainder  # where the remainder window starts
        if inner < last_start:
            return acc
        if inner < max_counts:
            return self._remainder
        if inner < last_start + acc:  # past max_counts, up to the next multiple of acc
            return acc - self._remainder
        return acc

    def check_batch_norm(self, model: Any) -> None:
        """Warn, with accumulation, that BatchNorm statistics see micro-batches, not windows."""
        if self.acc > 1 and has_batch_norm(model):
            warn(
                "Gradient accumulative may slightly decrease performance because the model "
                "has BatchNorm layers: their statistics see each micro-batch, not the window"
            )

    def check_end_known(self) -> None:
        """Warn once, with accumulation, when nothing said where training ends."""
        if self.max_counts == -1 and not self.warned_unknown_end and self.acc > 1:
            self.warn_unknown_end()

    def warn_unknown_end(self) -> None:
        """Warn once that the last, partial window will not step."""
        self.warned_unknown_end = True
        warn(
            f"accumulating gradients over {self.acc} micro-batches without "
            "initialize_count_status(model, init_counts, max_counts): the last, "
            "partial window of training will not step; call it with the total "
            "number of iterations (or max_counts=None to say the end is unknown)"
        )

    def start(self, init_counts: Any, max_counts: Any) -> tuple[int, int | None]:
        """Check ``initialize_count_status``'s counts; nothing changes on an error."""
        init_counts = check_int(init_counts, "init_counts", 0)
        if max_counts is not None:
            number = as_int(max_counts)
            if number is None or number < 0:
                raise ValueError(f"max_counts must be an int >= 0 or None; got {max_counts!r}")
            max_counts = number
        if max_counts is not None and init_counts > max_counts:
            raise ValueError(
                f"init_counts ({init_counts}) is past max_counts ({max_counts}); pass the "
                "iteration training resumes at and the total number of iterations"
            )
        return init_counts, max_counts

    def resume(self, init_counts: int, max_counts: int | None) -> None:
        """Set the counters checked by ``start``; warn on a resume inside a window."""
        acc = self.acc
        mid_window = init_counts % acc != 0 and init_counts != max_counts  # max: the last ended
        if mid_window and init_counts != self.grads_restored_at:
            warn(
                f"Resumed iteration number {init_counts} is not divisible by "
                f"accumulative_counts={acc}: the first window after resuming misses "
                f"{init_counts % acc} micro-batch(es) whose gradients were not saved; "
                "build the wrapper with save_partial_grads=True to save them in "
                "state_dict(), or checkpoint at the end of a window"
            )
        self.inner = init_counts
        self.end_unknown = max_counts is None
        if max_counts is None:
            self.max_counts = self._remainder = -1
            self.warned_unknown_end = True  # the caller said so on purpose
        else:
            self.set_end(max_counts)

    def set_end(self, max_counts: int) -> None:
        """Set ``max_counts`` and the remainder window it gives."""
        self.max_counts = max_counts
        self._remainder = -1 if max_counts == -1 else max_counts % self.acc

    @property
    def remainder(self) -> int:
        """The length of the last window before ``max_counts`` (-1: end unknown)."""
        return self._remainder

    def state(self) -> dict[str, Any]:
        """The counters as saved in ``state_dict()["hwoptim"]``."""
        state = {"inner_count": self.inner, "max_counts": self.max_counts, "accumulative_counts": self.acc}
        if self.max_counts == -1 and self.end_unknown:
            state["end_unknown"] = True  # said so: not the -1 of a run that never called it
        return state

    def check_saved(self, counters: Any) -> tuple[int, int, bool]:
        """Saved counters checked: (inner_count, max_counts, end_unknown); warns on another
        window length."""
        if not isinstance(counters, Mapping):
            raise ValueError(f"state dict entry {STATE_KEY!r} must be a dict; got {counters!r:.80}")
        try:
            inner, max_counts, acc = (
                counters["inner_count"], counters["max_counts"], counters["accumulative_counts"]
            )
        except KeyError as exc:
            raise ValueError(f"state dict entry {STATE_KEY!r} lacks {exc.args[0]!r}") from None
        inner = check_int(inner, f"state dict {STATE_KEY}.inner_count", 0)
        max_counts = check_int(max_counts, f"state dict {STATE_KEY}.max_counts", -1)
        acc = check_int(acc, f"state dict {STATE_KEY}.accumulative_counts", 1)
        end_unknown = counters.get("end_unknown", False)
        if not isinstance(end_unknown, bool):
            raise ValueError(
                f"state dict entry {STATE_KEY}.end_unknown must be True or False; got {end_unknown!r:.80}"
            )
        if acc != self.acc:
            warn(
                f"the checkpoint was saved with accumulative_counts={acc}; this wrapper uses "
                f"{self.acc}: windows follow the new value from here on"
            )
        return inner, max_counts, end_unknown

    def load(self, inner: int, max_counts: int, end_unknown: bool) -> None:
        """Apply counters returned by ``check_saved``."""
        self.inner = inner
        self.set_end(max_counts)
        # the saved run (or this one, before the load) said the end is unknown: no warning
        self.end_unknown = max_counts == -1 and (end_unknown or self.end_unknown)
        if self.end_unknown:
            self.warned_unknown_end = True
