"""Argument checks shared by every layer: an integer refuses ``bool`` and floats (``window=True`` is an error, not 1),
a number refuses ``bool``, NaN and inf; every message starts with the argument's name. The bottom of the import
layers (the task generators use it too); :mod:`paratime.config` re-exports both.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["check_int", "check_number", "is_integer"]


def is_integer(value: Any) -> bool:
    """An integer, Python's or numpy's (``numbers.Integral``), and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None, none: bool = False) -> None:
    """Raise unless ``value`` is an integer (not a bool) in ``[low, high]`` (or None when ``none``).

    Raises:
        TypeError: not an integer (bool and float included). ValueError: out of range.
    """
    if value is None and none:
        return
    if not is_integer(value):
        raise TypeError(f"{name}: expected an integer{' or None' if none else ''}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}: must be an integer {rng}, got {value!r}")


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, none: bool = False) -> None:
    """Raise unless ``value`` is a finite real number (not a bool) in the range (``low`` excluded when ``low_open``).

    Raises:
        TypeError: not a real number. ValueError: NaN, inf or out of range.
    """
    if value is None and none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number{' or None' if none else ''}, got {value!r}")
    try:
        finite = math.isfinite(value)
    except OverflowError:                       # an int beyond float's range (10**400)
        finite = False
    if not finite:
        raise ValueError(f"{name}: must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name}: must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name}: must be <= {high}, got {value!r}")
