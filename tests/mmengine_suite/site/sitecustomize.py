"""Loaded at the start of every Python process of the mmengine suite run (run.py puts this
folder on PYTHONPATH), so that mmengine's multi-process tests see the same classes in every
rank as in the parent: their ranks are new interpreters started with ``spawn``.

HWOPTIM_SUITE_CLASSES=hwoptim substitutes hwoptim's wrappers as an installed hwoptim is
seen by an mmengine user whose config names them: mmengine's runner, hooks, strategies and
model wrappers are imported first and keep the names they imported (mmengine's classes, as
in any process), then ``hwoptim.mmengine`` is imported, and ``OptimWrapper``,
``AmpOptimWrapper`` and ``OptimWrapperDict`` are replaced in ``mmengine.optim`` (where the
tests import them from) and in mmengine's OPTIM_WRAPPERS registry (where a config's
``type="OptimWrapper"`` is looked up). HWOPTIM_SUITE_CLASSES=mmengine changes nothing.

HWOPTIM_SUITE_RANKS=<file>: every rank of a MultiProcessTestCase appends one JSON line, its
test, rank and outcome, to that file. The harness judges a test by its ranks' exit codes
only (a rank that dies from a signal passes, one whose exit code happens to be a skip code
reports the whole test skipped), so run.py counts a multi-process test as passed only when
every rank recorded "passed".
"""

from __future__ import annotations

import json
import os
import sys


def _substitute() -> None:
    import mmengine.hooks  # first: the runner, hooks and models keep mmengine's own classes
    import mmengine.model
    import mmengine.optim
    import mmengine.optim.optimizer
    import mmengine.runner
    from mmengine.registry import OPTIM_WRAPPERS

    import hwoptim
    import hwoptim.mmengine  # the bridge, as a config's custom_imports loads it

    for name in ("OptimWrapper", "AmpOptimWrapper", "OptimWrapperDict"):
        cls = getattr(hwoptim, name)
        setattr(mmengine.optim, name, cls)
        setattr(mmengine.optim.optimizer, name, cls)
        if name != "OptimWrapperDict":  # mmengine registers no OptimWrapperDict
            OPTIM_WRAPPERS.register_module(name=name, module=cls, force=True)


def _record_ranks(path: str) -> None:
    from mmengine.testing._internal import MultiProcessTestCase

    original = MultiProcessTestCase._run.__func__
    skip_codes = {10: "failed", 11: "skipped", 12: "skipped", 13: "skipped"}

    def _run(cls, rank, test_name, file_name, parent_pipe):  # type: ignore[no-untyped-def]
        outcome = "crashed"
        try:
            original(cls, rank, test_name, file_name, parent_pipe)
            outcome = "passed"
        except SystemExit as exc:  # run_test exits 10 on an exception, 13 on a skip
            outcome = skip_codes.get(exc.code, f"exit {exc.code}")  # type: ignore[arg-type]
            raise
        finally:
            module = sys.modules[cls.__module__]
            line = {"file": os.path.realpath(module.__file__ or ""), "class": cls.__qualname__,
                    "test": test_name, "rank": rank, "outcome": outcome}
            with open(path, "a") as out:
                out.write(json.dumps(line) + "\n")

    MultiProcessTestCase._run = classmethod(_run)


_classes = os.environ.get("HWOPTIM_SUITE_CLASSES")
if _classes == "hwoptim":
    _substitute()
elif _classes not in (None, "mmengine"):
    raise RuntimeError(f"HWOPTIM_SUITE_CLASSES must be 'hwoptim' or 'mmengine'; got {_classes!r}")
if os.environ.get("HWOPTIM_SUITE_RANKS"):
    _record_ranks(os.environ["HWOPTIM_SUITE_RANKS"])
