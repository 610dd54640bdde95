"""tests/mmengine_suite/run.py: how it counts mmengine's test outcomes (the run itself needs
mmengine's source tree, see docs/migrating-from-mmengine.md, "mmengine's own tests")."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SUITE = Path(__file__).parent / "mmengine_suite" / "run.py"
spec = importlib.util.spec_from_file_location("mmengine_suite_run", SUITE)
assert spec is not None and spec.loader is not None
run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run)

ABORT = '<skipped type="pytest.skip" message="Skip test {} due to the program abort"/>'
JUNIT = f"""<testsuites><testsuite>
<testcase classname="tests.test_optim.test_optimizer.test_optimizer_wrapper.TestOptimWrapper" name="test_step">
{ABORT.format("test_step")}</testcase>
<testcase classname="tests.test_optim.test_optimizer.test_optimizer_wrapper.TestOptimWrapper" name="test_backward">
{ABORT.format("test_backward")}</testcase>
<testcase classname="tests.test_optim.test_optimizer.test_optimizer_wrapper.TestOptimWrapper" name="test_zero_grad">
{ABORT.format("test_zero_grad")}</testcase>
<testcase classname="tests.test_runner.test_runner.TestRunner" name="test_train"/>
<testcase classname="tests.test_runner.test_runner.TestRunner" name="test_val"><failure message="x"/></testcase>
<testcase classname="tests.test_runner.test_runner.TestRunner" name="test_cuda">
<skipped message="cuda should be available"/></testcase>
</testsuite></testsuites>"""


def _ranks(path: Path, records: list[tuple[str, int, str]]) -> None:
    path.write_text("".join(
        json.dumps({"file": "/x/tests/test_optim/test_optimizer/test_optimizer_wrapper.py",
                    "class": "TestOptimWrapper", "test": test, "rank": rank, "outcome": outcome}) + "\n"
        for test, rank, outcome in records
    ))


def test_a_multi_process_test_passes_only_when_every_rank_passed(tmp_path):
    """mmengine's harness says "skipped" of every multi-process test, however its ranks ended."""
    (tmp_path / "j.xml").write_text(JUNIT)
    _ranks(tmp_path / "r.jsonl", [("test_step", 0, "passed"), ("test_step", 1, "passed"),
                                  ("test_backward", 0, "passed"), ("test_backward", 1, "crashed")])
    got = run.outcomes(tmp_path / "j.xml", tmp_path / "r.jsonl")
    wrapper = "test_optimizer_wrapper.py::TestOptimWrapper::"
    assert got[wrapper + "test_step"] == "passed"
    assert got[wrapper + "test_backward"].startswith("failed in a rank")  # rank 1 died
    assert got[wrapper + "test_zero_grad"].startswith("failed in a rank")  # no rank recorded
    assert got["test_runner.py::TestRunner::test_train"] == "passed"
    assert got["test_runner.py::TestRunner::test_val"] == "failed"
    assert got["test_runner.py::TestRunner::test_cuda"] == "skipped"


def test_the_comparison_allows_only_the_listed_differences():
    deliberate = next(iter(run.DELIBERATE))
    theirs = {"a.py::T::one": "passed", "a.py::T::two": "passed", "a.py::T::cuda": "skipped",
              deliberate: "passed"}
    ours = {"a.py::T::one": "passed", "a.py::T::two": "failed", "a.py::T::cuda": "skipped",
            deliberate: "failed"}
    not_run = [f"LISTED AS DELIBERATE BUT NOT RUN: {t}" for t in sorted(set(run.DELIBERATE) - {deliberate})]
    assert run.compare(theirs, ours) == ["FAILS WITH HWOPTIM: a.py::T::two (failed)", *not_run]
    ours[deliberate] = "passed"  # fixed since: the list must say so
    assert f"LISTED AS DELIBERATE BUT PASSES: {deliberate}" in run.compare(theirs, ours)


def test_the_selection_is_the_issues():
    assert "tests/test_runner/test_runner.py" in run.SELECTION
    assert "tests/test_optim/test_scheduler" in run.SELECTION
    assert all(reason for reason in run.DELIBERATE.values())
