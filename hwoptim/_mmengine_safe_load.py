"""hwoptim.mmengine's safe loading: mmengine's checkpoints through torch's weights_only unpickler.

Only hwoptim.mmengine imports this module; it installs the loaders at import
(docs/migrating-from-mmengine.md, "Resuming safely").
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import pickle
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, cast

import numpy as np
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader as _MMCheckpointLoader

# -- safe loading: resuming with torch's weights_only unpickler -------------------------------
#
# mmengine 0.10 loads checkpoints with torch.load's default, weights_only=True since torch 2.6,
# and its own checkpoints hold more than that unpickler takes: the MessageHub's HistoryBuffers
# (numpy arrays inside, and HistoryBuffer's statistics methods, which pickle as
# getattr(HistoryBuffer, "mean")) and numpy scalars in its runtime info (the "eta"). hwoptim's
# own state dicts need nothing (tests/test_mmengine_safe_load.py). While mmengine loads a
# checkpoint, the globals below are allowed, and only these; see docs/migrating-from-mmengine.md.

#: the statistics methods HistoryBuffer defines itself and pickles by name
_BUFFER_STATISTICS = ("min", "max", "current", "mean")
#: what a HistoryBuffer's pickled state holds (mmengine's __getstate__: its __dict__)
_BUFFER_STATE = frozenset({"max_length", "_log_history", "_count_history"})
#: torch >= 2.6: weights_only is torch.load's default, and allow lists take (global, name)
_WEIGHTS_ONLY_DEFAULT = torch.torch_version.TorchVersion(torch.__version__) >= "2.6"


def _refuse(message: str) -> NoReturn:
    raise pickle.UnpicklingError(f"hwoptim.mmengine refused this checkpoint: {message}")


def _check_history(values: Any, name: str) -> int:
    """The length of a HistoryBuffer's saved history: a 1-d array or list of real numbers."""
    if isinstance(values, np.ndarray):
        if values.ndim != 1 or values.dtype.kind not in "biuf":
            _refuse(f"a HistoryBuffer's {name} must be a 1-d numeric array; got {values.dtype} "
                    f"of shape {values.shape}")
        return len(values)
    if not isinstance(values, (list, tuple)):
        _refuse(f"a HistoryBuffer's {name} must be an array or a list; got {type(values).__name__}")
    bad = next((v for v in values if not isinstance(v, (int, float, np.integer, np.floating))), None)
    if bad is not None:
        _refuse(f"a HistoryBuffer's {name} must hold numbers; got a {type(bad).__name__}")
    return len(values)


def _check_buffer(logs: Any, counts: Any, max_length: Any) -> None:
    if _check_history(logs, "log history") != _check_history(counts, "count history"):
        _refuse("a HistoryBuffer's log and count histories differ in length")
    if type(max_length) is not int or max_length < 1:
        _refuse(f"a HistoryBuffer's max_length must be a positive int; got {max_length!r}")


class _CheckedHistoryBuffer(HistoryBuffer):  # type: ignore[misc]
    """HistoryBuffer's stand-in while a checkpoint loads: checks what the checkpoint gives,
    then becomes a plain HistoryBuffer (its ``__class__`` set back), so that nothing of it
    stays behind. It takes both pickled forms: mmengine's (``__new__``, then the instance
    dict through ``__setstate__``) and DeviceHistoryBuffer's (a call with lists)."""

    def __new__(cls, *args: Any) -> _CheckedHistoryBuffer:
        made = cast(_CheckedHistoryBuffer, super().__new__(cls))
        _unfinished.add(made)  # until its state is checked; see safe_loading
        return made

    def __init__(self, *args: Any) -> None:
        if len(args) > 3:
            _refuse(f"HistoryBuffer takes at most 3 arguments; the checkpoint gives {len(args)}")
        log_history, count_history, max_length = args + ((), (), 1000000)[len(args):]
        _check_buffer(log_history, count_history, max_length)
        super().__init__(list(log_history), list(count_history), max_length)
        self._finish()

    def _finish(self) -> None:
        _unfinished.discard(self)
        self.__class__ = HistoryBuffer

    def __setstate__(self, state: Any) -> None:
        if type(state) is not dict:
            _refuse(f"a HistoryBuffer's state must be a dict; got {type(state).__name__}")
        keys = set(state) - {"statistics_methods"}
        if keys != _BUFFER_STATE:
            _refuse(f"a HistoryBuffer's state holds the keys {sorted(map(str, keys))}; "
                    f"expected {sorted(_BUFFER_STATE)}")
        _check_buffer(state["_log_history"], state["_count_history"], state["max_length"])
        # mmengine's __setstate__ registers the saved statistics methods class-wide; here
        # they are only checked: each must be the method this process registered by that
        # name (custom ones: HistoryBuffer.register_statistics before resuming)
        self._set_default_statistics()
        methods = state.get("statistics_methods", {})
        if type(methods) is not dict:
            _refuse(f"a HistoryBuffer's statistics methods must be a dict; got {type(methods).__name__}")
        for name, method in methods.items():
            if HistoryBuffer._statistics_methods.get(name) is not method:
                _refuse(f"the HistoryBuffer statistics method {name!r} is not the one registered "
                        "in this process; register custom statistics "
                        "(HistoryBuffer.register_statistics) before resuming")
        self.__dict__.update(
            max_length=state["max_length"],
            _log_history=np.asarray(state["_log_history"]),
            _count_history=np.asarray(state["_count_history"]),
        )
        self._finish()


#: stand-ins made but not given their state yet: a checkpoint that leaves one so is refused
_unfinished: weakref.WeakSet[_CheckedHistoryBuffer] = weakref.WeakSet()


def _buffer_statistic(owner: Any, name: Any) -> Any:
    """What a checkpoint's ``getattr`` may fetch: one of HistoryBuffer's own statistics
    methods (how its pickled state names them), nothing else."""
    if owner not in (HistoryBuffer, _CheckedHistoryBuffer) or name not in _BUFFER_STATISTICS:
        what = owner.__qualname__ if isinstance(owner, type) else f"a {type(owner).__name__}"
        _refuse(f"getattr({what}, {name!r}): a checkpoint may only name HistoryBuffer's "
                f"statistics methods {list(_BUFFER_STATISTICS)} this way")
    return getattr(HistoryBuffer, name)


def _numpy_globals() -> list[Any]:
    """numpy arrays, dtypes and scalars of numeric types, under numpy 1's and 2's names."""
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # pragma: no cover - numpy < 2
        multiarray = importlib.import_module("numpy.core.multiarray")
    found: list[Any] = [np.ndarray, np.dtype]
    for fn in (multiarray._reconstruct, multiarray.scalar):
        found += [(fn, f"numpy.{package}.multiarray.{fn.__name__}") for package in ("core", "_core")]
    # a dtype is rebuilt through np.dtype, then its state set: that needs its own type
    numeric = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
               np.uint64, np.float16, np.float32, np.float64]
    found += [type(np.dtype(t)) for t in numeric]
    return found


def safe_globals() -> list[Any]:
    """The globals ``safe_loading`` allows, in the form torch.serialization takes."""
    return [
        (_CheckedHistoryBuffer, f"{HistoryBuffer.__module__}.{HistoryBuffer.__qualname__}"),
        (_buffer_statistic, "builtins.getattr"),
        *_numpy_globals(),
    ]


@contextlib.contextmanager
def safe_loading() -> Iterator[None]:
    """Within the block, ``torch.load(..., weights_only=True)`` takes mmengine's checkpoints.

    Allows the globals of :func:`safe_globals`: HistoryBuffer and ``getattr`` through checked
    stand-ins, numpy's arrays, numeric dtypes and scalars. mmengine's checkpoint loading
    (Runner.resume, load_checkpoint) runs inside it while this module is imported; use it
    for a ``torch.load`` of such a checkpoint of your own. torch keeps one allow list per
    process: a load in another thread meanwhile sees the same. Globals already allowed
    stay allowed after the block.
    """
    if not _WEIGHTS_ONLY_DEFAULT:
        raise RuntimeError(
            f"hwoptim.mmengine.safe_loading needs torch >= 2.6; this is torch {torch.__version__}, "
            "whose allow lists cannot name the checked stand-ins"
        )
    present = set(torch.serialization.get_safe_globals())
    # only what is not allowed yet, so that leaving the block takes away nothing of anyone else's
    added = [g for g in safe_globals() if g not in present]
    _unfinished.clear()
    try:
        with torch.serialization.safe_globals(added):
            yield
        if _unfinished:
            _refuse("it holds a HistoryBuffer without its state")
    finally:
        _unfinished.clear()


def _loading_safely(loader: Callable[..., Any]) -> Callable[..., Any]:
    """``loader`` (one of mmengine's checkpoint loaders) run inside :func:`safe_loading`."""

    @functools.wraps(loader)  # mmengine logs the loader's __name__
    def load(*args: Any, **kwargs: Any) -> Any:
        with safe_loading():
            return loader(*args, **kwargs)

    load._hwoptim_safe_loading = True  # type: ignore[attr-defined]
    return load


def _install_safe_loading() -> None:
    """Run every checkpoint loader mmengine has registered inside :func:`safe_loading`.

    Every checkpoint mmengine loads (Runner and FlexibleRunner resume and load_checkpoint,
    the strategies, ``mmengine.runner.load_checkpoint``) goes through
    ``CheckpointLoader.load_checkpoint``, which picks a loader by the path's scheme:
    re-registering each through mmengine's public ``register_scheme`` scopes the allow list
    to those loads. Once per loader, also on a re-import. On torch < 2.6 mmengine's loads
    are not weights_only and nothing is needed.
    """
    if not _WEIGHTS_ONLY_DEFAULT:  # pragma: no cover - torch < 2.6
        return
    for prefix, loader in list(_MMCheckpointLoader._schemes.items()):
        if not getattr(loader, "_hwoptim_safe_loading", False):
            _MMCheckpointLoader.register_scheme(prefix, _loading_safely(loader), force=True)
