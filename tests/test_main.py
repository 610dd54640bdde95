"""``python -m hwoptim env | demo``: the environment report (every backend, built-in or
plugin with its package, whether it is available and why not, its devices, dtypes,
collectives and versions) and the demo run."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from typing import Any

import pytest
import torch

import hwoptim
import hwoptim.__main__ as demo_module
from hwoptim.__main__ import PLOT_HELP, demo_figure, environment_report, main, run_demo
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
    for key in ("device", "dtype", "steps", "updates", "skipped_steps", "zeroed_steps", "loss_before",
                "loss_after", "ms_per_step"):
        assert key in out


def test_demo_summary_numbers():
    summary = run_demo(device="cpu", dtype="float16", steps=20, accum=4, clip=0.5, progress=False)
    assert summary["updates"] == 5 and summary["loss_scaling"] is True
    assert summary["loss_after"] < summary["loss_before"]
    assert summary["dtype"] == "float16" and summary["skipped_steps"] >= 0


@pytest.mark.parametrize(("steps", "updates"), [(1, 1), (2, 1), (10, 3)])
def test_demo_with_few_steps_sees_the_loss_fall(steps, updates, capsys):
    # judged on a held-out batch before and after training, not on logged training losses
    assert main(["demo", "--device", "cpu", "--steps", str(steps), "--quiet"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"steps          {steps}\n" in out and f"updates        {updates}\n" in out


@pytest.mark.parametrize("argv", [["demo", "--steps", "0"], ["demo", "--clip", "-1"], ["demo", "--bogus"], []])
def test_bad_flags_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def demo_help(capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse's line wrapping undone


def test_demo_help_describes_every_flag(capsys):
    text = demo_help(capsys)
    for flag in ("--device", "--dtype", "--steps", "--accum", "--clip", "--seed", "--lr", "--plot", "--quiet"):
        described = re.search(rf"{flag}(?: [A-Z_.]+)? (\S+)", text.split("options:", 1)[1])
        assert described and not described.group(1).startswith("--"), f"{flag} has no help: {text}"
    assert "seeds the data, the model" in text and "AdamW's learning rate" in text
    assert "clip_grad max_norm" in text


def test_demo_help_says_what_the_plot_draws_per_dtype(capsys):
    text = demo_help(capsys)
    assert PLOT_HELP in text
    assert "loss at every micro-batch" in text and "gradient norm before clipping at every update" in text
    assert "under float16, the loss scale" in text and "bfloat16 and float32 have no loss scaler" in text


def test_demo_plots_every_step(tmp_path, capsys):
    path = tmp_path / "curves.png"
    argv = ["demo", "--device", "cpu", "--dtype", "float16", "--steps", "20", "--quiet", "--plot", str(path)]
    assert main(argv) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(path) in capsys.readouterr().out


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The figures the demo draws, kept for the test to read."""
    drawn: list[Any] = []

    def keep(*args: Any) -> Any:
        drawn.append(demo_figure(*args))
        return drawn[-1]

    monkeypatch.setattr(demo_module, "demo_figure", keep)
    return drawn


def lines_by_label(ax: Any) -> dict[str, Any]:
    return {line.get_label(): line for line in ax.get_lines()}


def test_demo_figure_has_every_step_every_update_and_legends(tmp_path, figures):
    summary = run_demo(device="cpu", dtype="float16", steps=23, accum=4, progress=False,
                       plot=str(tmp_path / "f.png"))
    (fig,) = figures
    assert "cpu" in fig.get_suptitle() and "float16" in fig.get_suptitle()
    loss_ax, norm_ax, scale_ax = fig.axes
    updates = [4, 8, 12, 16, 20, 23]  # the last, shorter window updates at the end
    assert summary["updates"] == len(updates)
    loss = lines_by_label(loss_ax)["training loss, per micro-batch"]
    assert list(loss.get_xdata()) == list(range(1, 24))
    norm = lines_by_label(norm_ax)["grad norm before clipping, per update"]
    assert list(norm.get_xdata()) == updates and all(v > 0 for v in norm.get_ydata())
    assert list(lines_by_label(norm_ax)["clip max_norm = 1"].get_ydata()) == [1.0, 1.0]
    scale = next(line for label, line in lines_by_label(scale_ax).items() if label.startswith("loss scale"))
    assert list(scale.get_xdata()) == updates and all(v > 1 for v in scale.get_ydata())
    for ax in fig.axes:  # every curve is in its panel's legend
        legend = ax.get_legend()
        assert legend is not None
        assert [t.get_text() for t in legend.get_texts()] == [line.get_label() for line in ax.get_lines()]


def test_demo_plots_each_layers_norm_beside_the_total_and_summarises_them(tmp_path, figures):
    summary = run_demo(device="cpu", dtype="float32", steps=12, accum=4, progress=False,
                       plot=str(tmp_path / "f.png"))
    lines = lines_by_label(figures[0].axes[1])
    total = lines["grad norm before clipping, per update"].get_ydata()
    layers = [lines[f"layer '{name}' (wrapper.last_grad_norms)"] for name in ("in", "hidden", "out")]
    assert all(list(line.get_xdata()) == [4, 8, 12] for line in layers)
    # the layers' norms are the parts of the total: their 2-norm is it
    for i, want in enumerate(total):
        assert math.hypot(*(line.get_ydata()[i] for line in layers)) == pytest.approx(want, rel=1e-5)
    names = [part for part in summary["group_norms"].split() if not part[0].isdigit()]
    assert names == ["in", "hidden", "out"]
    last = [float(part) for part in summary["group_norms"].split()[1::2]]
    assert last == pytest.approx([line.get_ydata()[-1] for line in layers], rel=1e-2)
    assert summary["bad_groups"] == "-"


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_demo_figure_says_why_there_is_no_loss_scale(tmp_path, figures, dtype):
    run_demo(device="cpu", dtype=dtype, steps=8, progress=False, plot=str(tmp_path / "f.png"))
    scale_ax = figures[0].axes[2]
    assert scale_ax.get_lines() == []
    (note,) = [t.get_text() for t in scale_ax.texts]
    assert note.startswith(f"no loss scale: {dtype} trains without a loss scaler")


def test_demo_figure_without_clipping_says_there_is_no_grad_norm(tmp_path, figures):
    run_demo(device="cpu", dtype="float16", steps=8, clip=0.0, progress=False, plot=str(tmp_path / "f.png"))
    norm_ax = figures[0].axes[1]
    assert norm_ax.get_lines() == []
    assert [t.get_text() for t in norm_ax.texts] == ["no grad norm: clipping is off (--clip 0), so none is computed"]


def refuse_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_training(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the demo trained before checking --plot")

    monkeypatch.setattr(hwoptim, "AmpOptimWrapper", no_training)


@pytest.mark.parametrize(("name", "says"), [
    ("missing/folder/curves.png", "does not exist"),
    (".", "that is a folder"),
    ("curves.notaformat", "matplotlib cannot write 'notaformat'; use one of"),
])
def test_demo_plot_to_an_unwritable_path_fails_before_training(tmp_path, monkeypatch, capsys, name, says):
    refuse_training(monkeypatch)
    path = str(tmp_path / name)
    assert main(["demo", "--device", "cpu", "--steps", "4", "--quiet", "--plot", path]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"hwoptim demo: error: --plot {path}: ")
    assert says in captured.err and "Traceback" not in captured.err


def test_demo_plot_without_matplotlib_says_what_to_install(tmp_path, monkeypatch, capsys):
    refuse_training(monkeypatch)
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)
    assert main(["demo", "--device", "cpu", "--quiet", "--plot", str(tmp_path / "f.png")]) == 2
    assert "matplotlib is not installed (pip install matplotlib" in capsys.readouterr().err


def test_demo_progress_bar_goes_to_stderr(capsys):
    assert main(["demo", "--device", "cpu", "--dtype", "float16", "--steps", "20"]) == 0
    captured = capsys.readouterr()
    assert "loss=" in captured.err and "grad_norm=" in captured.err and "scale=" in captured.err
    assert "loss=" not in captured.out and "it/s" not in captured.out and "step/s" not in captured.out
    assert captured.out.splitlines()[0].startswith("device")  # only the summary


def test_demo_progress_lines_without_tqdm_go_to_stderr(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert main(["demo", "--device", "cpu", "--dtype", "float16", "--steps", "12"]) == 0
    captured = capsys.readouterr()
    progress = [line for line in captured.err.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == ["10/12", "12/12"]
    assert "loss" in progress[0] and "grad_norm" in progress[0] and "scale" in progress[0]
    assert not [line for line in captured.out.splitlines() if line.startswith("step ")]


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
