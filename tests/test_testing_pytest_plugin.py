"""hwoptim's pytest plugin: --hwoptim-device runs a suite per device, real or mocked, and
hwoptim_mock_backend mocks a backend for one test."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

# mock_backend imports torch's compiler stack on entry. pytester's in-process runs forget the
# modules imported inside them, and torch's compiler stack registers operator libraries that
# cannot be registered twice: import it before any inner run, as the whole suite already has.
import torch._dynamo  # noqa: F401

SUITE = """
    import os
    from hwoptim import get_backend

    def test_device(hwoptim_device):
        auto = get_backend("auto")
        print(f"RAN name={hwoptim_device.name} auto={auto.name} "
              f"device={hwoptim_device.device()} env={os.environ.get('HWOPTIM_DEVICE')}")
        assert auto.name == hwoptim_device.name
"""


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    # Hypothesis's own plugin spends seconds in every inner session's summary: leave it out.
    return pytester.runpytest_inprocess("-p", "no:hypothesispytest", *args)


def ran(result: pytest.RunResult) -> list[str]:
    return sorted(line.split("RAN ", 1)[1] for line in result.outlines if "RAN " in line)


def test_one_run_per_device_given(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(SUITE)
    devices = ["--hwoptim-device=mock:npu", "--hwoptim-device=cpu", "--hwoptim-device=mock:xpu"]
    result = run(pytester, "-s", "-v", *devices)
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*::test_device?mock:npu? RAN*", "*::test_device?cpu? RAN*"])
    assert ran(result) == [
        "name=cpu auto=cpu device=cpu env=cpu",
        "name=npu auto=npu device=cpu env=None",
        "name=xpu auto=xpu device=cpu env=None",
    ]


def test_without_the_option_it_is_auto(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(SUITE)
    result = run(pytester, "-s")
    result.assert_outcomes(passed=1)
    assert ran(result) == ["name=cpu auto=cpu device=cpu env=None"]


def test_an_absent_device_is_skipped_with_its_reason(pytester: pytest.Pytester) -> None:
    from hwoptim.backends.npu import NpuBackend

    if NpuBackend().is_available():
        pytest.skip("an NPU is available here")
    pytester.makepyfile(SUITE)
    result = run(pytester, "-rs", "--hwoptim-device=npu")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*--hwoptim-device=npu: the 'npu' backend is not available*"])


def test_an_unknown_device_is_an_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(SUITE)
    result = run(pytester, "--hwoptim-device=tpu")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*unknown device 'tpu'*"])


def test_hwoptim_mock_backend_lasts_for_its_test_only(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import torch
        from hwoptim import get_backend

        def test_mocked(hwoptim_mock_backend):
            mock = hwoptim_mock_backend("npu", device_count=2)
            hwoptim_mock_backend("xpu", select=False)
            assert get_backend("auto").name == "npu"
            assert get_backend("npu").device_count() == 2
            assert get_backend("xpu").device() == torch.device("cpu")
            assert "import torch_npu" in mock.call_names()

        def test_after():
            assert not hasattr(torch, "npu")
            assert get_backend("auto").name == "cpu"
    """)
    run(pytester).assert_outcomes(passed=2)


# -- the hwoptim_emulated marker, and the user project docs/testing-on-cpu.md lays out --------

DOC = Path(__file__).parent.parent / "docs" / "testing-on-cpu.md"


def doc_project() -> dict[str, str]:
    """The files of the user project the doc shows: each is a python block after a line
    that names its path."""
    text = DOC.read_text()
    files = dict(re.findall(r"^`(tests/[\w/]+\.py)`[^\n]*:\n\n```python\n(.*?)```", text, re.S | re.M))
    assert set(files) == {"tests/on_device/conftest.py", "tests/on_device/test_on_device.py",
                          "tests/test_training.py"}, files.keys()
    return files


def make_project(pytester: pytest.Pytester) -> None:
    for path, source in doc_project().items():
        target = pytester.path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(source)


def test_a_plain_run_of_the_docs_project_skips_the_emulated_tests_saying_how_to_run_them(
    pytester: pytest.Pytester,
) -> None:
    make_project(pytester)
    result = run(pytester, "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines([
        "SKIPPED*test_on_device.py*needs hwoptim's emulated device, which takes a pytest process of "
        "its own: run python -m pytest --hwoptim-device emulated:emu tests?on_device",
    ])


def test_the_docs_project_runs_its_emulated_tests_with_the_option(pytester: pytest.Pytester) -> None:
    make_project(pytester)
    (pytester.path / "tests" / "on_device" / "test_marked.py").write_text(textwrap.dedent(MARKED))
    # its own process: the emulated device cannot be removed from this one
    result = pytester.runpytest_subprocess(
        "-p", "no:hypothesispytest", "-p", "no:cacheprovider", "-rs", "--hwoptim-device", "emulated:emu",
        "tests/on_device", timeout=600,
    )
    result.assert_outcomes(passed=3, skipped=1)  # the doc's test and two of MARKED's
    result.stdout.fnmatch_lines([
        "SKIPPED*test_marked.py:*: needs the emulated device npu, not emu: run python -m pytest "
        "--hwoptim-device emulated:npu tests?on_device",
    ])


MARKED = """
    import pytest

    @pytest.mark.hwoptim_emulated
    def test_any_emulated():
        pass

    @pytest.mark.hwoptim_emulated("npu")
    def test_npu_only():
        pass

    def test_unmarked():
        pass
"""


def test_marked_tests_skip_under_a_mock_device_too(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(MARKED)
    result = run(pytester, "-rs", "--hwoptim-device", "mock:npu")
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines([
        "SKIPPED*.py:3: needs hwoptim's emulated device*: run python -m pytest --hwoptim-device emulated:emu .",
        "SKIPPED*.py:7: needs hwoptim's emulated device*: run python -m pytest --hwoptim-device emulated:npu .",
    ])


def test_the_marker_is_registered(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(MARKED)
    result = run(pytester, "--strict-markers", "--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.hwoptim_emulated(*names): runs only with --hwoptim-device*"])
