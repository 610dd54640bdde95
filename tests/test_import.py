"""`import hwoptim` is light: no vendor module, no hwoptim.testing, no pytest, and fast.

Checked in a fresh interpreter, where nothing else has imported anything yet.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

VENDORS = ("torch_npu", "intel_extension_for_pytorch", "habana_frameworks", "torch_mlu")

SCRIPT = textwrap.dedent("""
    import json, sys, time

    def loaded(*prefixes):
        return sorted(m for m in sys.modules if m.split(".")[0] in prefixes)

    import torch
    start = time.perf_counter()
    import hwoptim
    seconds = time.perf_counter() - start
    report = {"seconds": seconds, "after_import": loaded(*VENDORS, "hwoptim_hpu",
              "hwoptim_mlu", "pytest", "_pytest") + loaded("hwoptim.testing")}
    report["testing_imported"] = "hwoptim.testing" in sys.modules
    # Loading the plugins and resolving the cpu imports no vendor either.
    names = list(hwoptim.list_backends())
    hwoptim.get_backend("cpu")
    report["backends"] = names
    report["after_lookup"] = loaded(*VENDORS)
    import hwoptim.testing
    report["pytest_after_testing"] = loaded("pytest", "_pytest")
    print(json.dumps(report))
""").replace("VENDORS", repr(VENDORS))


@pytest.fixture(scope="module")
def fresh_import() -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_hwoptim_imports_no_vendor_plugin_testing_or_pytest(fresh_import: dict) -> None:
    assert fresh_import["after_import"] == []
    assert fresh_import["testing_imported"] is False


def test_import_hwoptim_is_fast_once_torch_is_there(fresh_import: dict) -> None:
    assert fresh_import["seconds"] < 0.5


def test_loading_plugins_and_resolving_cpu_imports_no_vendor(fresh_import: dict) -> None:
    assert {"cpu", "cuda", "mps", "npu", "xpu"} <= set(fresh_import["backends"])
    assert fresh_import["after_lookup"] == []


def test_import_hwoptim_testing_needs_no_pytest(fresh_import: dict) -> None:
    assert fresh_import["pytest_after_testing"] == []
