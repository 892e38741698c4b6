"""Type checks shared by the argument validation of every module."""

import math


def is_integer(value):
    """Whether `value` is a Python `int` (a `bool` is not accepted)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value):
    """Whether `value` is a Python `int` or `float` (not a `bool`)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value):
    """Whether `value` is a Python `int` or `float` other than inf and NaN."""
    return is_number(value) and math.isfinite(value)
