"""Devices behind one interface: the Backend base class and the registry."""

from hwoptim.backends import generic as _generic  # noqa: F401  (the registry's fallback)
from hwoptim.backends.base import Backend
from hwoptim.backends.registry import (
    ENTRY_POINT_GROUP,
    get_backend,
    list_backends,
    register_backend,
    unregister_backend,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "Backend",
    "get_backend",
    "list_backends",
    "register_backend",
    "unregister_backend",
]
