"""``compile_step``: the update (unscale, clip, guard, skip count, step) through torch.compile.

The option is validated when the wrapper is made; ``torch.compile`` is applied lazily, once
per wrapper, and the compiled function is built on its first call. Whatever stops
compilation (a torch without a working ``torch.compile``, no C++ compiler for the CPU
backend, an error inside the compiler) costs no update: the wrapper warns once, saying why,
and runs the same update function uncompiled from then on.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Callable, Union

import torch

from hwoptim import _warnings as warnings  # Python warnings, also in mmengine's log (_warnings.py)

#: what ``compile_step`` takes: False, True or a dict of torch.compile keyword arguments
CompileStep = Union[bool, Mapping[str, Any]]

#: torch.compile's own keyword arguments, with the types compile_step accepts for them
_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "fullgraph": ((bool,), "True or False"),
    "dynamic": ((bool, type(None)), "True, False or None"),
    "backend": ((str,), "a backend name (torch._dynamo.list_backends()) or a callable"),
    "mode": ((str, type(None)), "None or a mode name"),
    "options": ((Mapping, type(None)), "a dict of inductor options or None"),
    "disable": ((bool,), "True or False"),
}
_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def parse_compile_step(value: Any) -> dict[str, Any] | None:
    """None for ``False`` (eager); the ``torch.compile`` keyword arguments otherwise.

    ``True`` means ``torch.compile``'s defaults. A dict is checked key by key against
    ``torch.compile``'s signature (its function argument is hwoptim's to pass), so a typo
    fails here, when the wrapper is made, not at the first update.
    """
    if value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(
            "compile_step must be True, False or a dict of torch.compile keyword arguments "
            f"(e.g. dict(mode='max-autotune')); got {value!r}"
        )
    accepted = [name for name in inspect.signature(torch.compile).parameters if name != "model"]
    unknown = sorted(str(key) for key in value if key not in accepted)
    if unknown:
        raise ValueError(
            f"compile_step does not take {', '.join(map(repr, unknown))}; torch.compile "
            f"takes {', '.join(accepted)}"
        )
    for key, given in value.items():
        types, allowed = _TYPES.get(key, ((object,), ""))
        if key == "backend" and callable(given):
            continue
        if not isinstance(given, types):
            raise TypeError(f"compile_step {key!r} must be {allowed}; got {given!r}")
    backend = value.get("backend")
    if isinstance(backend, str):
        from torch import _dynamo  # only where compile_step is used: it is slow to import

        known = _dynamo.list_backends(exclude_tags=())
        if backend not in known:
            raise ValueError(
                f"compile_step backend {backend!r} is not a torch.compile backend; known: "
                f"{', '.join(known)}"
            )
    mode = value.get("mode")
    if mode is not None and mode not in _MODES:
        raise ValueError(f"compile_step mode {mode!r} is not one of {', '.join(map(repr, _MODES))}")
    return dict(value)


class CompiledUpdate:
    """A function run through ``torch.compile``, or uncompiled once compiling has failed.

    The first call compiles (``torch.compile`` is lazy). It is the one that can fail for
    reasons of the environment; ``restore`` (given by the caller) undoes what a partly run
    compiled function may have done to its inputs before the failure, so that the update
    then runs uncompiled, once, and exactly. Later calls run whichever function won.
    """

    __slots__ = ("_fn", "_kwargs", "_plain", "_ready", "owner", "reason")

    def __init__(self, fn: Callable[..., Any], kwargs: Mapping[str, Any], owner: str) -> None:
        self._plain = fn
        self._kwargs = dict(kwargs)
        self._fn: Callable[..., Any] | None = None
        self._ready = False
        self.owner = owner
        #: why compilation was given up, or None while it works (or has not been tried)
        self.reason: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        """A copy (copy.deepcopy, pickle) compiles afresh, for the copy's own function:
        the compiled one belongs to the original wrapper and would step its optimizer."""
        return {"plain": self._plain, "kwargs": self._kwargs, "owner": self.owner,
                "reason": self.reason}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._plain = state["plain"]
        self._kwargs = state["kwargs"]
        self.owner = state["owner"]
        self.reason = state["reason"]
        self._fn = None
        self._ready = False

    @property
    def kwargs(self) -> dict[str, Any]:
        """The torch.compile keyword arguments (a copy)."""
        return dict(self._kwargs)

    @property
    def compiled(self) -> bool:
        """Whether calls run the compiled function (False after a fallback)."""
        return self.reason is None

    def first_call(self, save: Callable[[], Callable[[], None]], *args: Any) -> Any:
        """Compile and run; on failure undo (``save()`` returns the undo) and run plain.

        Only when the plain function then succeeds was the failure the compiler's: warn and
        stay uncompiled. An error of the update itself (a bad ``step_kwargs``) is raised
        by the plain run, as eagerly, and the next update tries compiling again.
        """
        undo = save()
        try:
            self._fn = torch.compile(self._plain, **self._kwargs)
            out = self._fn(*args)
        except Exception as exc:
            undo()
            out = self._plain(*args)
            self._give_up(exc)
        self._ready = True
        return out

    def __call__(self, *args: Any) -> Any:
        fn = self._fn if self.reason is None else self._plain
        assert fn is not None
        return fn(*args)

    @property
    def ready(self) -> bool:
        """Whether the first call (the one that compiles) has happened."""
        return self._ready

    def _give_up(self, exc: BaseException) -> None:
        detail = _describe(exc)
        root = exc
        for _ in range(8):  # the compiler wraps the cause (BackendCompilerFailed, ...)
            inner = getattr(root, "inner_exception", None) or root.__cause__
            if not isinstance(inner, BaseException) or inner is root:
                break
            root = inner
        if root is not exc:
            detail = f"{type(exc).__name__}, caused by {_describe(root)}"
        self.reason = detail
        self._fn = None
        warnings.warn(
            f"{self.owner}(compile_step=...): torch.compile could not compile the update "
            f"({detail}); the update runs uncompiled from now on, with the same results. "
            "Check that torch.compile works here (a C++ compiler for the CPU, Triton for "
            "a GPU, a supported Python), or pass compile_step=False to silence this.",
            RuntimeWarning,
            stacklevel=4,
        )


def _describe(exc: BaseException) -> str:
    """``Type: first line of the message``."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
