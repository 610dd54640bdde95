"""Warnings that point at the user's line, whichever public entry raised them."""

from __future__ import annotations

import os
import sys
import warnings

__all__ = ["warn"]

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
#: hwoptim's own test harnesses count as the user: a warning they trigger points at them
_HARNESS = os.path.join(_PACKAGE, "testing") + os.sep


def _inside(filename: str) -> bool:
    return filename.startswith(_PACKAGE) and not filename.startswith(_HARNESS)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` at the first frame outside hwoptim: the caller's line, however
    deep inside hwoptim the warning was decided (Python 3.12's ``skip_file_prefixes``)."""
    frame = sys._getframe(1)  # warn's caller: stacklevel 2
    level = 2
    while frame is not None and _inside(os.path.abspath(frame.f_code.co_filename)):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    warnings.warn(message, category, stacklevel=level)
