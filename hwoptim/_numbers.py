"""What hwoptim accepts as a number: any real number type, the way mmengine does.

A config value may come as a Python number, a numpy scalar (``np.float32(1.0)``,
``np.int64(4)``, e.g. from a hyperparameter sweep or a loaded YAML/npz) or any other type
registered with the ``numbers`` ABCs. Each check converts it once, at construction, to a
plain ``float`` or ``int``, so nothing downstream (torch calls, state dicts, reprs) sees
the foreign type. Refused everywhere: bools (``True`` is no count), strings, and tensors
and arrays (a device tensor read at construction would be a hidden host sync, and a
tensor can change after it was checked: pass ``float(t)`` on purpose instead).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

__all__ = [
    "as_float", "as_int", "check_flag", "check_int", "check_optional_flag", "check_positive", "check_real",
    "given",
]


def as_int(value: Any) -> int | None:
    """``value`` as an int when it is an integer of any type (int, np.int64, ...); else None.

    bools are not integers here, and neither are floats, even integral ones.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def as_float(value: Any) -> float | None:
    """``value`` as a float when it is a real number of any type; else None (bools too)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def check_int(value: Any, what: str, low: int, error: type[Exception] = ValueError) -> int:
    """``value`` as an int >= ``low``, or ``error`` saying what was given and what is allowed."""
    number = as_int(value)
    if number is None or number < low:
        raise error(f"{what} must be an int >= {low}; got {given(value)}")
    return number


def check_positive(
    value: Any, what: str, *, allow_inf: bool = False, error: type[Exception] = ValueError
) -> float:
    """``value`` as a float > 0 (finite unless ``allow_inf``), or ``error`` saying why not."""
    number = as_float(value)
    if number is None:
        raise error(f"{what} must be a number (int, float or a numpy scalar); got {given(value)}")
    if math.isnan(number) or number <= 0 or (math.isinf(number) and not allow_inf):
        bound = "a positive number (or inf)" if allow_inf else "a positive finite number"
        raise error(f"{what} must be {bound}; got {given(value)}")
    return number


def check_real(
    value: Any, what: str, allowed: str, ok: Callable[[float], bool],
    error: type[Exception] = ValueError,
) -> float:
    """``value`` as a float for which ``ok`` holds, or ``error``: "<what> must be <allowed>"."""
    number = as_float(value)
    if number is None or not ok(number):
        raise error(f"{what} must be {allowed}; got {given(value)}")
    return number


def given(value: Any) -> str:
    """How a message shows a refused value: its repr, and its type where that is not obvious."""
    if value is None or type(value) in (int, float, str, bool):
        return repr(value)
    shown = f"{value!r} ({type(value).__module__}.{type(value).__qualname__})"
    if not isinstance(value, numbers.Number) and callable(getattr(value, "item", None)):
        shown += "; a tensor or array is not taken as a number: pass float(x) or int(x)"
    return shown


def check_flag(value: Any, what: str) -> bool:
    """``value`` if it is True or False, else a TypeError saying what was given."""
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be True or False; got {given(value)}")
    return value


def check_optional_flag(value: Any, what: str) -> bool | None:
    """``value`` if it is True, False or None, else a TypeError saying what was given."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{what} must be True, False or None; got {given(value)}")
    return value
