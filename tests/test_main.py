"""`python -m hwoptim env`: every backend, built-in or plugin with its package, whether it
is available and why not, its devices, dtypes, collectives and versions."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from hwoptim.__main__ import environment_report, main
from hwoptim.testing import mock_backend


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
