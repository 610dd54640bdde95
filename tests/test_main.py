"""``python -m hwoptim env | demo``: the environment report (every backend, built-in or
plugin with its package, whether it is available and why not, its devices, dtypes,
collectives and versions) and the demo run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from hwoptim.__main__ import environment_report, main, run_demo
from hwoptim.testing import mock_backend


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
    for key in ("device", "dtype", "steps", "updates", "skipped_steps", "zeroed_steps", "loss_first",
                "loss_last", "ms_per_step"):
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


def test_demo_plots_loss_and_loss_scale(tmp_path, capsys):
    path = tmp_path / "curves.png"
    argv = ["demo", "--device", "cpu", "--dtype", "float16", "--steps", "20", "--quiet", "--plot", str(path)]
    assert main(argv) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(path) in capsys.readouterr().out


def test_demo_progress_bar_shows_loss_norm_and_scale(capsys):
    assert main(["demo", "--device", "cpu", "--dtype", "float16", "--steps", "20"]) == 0
    out = capsys.readouterr().out
    assert "loss=" in out and "grad_norm=" in out and "scale=" in out


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="torch_npu is installed here")
def test_demo_on_a_missing_device_says_what_to_install(capsys):
    assert main(["demo", "--device", "npu", "--quiet"]) == 2
    assert 'pip install "hwoptim[npu]"' in capsys.readouterr().err


def test_unavailable_device_says_what_to_do(capsys):
    assert main(["demo", "--device", "tpu", "--quiet"]) == 2
    assert "unknown device 'tpu'" in capsys.readouterr().err


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "hwoptim", "env"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "backend" in result.stdout


# -- env through the mocks and plugins --------------------------------------------------


def rows(report: dict) -> dict[str, dict]:
    return {b["name"]: b for b in report["backends"]}


def test_env_lists_every_backend_with_its_origin_and_reason() -> None:
    backends = rows(environment_report())
    assert {"cpu", "cuda", "mps", "npu", "xpu"} <= set(backends)
    assert {b["origin"] for n, b in backends.items() if n in ("cpu", "npu")} == {"built-in"}
    for facts in backends.values():
        assert facts["available"] or facts["reason"]


def test_env_shows_devices_dtypes_dist_and_versions_of_a_present_device() -> None:
    with mock_backend("npu", device_count=2, select=False):
        report = environment_report()
    npu = rows(report)["npu"]
    assert npu["available"] is True and npu["device_count"] == 2
    assert npu["devices"] == ["hwoptim mock of torch.npu"] * 2
    assert npu["dist_backend"] == "hccl" and npu["default_dtype"] == "float16"
    assert "torch_npu" in npu["versions"]


def test_env_lists_an_unclaimed_accelerator_through_the_generic_backend() -> None:
    with mock_backend("generic"):
        report = environment_report()
    first = report["backends"][0]
    assert (first["name"], first["origin"]) == ("privateuseone", "generic (torch.accelerator)")
    assert report["current_accelerator"] == "privateuseone"
    assert report["auto"] == "privateuseone"


def test_env_names_the_package_of_a_plugin_and_the_plugins_that_failed(
    plugin_dist: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.warns(RuntimeWarning):
        assert main(["env"]) == 0
    text = capsys.readouterr().out
    alpha = next(line for line in text.splitlines() if line.startswith("alpha "))
    assert alpha.split()[-2:] == ["fake-hwoptim-plugin", "1.0"]
    assert "alphaccl" in alpha
    assert "plugins that failed to load:" in text
    assert "broken: ImportError: libvendor.so" in text


@pytest.mark.parametrize(("package", "name"), [("hwoptim-hpu", "hpu"), ("hwoptim-mlu", "mlu")])
def test_env_shows_the_installed_plugin_distributions(package: str, name: str) -> None:
    if importlib.util.find_spec(package.replace("-", "_")) is None:
        pytest.skip(f"{package} is not installed (pip install -e backends/{package})")
    assert rows(environment_report())[name]["origin"] == f"{package} 0.1.0"


def test_env_text_says_when_torch_is_a_rocm_build(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    assert main(["env"]) == 0
    assert "cuda: ROCm 6.2.41133: AMD GPUs appear as device type 'cuda'" in capsys.readouterr().out


def test_env_reports_misbehaving_plugins_by_name(misbehaving_plugins, capsys):
    with pytest.warns(RuntimeWarning):
        assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "device='auto' picks: cpu" in out
    assert "wordy: TypeError: WordyPriority.priority must be a number" in out
    assert "raising: is_available() raised OSError: driver handshake failed" in out
    assert "exiting: is_available() raised" in out and "sys.exit(3)" in out
    assert "unbuildable: describe() failed: RuntimeError('no vendor context')" in out
    assert "fine" in out
