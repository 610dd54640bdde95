"""The installed entry points of a group, on every Python hwoptim supports."""

from __future__ import annotations

from typing import Any

__all__ = ["entry_points"]


def entry_points(group: str) -> list[Any]:
    """The installed entry points of ``group`` (backend plugins, stand-ins)."""
    from importlib.metadata import entry_points as installed

    try:
        return list(installed(group=group))
    except TypeError:  # Python 3.9's entry_points() takes no group
        return list(installed().get(group, []))
