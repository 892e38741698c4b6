"""Tests of keras_midl._checks, the type checks of argument validation."""

import pytest

from keras_midl._checks import is_integer
from keras_midl._checks import is_number


@pytest.mark.parametrize(
    "value, integer, number",
    [
        (3, True, True),
        (0, True, True),
        (-2, True, True),
        (2.5, False, True),
        (float("nan"), False, True),
        (True, False, False),
        (False, False, False),
        ("3", False, False),
        (None, False, False),
    ],
)
def test_is_integer_and_is_number(value, integer, number):
    assert is_integer(value) is integer
    assert is_number(value) is number
