"""hwoptim's warnings: they point at the user's line, and integrations may hear them too.

Every hwoptim module warns through ``warn``. It issues a Python warning exactly as the
standard library does (filters apply, the location is the first frame outside hwoptim),
then hands its text to every subscriber: hwoptim.mmengine subscribes while mmengine is
imported, so a Runner's log file holds hwoptim's warnings as it holds mmengine's own. The
core never imports an integration.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Callable

__all__ = ["Subscriber", "subscribe", "unsubscribe", "warn"]

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
#: hwoptim's own test harnesses count as the user: a warning they trigger points at them
_HARNESS = os.path.join(_PACKAGE, "testing") + os.sep

#: called with each warning's text and category after it was issued
Subscriber = Callable[[str, type[Warning]], None]

#: by name, so that a module imported again replaces its subscriber rather than adding one
_subscribers: dict[str, Subscriber] = {}


def _inside(filename: str) -> bool:
    return filename.startswith(_PACKAGE) and not filename.startswith(_HARNESS)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` at the first frame outside hwoptim, then tell the subscribers.

    The location is the caller's line however deep inside hwoptim the warning was decided
    (Python 3.12's ``skip_file_prefixes``). A filter that turns the warning into an error
    raises here, before any subscriber hears of it; one that ignores it still lets the
    subscribers log it.
    """
    frame = sys._getframe(1)  # warn's caller: stacklevel 2
    level = 2
    while frame is not None and _inside(os.path.abspath(frame.f_code.co_filename)):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    warnings.warn(message, category, stacklevel=level)
    for subscriber in tuple(_subscribers.values()):
        subscriber(message, category)


def subscribe(name: str, subscriber: Subscriber) -> None:
    """Send every later hwoptim warning to ``subscriber`` too, in place of any earlier
    subscriber of that ``name``."""
    _subscribers[name] = subscriber


def unsubscribe(name: str) -> None:
    """Stop sending warnings to the subscriber of ``name``; nothing happens if there is none."""
    _subscribers.pop(name, None)
