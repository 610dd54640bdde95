"""The emulated device's host-read census: which ops make the host wait, and who counts them.

The kernels call ``record`` for every read; ``hwoptim.testing.emulated.count_host_reads``
opens a ``recording`` for the user's block. Recordings nest: each counts what happened
while it was open.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Iterator

__all__ = ["HOST_READ_OPS", "HostReads", "record", "recording"]

#: ops whose result the host must wait for on a real device (the value, or a shape that
#: depends on the data); copies from the device to the CPU are counted too
HOST_READ_OPS = frozenset({
    "aten::_local_scalar_dense",  # .item(), float(t), int(t), bool(t), `if t:`
    "aten::equal",
    "aten::nonzero",
    "aten::masked_select",
})


@dataclasses.dataclass(eq=False)  # each block is its own recorder, whatever it counted
class HostReads:
    """Device-to-host reads seen while ``count_host_reads()`` was entered.

    ``ops`` counts them per kind: ``aten::_local_scalar_dense`` (``.item()``, ``float(t)``,
    ``bool(t)``, ``if t:``), ``aten::equal``, ``aten::nonzero``, ``aten::masked_select``
    and ``copy to cpu`` (``.cpu()``, ``.tolist()``, ``.to("cpu")``, printing a tensor).
    On a real accelerator each one waits for the device to finish its queued work.
    """

    ops: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)

    @property
    def total(self) -> int:
        """All reads counted."""
        return sum(self.ops.values())

    def __str__(self) -> str:
        detail = ", ".join(f"{name} x{n}" for name, n in sorted(self.ops.items()))
        return f"{self.total} host read(s)" + (f": {detail}" if detail else "")


HostReads.__module__ = "hwoptim.testing.emulated"  # where users import it from

#: the recordings now open, innermost last
_recorders: list[HostReads] = []


def record(kind: str) -> None:
    """Count one host read of ``kind`` in every open recording."""
    for recorder in _recorders:
        recorder.ops[kind] += 1


@contextlib.contextmanager
def recording() -> Iterator[HostReads]:
    """Count the reads made while the block runs."""
    reads = HostReads()
    _recorders.append(reads)
    try:
        yield reads
    finally:
        _recorders.remove(reads)
