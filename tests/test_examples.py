"""Every script in examples/ runs, as a user would run it, with a few steps.

Each ``examples/*.py`` is found by a glob, so a new example is covered without editing this
file. An example says how its smoke run goes with comment lines near its top:

    # smoke-args: --steps 3 --log-every 1    the quick run's arguments (default: --steps 3)
    # smoke-expect: done:                    text the output must contain (repeatable)
    # smoke-skip: tests/test_ddp_example.py  not run here: that test file runs it (for
                                             examples that need torchrun, say); it must
                                             exist and name the example

Without a smoke-expect line the output must simply not be empty.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from helpers import assert_same

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = ROOT / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.py"))
_DIRECTIVE = re.compile(r"^# smoke-(args|expect|skip):\s*(.*?)\s*$", re.MULTILINE)


def directives(path: Path) -> dict[str, list[str]]:
    """The ``# smoke-...`` lines of an example, by kind."""
    found: dict[str, list[str]] = {}
    for kind, value in _DIRECTIVE.findall(path.read_text(encoding="utf-8")):
        found.setdefault(kind, []).append(value)
    return found


def example_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    # Default checkpoint paths go to tempfile.gettempdir(): keep them in this test's folder.
    env["TMPDIR"] = str(tmp_path)
    # Tiny models: one thread is faster, and spares a CI machine already busy with pytest.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def load_example(name: str) -> ModuleType:
    """Import examples/<name>.py as a module, to call its main(argv) in this process."""
    path = EXAMPLES_DIR / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"hwoptim_example_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RUN_HERE = [p for p in EXAMPLES if "skip" not in directives(p)]
RUN_ELSEWHERE = [p for p in EXAMPLES if "skip" in directives(p)]


def test_the_examples_are_found():
    names = {p.name for p in EXAMPLES}
    assert {"plain_loop.py", "mmengine_config.py", "gan.py"} <= names


def test_the_examples_readme_lists_every_example():
    readme = (EXAMPLES_DIR / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in EXAMPLES if p.name not in readme]
    assert not missing, f"examples/README.md does not mention {missing}"


@pytest.mark.parametrize("path", RUN_ELSEWHERE, ids=lambda p: p.name)
def test_an_example_run_elsewhere_is_run_by_the_test_it_names(path: Path):
    covering = ROOT / shlex.split(directives(path)["skip"][0])[0]
    assert covering.is_file(), f"{path.name}: smoke-skip names {covering}, which does not exist"
    assert path.name in covering.read_text(encoding="utf-8"), (
        f"{path.name}: smoke-skip names {covering.name}, which never mentions {path.name}"
    )


@pytest.mark.parametrize("path", RUN_HERE, ids=lambda p: p.name)
def test_example_runs(path: Path, tmp_path: Path):
    found = directives(path)
    args = shlex.split(found["args"][0]) if "args" in found else ["--steps", "3"]
    result = subprocess.run(
        [sys.executable, str(path), *args], cwd=tmp_path, env=example_env(tmp_path),
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"{path.name} {' '.join(args)} failed:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    for text in found.get("expect", []):
        assert text in result.stdout, f"{path.name}: {text!r} not in its output:\n{result.stdout}"
    assert result.stdout.strip(), f"{path.name} printed nothing"


def test_directives_are_read():
    found = directives(EXAMPLES_DIR / "plain_loop.py")
    assert found["args"] and found["expect"]
    assert "skip" not in found


# -- behaviour the examples promise ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [None, "float16"])
def test_plain_loop_resumes_exactly_from_its_checkpoint(dtype, tmp_path, capsys):
    plain_loop = load_example("plain_loop")
    common = ["--steps", "13", "--accum", "3", "--save-every", "1", "--log-every", "4",
              "--batch-size", "16"] + (["--dtype", dtype] if dtype else [])
    straight, interrupted = tmp_path / "straight.pt", tmp_path / "interrupted.pt"

    plain_loop.main([*common, "--checkpoint", str(straight)])
    plain_loop.main([*common, "--checkpoint", str(interrupted), "--stop-after", "8"])
    out = capsys.readouterr().out
    assert "stopped after 8 micro-batches" in out
    # The last checkpoint is at the end of the last whole window before the stop.
    assert torch.load(interrupted, weights_only=True)["optim"]["hwoptim"]["inner_count"] == 6

    plain_loop.main([*common, "--checkpoint", str(interrupted), "--resume"])
    out = capsys.readouterr().out
    assert "at micro-batch 6" in out and "done: 13 micro-batches, 5 optimizer updates" in out
    # Model, optimizer, loss scaler, counters and lr schedule: bit for bit the same.
    assert_same(torch.load(straight, weights_only=True), torch.load(interrupted, weights_only=True))


def test_plain_loop_logs_the_loss_scale_under_float16(tmp_path, capsys):
    plain_loop = load_example("plain_loop")
    plain_loop.main(["--steps", "4", "--accum", "2", "--log-every", "2", "--batch-size", "8",
                     "--dtype", "float16", "--checkpoint", str(tmp_path / "c.pt")])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert len(lines) == 2
    for line in lines:
        assert re.search(r"grad_norm \d+\.\d+  loss_scale \d+  skipped 0$", line), line


def test_variable_size_batches_equals_the_per_token_reference_not_mmengines_rule(capsys):
    example = load_example("variable_size_batches")
    example.main(["--steps", "7", "--accum", "3", "--check", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "num_items: same as the per-token reference" in out
    away = float(re.search(r"mmengine's rule \(mean per micro-batch\) ends (\S+) away", out).group(1))
    assert away > 1e-3  # the micro-batches really differ in size: the rules disagree
