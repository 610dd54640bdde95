"""mmengine's own tests, with mmengine's wrappers and then with hwoptim's: one command.

    python tests/mmengine_suite/run.py --mmengine-src PATH   # a checkout of mmengine v0.10.7
    python tests/mmengine_suite/run.py                       # clones it (needs GitHub)

What it does (docs/migrating-from-mmengine.md, "mmengine's own tests"):

1. makes a virtual environment of its own (``--venv``, kept for the next run): torch 2.13.0
   first (the CPU build where pip finds it), then full mmengine 0.10.7, pytest and
   parameterized, and this checkout of hwoptim without its dependencies;
2. takes mmengine's tests at the release tag v0.10.7, checking the commit: PyPI's sdists of
   mmengine and mmengine-lite 0.10.7 hold no tests/, and no other registry has them, so
   they come from a checkout (``--mmengine-src``) or a clone of the tag;
3. runs SELECTION twice, with HWOPTIM_SUITE_CLASSES=mmengine and =hwoptim (site/
   sitecustomize.py substitutes the classes in every process, the ranks of mmengine's
   multi-process tests included, and records each rank's outcome);
4. compares per test: every test that passes with mmengine's classes must pass with
   hwoptim's, except those in DELIBERATE, each with its reason; a listed test that passes
   is reported too (the list is then out of date). Exit status 1 on any unexpected outcome.

mmengine's MultiProcessTestCase reports every multi-process test "skipped ... due to the
program abort" however its ranks ended; such a test counts as passed here only when every
rank recorded "passed".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MMENGINE_VERSION = "0.10.7"
#: the commit of mmengine's tag v0.10.7
MMENGINE_COMMIT = "390ba2fbb272816adfd2883642326d0fd0ca6049"
MMENGINE_GIT = "https://github.com/open-mmlab/mmengine.git"
WORLD_SIZE = 2  # MultiProcessTestCase's default, which every selected test keeps

#: mmengine's tests that drive its optimizer wrappers: the wrapper, wrapper-dict and
#: builder tests, the schedulers, the Runner, the hooks that drive the optimizer, the
#: models' train_step and the model wrappers
SELECTION = [
    "tests/test_optim/test_optimizer/test_optimizer.py",
    "tests/test_optim/test_optimizer/test_optimizer_wrapper.py",
    "tests/test_optim/test_optimizer/test_optimizer_wrapper_dict.py",
    "tests/test_optim/test_scheduler",
    "tests/test_runner/test_runner.py",
    "tests/test_hooks/test_checkpoint_hook.py",
    "tests/test_hooks/test_early_stopping_hook.py",
    "tests/test_hooks/test_param_scheduler_hook.py",
    "tests/test_hooks/test_runtime_info_hook.py",
    "tests/test_model/test_base_model/test_base_model.py",
    "tests/test_model/test_wrappers/test_model_wrapper.py",
]

_WRAPPER = "test_optimizer_wrapper.py::TestOptimWrapper::"
_DICT = "test_optimizer_wrapper_dict.py::TestOptimWrapperDict::"
#: the tests that pass with mmengine's classes and fail with hwoptim's on purpose, each with
#: the difference (docs/migrating-from-mmengine.md, "Differs on purpose", says why)
DELIBERATE = {
    _WRAPPER + "test_init":
        "clip_grad=[] raises TypeError (not a dict), not AssertionError: an assert vanishes "
        "under python -O, and a wrong type is a TypeError",
    _WRAPPER + "test_ger_lr":
        "get_lr() has no 'base_lr': hwoptim adds no fake base parameter group",
    _WRAPPER + "test_state_dict":
        "state_dict() holds one more key, 'hwoptim' (the accumulation counters, for an "
        "exact resume)",
    _WRAPPER + "test_load_state_dict":
        "the same key: the test compares state_dict() with the optimizer's own",
    _DICT + "test_init":
        "a member that is not an OptimWrapper raises TypeError, not AssertionError",
    "test_runner.py::TestRunner::test_build_optim_wrapper":
        "given a dict of built wrappers, mmengine's Runner builds mmengine's own "
        "OptimWrapperDict (its runner module holds that class; hwoptim does not patch "
        "mmengine): hwoptim warns through mmengine's logger at the first step, and "
        "optim_wrapper=hwoptim.OptimWrapperDict(...) gives the Runner hwoptim's dict",
}


def _run(cmd: list[str], **kwargs: object) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kwargs)  # type: ignore[call-overload]


def make_venv(venv: Path) -> Path:
    """The suite's Python, with torch 2.13.0, full mmengine and this hwoptim."""
    python = venv / "bin" / "python"
    if not python.exists():
        _run([sys.executable, "-m", "venv", str(venv)])
    pip = [str(python), "-m", "pip", "install", "-q"]
    # torch first and pinned: unpinned, it would pull a CUDA build of several GB
    _run([*pip, "torch==2.13.0"])
    _run([*pip, f"mmengine=={MMENGINE_VERSION}", "pytest>=7", "parameterized"])
    _run([*pip, "--no-deps", "--force-reinstall", str(REPO)])
    return python


def mmengine_tests(src: Path | None, work: Path) -> Path:
    """mmengine's source tree at v0.10.7: ``src`` checked, or a fresh clone of the tag."""
    if src is None:
        src = work / "mmengine"
        if not src.exists():
            _run(["git", "clone", "--quiet", "--depth", "1", "--branch", f"v{MMENGINE_VERSION}",
                  MMENGINE_GIT, str(src)])
    if (src / ".git").exists():
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
        if head != MMENGINE_COMMIT:
            sys.exit(f"{src} is at {head}, not mmengine v{MMENGINE_VERSION} ({MMENGINE_COMMIT})")
    missing = [path for path in SELECTION if not (src / path).exists()]
    if missing:
        sys.exit(f"{src} is not mmengine's source tree: it lacks {missing}")
    return src


def run_suite(python: Path, src: Path, classes: str, work: Path) -> dict[str, str]:
    """Run SELECTION with ``classes``; each test's outcome, by its id ``file::Class::test``."""
    junit, ranks = work / f"{classes}.xml", work / f"{classes}-ranks.jsonl"
    ranks.unlink(missing_ok=True)
    env = dict(os.environ, HWOPTIM_SUITE_CLASSES=classes, HWOPTIM_SUITE_RANKS=str(ranks),
               PYTHONPATH=str(HERE / "site"),
               # mmengine 0.10.7 loads its own checkpoints with torch.load's default, which
               # refuses them since torch 2.6 (with its wrappers as with hwoptim's)
               TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    cmd = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore",
           f"--junitxml={junit}", *SELECTION]
    print(f"+ HWOPTIM_SUITE_CLASSES={classes}", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=src, env=env, check=False)  # its outcomes are read below
    return outcomes(junit, ranks)


def outcomes(junit: Path, ranks: Path) -> dict[str, str]:
    """passed / failed / skipped per test; a multi-process test by its ranks' records."""
    by_rank: dict[tuple[str, str, str], dict[int, str]] = {}
    if ranks.exists():
        for line in ranks.read_text().splitlines():
            rec = json.loads(line)
            key = (Path(rec["file"]).name, rec["class"], rec["test"])
            by_rank.setdefault(key, {})[rec["rank"]] = rec["outcome"]
    result: dict[str, str] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        module, _, cls = case.get("classname", "").rpartition(".")
        name = case.get("name", "")
        test_id = f"{module.rpartition('.')[2]}.py::{cls}::{name}"
        skipped = case.find("skipped")
        if case.find("failure") is not None or case.find("error") is not None:
            result[test_id] = "failed"
        elif skipped is not None and "due to the program abort" in skipped.get("message", ""):
            # MultiProcessTestCase says this of every multi-process test: ask the ranks
            seen = by_rank.get((f"{module.rpartition('.')[2]}.py", cls, name), {})
            all_passed = [seen.get(rank) for rank in range(WORLD_SIZE)] == ["passed"] * WORLD_SIZE
            result[test_id] = "passed" if all_passed else f"failed in a rank ({seen or 'no rank ran'})"
        elif skipped is not None:
            result[test_id] = "skipped"
        else:
            result[test_id] = "passed"
    return result


def compare(theirs: dict[str, str], ours: dict[str, str]) -> list[str]:
    """The unexpected outcomes, as lines to print (none: the run agrees)."""
    problems = []
    for test_id, outcome in sorted(theirs.items()):
        hw = ours.get(test_id, "not run")
        if outcome != "passed":
            continue
        if hw != "passed" and test_id not in DELIBERATE:
            problems.append(f"FAILS WITH HWOPTIM: {test_id} ({hw})")
        if hw == "passed" and test_id in DELIBERATE:
            problems.append(f"LISTED AS DELIBERATE BUT PASSES: {test_id}")
    for test_id in sorted(set(DELIBERATE) - set(theirs)):
        problems.append(f"LISTED AS DELIBERATE BUT NOT RUN: {test_id}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mmengine-src", type=Path, help="mmengine's source tree at v0.10.7")
    parser.add_argument("--work", type=Path, default=REPO / ".mmengine-suite",
                        help="where the venv, the clone and the reports go (default: %(default)s)")
    parser.add_argument("--python", type=Path,
                        help="a Python that already has what make_venv installs (skips the venv)")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    python = args.python or make_venv(args.work / "venv")
    src = mmengine_tests(args.mmengine_src, args.work)
    theirs = run_suite(python, src, "mmengine", args.work)
    ours = run_suite(python, src, "hwoptim", args.work)
    for test_id, reason in sorted(DELIBERATE.items()):
        print(f"deliberate: {test_id} ({ours.get(test_id, 'not run')}): {reason}")
    problems = compare(theirs, ours)
    for line in problems:
        print(line)
    passed_theirs = sum(o == "passed" for o in theirs.values())
    passed_ours = sum(o == "passed" for o in ours.values())
    print(f"mmengine's classes: {passed_theirs} passed of {len(theirs)}; hwoptim's: "
          f"{passed_ours} passed, {len(DELIBERATE)} deliberate differences; "
          f"{time.monotonic() - start:.0f} s")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
