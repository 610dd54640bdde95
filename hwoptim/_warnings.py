"""hwoptim's warnings: Python warnings, and a registration point for where else they go.

The wrapper modules import this module as ``warnings`` and call ``warnings.warn`` as usual:
the warning is issued exactly as the standard library issues it (filters, ``stacklevel``
pointing at the user's line), and then every subscriber gets its text. hwoptim.mmengine
subscribes while mmengine is imported, so that a Runner's log file holds hwoptim's warnings
as it holds mmengine's own; the core never imports it.
"""

from __future__ import annotations

import warnings as _std
from typing import Callable

#: called with each warning's text and category after it was issued
Subscriber = Callable[[str, type[Warning]], None]

#: by name, so that a module imported again replaces its subscriber rather than adding one
_subscribers: dict[str, Subscriber] = {}


def warn(message: str, category: type[Warning] = UserWarning, stacklevel: int = 1) -> None:
    """``warnings.warn(message, category, stacklevel)``, then tell the subscribers.

    A filter that turns the warning into an error raises here, before any subscriber hears
    of it; one that ignores it still lets the subscribers log it.
    """
    _std.warn(message, category, stacklevel=stacklevel + 1)
    for subscriber in tuple(_subscribers.values()):
        subscriber(message, category)


def subscribe(name: str, subscriber: Subscriber) -> None:
    """Send every later hwoptim warning to ``subscriber`` too, in place of any earlier
    subscriber of that ``name``."""
    _subscribers[name] = subscriber


def unsubscribe(name: str) -> None:
    """Stop sending warnings to the subscriber of ``name``; nothing happens if there is none."""
    _subscribers.pop(name, None)
