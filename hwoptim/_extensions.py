"""The registration point through which integrations (hwoptim.mmengine) join the core.

The core never imports an integration. An integration module subscribes here when it is
imported (``subscribe``); ``hwoptim/__init__.py`` declares which module to import on demand
once a framework is (``declare``), so a config naming ``hwoptim.AmpOptimWrapper`` works under
mmengine without ``custom_imports``. The wrappers call ``wrapper_created`` from their
constructors and copies, and the placement check asks ``placement_advice``. Like torch's
optimizer hooks: extension by subscription, not by import.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, NamedTuple

from hwoptim._warn import warn

__all__ = ["declare", "placement_advice", "subscribe", "unsubscribe", "wrapper_created"]


class _Declared(NamedTuple):
    trigger: str  # the framework whose import makes the integration needed
    module: str  # the integration, which subscribes when imported
    joins: str  # what of the framework it joins ("Runner")
    advice: str  # what to do when it cannot be imported


class _Subscription(NamedTuple):
    on_new_wrapper: Callable[[Any], None] | None
    placement_advice: Callable[[], str] | None


_declared: list[_Declared] = []
_subscriptions: dict[str, _Subscription] = {}


def declare(trigger: str, module: str, joins: str, advice: str) -> None:
    """Import ``module`` when a wrapper is made while ``trigger`` is imported."""
    if all(d.module != module for d in _declared):
        _declared.append(_Declared(trigger, module, joins, advice))


def subscribe(
    name: str,
    *,
    on_new_wrapper: Callable[[Any], None] | None = None,
    placement_advice: Callable[[], str] | None = None,
) -> None:
    """Register integration ``name`` (its module name); a second call replaces the first.

    Args:
        on_new_wrapper: called with every wrapper made (or copied) from now on.
        placement_advice: returns advice appended to the misplaced-parameters error ("" for none).
    """
    _subscriptions[name] = _Subscription(on_new_wrapper, placement_advice)


def unsubscribe(name: str) -> None:
    """Remove integration ``name``'s subscription (nothing if there is none)."""
    _subscriptions.pop(name, None)


def wrapper_created(wrapper: Any) -> None:
    """Hand a new wrapper to every integration; import the declared ones that are needed."""
    failed = set()
    for declared in _declared:
        if declared.trigger in sys.modules:
            try:
                importlib.import_module(declared.module)
            except ImportError as exc:  # the framework is there, but not what joining needs
                failed.add(declared.module)
                warn(
                    f"{declared.trigger} is imported, but hwoptim cannot join its {declared.joins} "
                    f"({exc}); {declared.advice}"
                )
    for name, subscription in list(_subscriptions.items()):
        if subscription.on_new_wrapper is not None and name not in failed:
            subscription.on_new_wrapper(wrapper)


def placement_advice() -> str:
    """What the integrations add to the misplaced-parameters error."""
    return "".join(s.placement_advice() for s in _subscriptions.values() if s.placement_advice is not None)
