"""The hwoptim-mlu plugin: registered through its entry point, conformant, scaling fp16
losses with torch_mlu's own GradScaler. Runs anywhere through mock_backend("mlu")."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

pytest.importorskip(
    "hwoptim_mlu", reason="the plugin is not installed: pip install -e backends/hwoptim-mlu"
)

from hwoptim_mlu import MluBackend

from hwoptim import AmpOptimWrapper, get_backend, list_backends
from hwoptim.backends.registry import backend_origin, plugin_errors
from hwoptim.testing import mock_backend
from hwoptim.testing.conformance import BackendConformance

TORCH_MLU_INSTALLED = importlib.util.find_spec("torch_mlu") is not None


class TestMluConformance(BackendConformance):
    backend_name = "mlu"


def test_registered_through_the_entry_point_with_its_package() -> None:
    assert list_backends()["mlu"] is MluBackend
    assert backend_origin("mlu").startswith("hwoptim-mlu ")
    assert not [name for name, _ in plugin_errors() if name == "mlu"]


def test_loading_the_plugin_imports_no_torch_mlu() -> None:
    # The entry point was loaded by list_backends(); torch_mlu comes only when mlu is asked
    # for. (tests/test_import.py checks the same for every plugin in a fresh interpreter.)
    list_backends()
    get_backend("cpu")
    assert "torch_mlu" not in sys.modules


@pytest.mark.skipif(TORCH_MLU_INSTALLED, reason="torch_mlu is installed here")
def test_unavailable_says_what_to_install() -> None:
    assert MluBackend().is_available() is False
    with pytest.raises(RuntimeError, match=r"torch_mlu is not installed.*CNToolkit"):
        get_backend("mlu")


def test_fp16_training_steps_through_torch_mlu_grad_scaler() -> None:
    with mock_backend("mlu") as mock:
        model = torch.nn.Linear(4, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        wrapper = AmpOptimWrapper(optimizer, device="auto", loss_scale={"init_scale": 512.0})
        assert isinstance(wrapper.backend, MluBackend)
        assert wrapper.cast_dtype == torch.float16
        assert wrapper.backend.dist_backend == "cncl"
        with wrapper.optim_context(model):
            loss = model(torch.randn(8, 4)).float().pow(2).mean()
        wrapper.update_params(loss)
    names = mock.call_names()
    assert names[0] == "import torch_mlu"
    scaler_calls = [c for c in mock.calls if c.name.startswith("torch.mlu.amp.GradScaler")]
    assert scaler_calls[0].kwargs["init_scale"] == 512.0
    methods = [c.name.rsplit(".", 1)[-1] for c in scaler_calls[1:]]
    # the wrapper unscales before every update (the precision policy hands the guard the
    # scaler's found_inf), so the scaler's step finds the gradients unscaled already
    assert methods == ["scale", "unscale_", "step", "update"]


def test_the_mock_leaves_nothing_behind() -> None:
    with mock_backend("mlu"):
        get_backend("mlu")
        assert hasattr(torch, "mlu")
    assert not hasattr(torch, "mlu")
    assert "torch_mlu" not in sys.modules
