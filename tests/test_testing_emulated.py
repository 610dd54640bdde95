"""hwoptim.testing.emulated from the outside: what it refuses before changing anything, and
the runner that installs it in a process of its own. Its behaviour as a device is tested
on the device itself, in tests/emulated (a separate pytest process, see .ci/run)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hwoptim.testing import _emulated_device, emulated


def _torch_lacks() -> str | None:
    """Why this torch cannot run the emulated device (older than CI's), or None."""
    try:
        _emulated_device.check_torch()
    except RuntimeError as exc:
        return str(exc)
    return None


needs_emulated_apis = pytest.mark.skipif(_torch_lacks() is not None, reason=str(_torch_lacks()))


@pytest.fixture(autouse=True)
def _never_installed_here():
    yield
    # The rename cannot be undone: a test that installed it would change every later test.
    assert emulated.installed_device_type() is None
    assert torch._C._get_privateuse1_backend_name() == "privateuseone"


def test_a_torch_without_the_apis_is_refused_with_what_is_missing(monkeypatch):
    monkeypatch.setattr(_emulated_device, "REQUIRED_APIS", (*_emulated_device.REQUIRED_APIS, "_C._no_such_api"))
    with pytest.raises(RuntimeError, match=r"registers PrivateUse1 backends from Python; this is torch "
                       rf"{re.escape(torch.__version__)}, which lacks .*torch\._C\._no_such_api.*mock_backend"):
        emulated.install("emu")


@pytest.mark.parametrize(("name", "count", "error"), [
    pytest.param("cuda", 2, "a device type torch already has", marks=needs_emulated_apis),
    ("Emu", 2, "lower-case name"),
    ("my device", 2, "lower-case name"),
    ("emu", 0, "device_count must be an int >= 1"),
    ("emu", True, "device_count must be an int >= 1"),
])
def test_bad_arguments_are_refused_before_anything_changes(name, count, error):
    with pytest.raises(ValueError, match=error):
        emulated.install(name, count)


def test_a_device_type_that_is_no_str_is_a_type_error():
    with pytest.raises(TypeError, match="device_type must be a str such as 'emu' or 'npu'; got int"):
        emulated.install(3)  # type: ignore[arg-type]


@needs_emulated_apis
def test_the_runner_reports_a_refused_device_as_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        emulated.main(["--device", "cuda", "--", "train.py"])
    assert exit_info.value.code == 2
    assert "device_type 'cuda' is a device type torch already has; pick another name" in capsys.readouterr().err


def test_device_count_may_be_any_integer_type(monkeypatch):
    np = pytest.importorskip("numpy")

    class Reached(Exception):
        pass

    def stop() -> None:
        raise Reached

    monkeypatch.setattr(_emulated_device, "check_torch", stop)  # past the argument checks: stop there
    with pytest.raises(Reached):
        emulated.install("emu", np.int64(2))
    with pytest.raises(ValueError, match="device_count must be an int >= 1"):
        emulated.install("emu", np.float64(2.0))


def test_counting_host_reads_needs_the_device():
    with pytest.raises(RuntimeError, match=r"not installed in this process.*--hwoptim-device emulated:emu"):
        with emulated.count_host_reads():
            pass


def test_two_emulated_names_in_one_pytest_run_are_a_usage_error(pytester):
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest_inprocess(
        "-p", "no:hypothesispytest", "--hwoptim-device=emulated:emu", "--hwoptim-device=emulated:npu"
    )
    result.stderr.fnmatch_lines(["*one emulated device per process; got emulated:emu, emulated:npu*"])


SCRIPT = """
    import sys, torch
    import helper_next_to_the_script  # found as with `python train.py`
    from hwoptim import get_backend
    from hwoptim.testing import _emulated_device, emulated

    print("args", sys.argv[1:])
    print("auto", get_backend("auto").device(), torch.ones(2, device="npu:1").device)
    print("torch_npu", "torch_npu" in sys.modules)
    try:
        emulated.install("emu")
    except RuntimeError as exc:
        print("again:", exc)
    sys.exit(3)
"""


@needs_emulated_apis
def test_the_runner_installs_the_device_then_runs_the_script(tmp_path: Path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    (tmp_path / "helper_next_to_the_script.py").write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "hwoptim.testing.emulated", "--device", "npu", "--", str(script), "--steps", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 3, result.stderr  # the script's own exit code
    lines = result.stdout.splitlines()
    assert lines[:3] == ["args ['--steps', '2']", "auto npu:0 npu:1", "torch_npu True"]
    assert lines[3].startswith("again: the emulated device is already installed in this process as 'npu'")
