"""Small assertions and loops the test modules share."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn


def total_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all the tensors taken together: the reference for clipping's norm
    (torch.nn.utils.get_total_norm is torch 2.6+)."""
    return torch.linalg.vector_norm(torch.cat([t.detach().flatten() for t in tensors]))


def assert_same(a: Any, b: Any, path: str = "state") -> None:
    """Nested dicts/lists/tensors are equal, tensors exactly (same dtype, shape and values,
    a NaN where the other has a NaN: a scaled partial window may hold them)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        same = torch.equal(a, b) or (
            a.is_floating_point() and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)
        )
        assert same, path
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping), path
        assert set(a) == set(b), f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for key in a:
            assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, Sequence) and not isinstance(a, str):
        assert isinstance(b, Sequence) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def run_micro_batches(wrapper: Any, model: Any, steps: int, pattern: str) -> None:
    """``steps`` micro-batches of ``model(ones(1, 2)).sum()`` in one of the two calling patterns.

    "mmengine": the forward inside ``optim_context``, ``update_params`` after the block (the
    backward then runs outside it); "inside": the whole body inside the block.
    """
    for _ in range(steps):
        if pattern == "mmengine":
            with wrapper.optim_context(model):
                loss = model(torch.ones(1, 2)).sum()
            wrapper.update_params(loss)
        elif pattern == "inside":
            with wrapper.optim_context(model):
                wrapper.update_params(model(torch.ones(1, 2)).sum())
        else:
            raise ValueError(f"pattern must be 'mmengine' or 'inside'; got {pattern!r}")


#: the ways a wrapper gets copied: pickle (multiprocessing too), torch.save, copy.deepcopy
COPIES = ("pickle", "torch.save", "deepcopy")


def copied(obj: Any, how: str) -> Any:
    """``obj`` after a round trip through ``how`` (one of COPIES)."""
    import copy
    import io
    import pickle

    if how == "pickle":
        return pickle.loads(pickle.dumps(obj))
    if how == "torch.save":
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)
    if how == "deepcopy":
        return copy.deepcopy(obj)
    raise ValueError(f"how must be one of {COPIES}; got {how!r}")


class WithNoSync(nn.Linear):
    """A stand-in for DDP: records when its gradient sync is switched off and on."""

    def __init__(self, in_features: int = 2, out_features: int = 2) -> None:
        super().__init__(in_features, out_features)
        self.log: list[str] = []

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self.log.append("off")
        yield
        self.log.append("on")
