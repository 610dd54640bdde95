"""python -m hwoptim env | demo."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hwoptim.__main__ import environment_report, main, run_demo


def test_env_table_lists_backends_and_why_not(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "device='auto' picks:" in out
    assert "cpu" in out and "cuda" in out and "gloo" in out
    assert "built-in" in out


def test_env_json_is_machine_readable(capsys):
    assert main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    names = {b["name"] for b in report["backends"]}
    assert {"cpu", "cuda"} <= names
    cpu = next(b for b in report["backends"] if b["name"] == "cpu")
    assert cpu["available"] is True and cpu["origin"] == "built-in"
    assert report["torch"] and report["hwoptim"]


def test_environment_report_names_the_auto_choice(monkeypatch):
    monkeypatch.setenv("HWOPTIM_DEVICE", "cpu")
    report = environment_report()
    assert report["auto"] == "cpu" and report["env_override"] == "cpu"


def test_demo_trains_and_summarises(capsys):
    assert main(["demo", "--device", "cpu", "--steps", "24", "--accum", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    for key in ("device", "dtype", "steps", "updates", "skipped_steps", "loss_first", "loss_last", "ms_per_step"):
        assert key in out


def test_demo_summary_numbers():
    summary = run_demo(device="cpu", dtype="float16", steps=20, accum=4, clip=0.5, progress=False)
    assert summary["updates"] == 5 and summary["loss_scaling"] is True
    assert summary["loss_last"] < summary["loss_first"]
    assert summary["dtype"] == "float16" and summary["skipped_steps"] >= 0


@pytest.mark.parametrize("argv", [["demo", "--steps", "0"], ["demo", "--clip", "-1"], ["demo", "--bogus"], []])
def test_bad_flags_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_unavailable_device_says_what_to_do(capsys):
    assert main(["demo", "--device", "tpu", "--quiet"]) == 2
    assert "unknown device 'tpu'" in capsys.readouterr().err


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "hwoptim", "env"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "backend" in result.stdout
