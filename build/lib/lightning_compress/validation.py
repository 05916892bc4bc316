"""Constructor argument checks shared by the public classes: one line naming the argument and what is allowed.

A string where a number belongs (``final_sparsity="0.5"``, as a YAML file or a command line can produce) must
fail at construction with that line, not later with a ``TypeError`` from a comparison. Booleans are not
numbers here, although Python counts ``True`` as the integer 1.
"""

from __future__ import annotations

import math
from numbers import Integral, Real


def is_integer(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _type_note(value: object, kind: str) -> str:
    """``, not str`` where the type is what is wrong."""
    right_type = is_integer(value) if kind == "integer" else isinstance(value, Real) and not isinstance(value, bool)
    return "" if value is None or right_type else f", not {type(value).__name__}"


def check_integer(name: str, value: object, minimum: int | None = None, maximum: int | None = None, none: str = "") -> None:
    """``value`` must be an integer in [``minimum``, ``maximum``]; ``none`` says what ``None`` means, when allowed."""
    if value is None and none:
        return
    if is_integer(value) and (minimum is None or value >= minimum) and (maximum is None or value <= maximum):
        return
    if minimum is not None and maximum is not None:
        allowed = f"an integer from {minimum} to {maximum}"
    elif minimum is not None:
        allowed = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    elif maximum is not None:
        allowed = f"an integer <= {maximum}"
    else:
        allowed = "an integer"
    or_none = f", or None ({none})" if none else ""
    raise ValueError(f"{name}={value!r} is invalid: it must be {allowed}{or_none}{_type_note(value, 'integer')}.")


def check_number(
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    none: str = "",
) -> None:
    """``value`` must be a finite number between ``low`` and ``high`` (excluded where ``*_open``); integers count."""
    if value is None and none:
        return
    if is_number(value) and not (
        (low is not None and (value < low or (low_open and value == low)))
        or (high is not None and (value > high or (high_open and value == high)))
    ):
        return
    if low is not None and high is not None:
        bounds = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        bounds = f"{'>' if low_open else '>='} {low:g}"
    elif high is not None:
        bounds = f"{'<' if high_open else '<='} {high:g}"
    else:
        bounds = ""
    if not is_number(value):
        allowed = f"be a number {bounds}" if bounds else "be a finite number"
    else:
        allowed = f"lie {bounds}" if bounds.startswith("in") else f"be {bounds}"
    or_none = f", or None ({none})" if none else ""
    raise ValueError(f"{name}={value!r} is invalid: it must {allowed}{or_none}{_type_note(value, 'number')}.")
