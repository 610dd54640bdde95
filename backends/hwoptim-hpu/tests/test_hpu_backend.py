"""The hwoptim-hpu plugin: registered through its entry point, conformant, and honest
about what it needs. Runs on any machine through hwoptim.testing.mock_backend("hpu")."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

pytest.importorskip(
    "hwoptim_hpu", reason="the plugin is not installed: pip install -e backends/hwoptim-hpu"
)

from hwoptim_hpu import HpuBackend

from hwoptim import AmpOptimWrapper, get_backend, list_backends
from hwoptim.backends.registry import backend_origin, plugin_errors
from hwoptim.testing import mock_backend
from hwoptim.testing.conformance import BackendConformance

HABANA_INSTALLED = importlib.util.find_spec("habana_frameworks") is not None


class TestHpuConformance(BackendConformance):
    backend_name = "hpu"


def test_registered_through_the_entry_point_with_its_package() -> None:
    assert list_backends()["hpu"] is HpuBackend
    assert backend_origin("hpu").startswith("hwoptim-hpu ")
    assert not [name for name, _ in plugin_errors() if name == "hpu"]


def test_loading_the_plugin_imports_no_habana() -> None:
    # The entry point was loaded by list_backends(); habana comes only when hpu is asked for.
    # (tests/test_import.py checks the same for every plugin in a fresh interpreter.)
    list_backends()
    get_backend("cpu")
    assert not [m for m in sys.modules if m.startswith("habana_frameworks")]


@pytest.mark.skipif(HABANA_INSTALLED, reason="habana_frameworks is installed here")
def test_unavailable_says_what_to_install() -> None:
    assert HpuBackend().is_available() is False
    message = r"habana_frameworks\.torch is not installed.*docs\.habana\.ai"
    with pytest.raises(RuntimeError, match=message):
        get_backend("hpu")


def test_auto_picks_hpu_with_bf16_and_no_loss_scaler() -> None:
    with mock_backend("hpu") as mock:
        model = torch.nn.Linear(4, 2)
        wrapper = AmpOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), device="auto")
        assert isinstance(wrapper.backend, HpuBackend)
        assert wrapper.cast_dtype == torch.bfloat16
        assert wrapper.loss_scaler is None  # bf16 has fp32's range: nothing to scale
        assert wrapper.backend.dist_backend == "hccl"
        names = mock.call_names()
        assert names[:2] == ["import habana_frameworks", "import habana_frameworks.torch"]
        assert "torch.hpu.is_available" in names


def test_float16_is_refused_naming_bfloat16() -> None:
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    with mock_backend("hpu"), pytest.raises(ValueError, match=r"'hpu'.*float16.*'bfloat16'"):
        AmpOptimWrapper(optimizer, dtype="float16")


def test_the_mock_leaves_nothing_behind() -> None:
    with mock_backend("hpu"):
        get_backend("hpu")
        assert hasattr(torch, "hpu")
    assert not hasattr(torch, "hpu")
    assert "habana_frameworks.torch" not in sys.modules
