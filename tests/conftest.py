"""Shared test setup: hardware markers run only where that hardware is present."""

from __future__ import annotations

import pytest
import torch


def _has_cuda() -> bool:
    return torch.cuda.is_available()


_HARDWARE = {
    "gpu": (_has_cuda, "needs a CUDA GPU"),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for marker, (present, reason) in _HARDWARE.items():
            if item.get_closest_marker(marker) is not None and not present():
                item.add_marker(pytest.mark.skip(reason=f"{reason}; runs unmocked where one is present"))
