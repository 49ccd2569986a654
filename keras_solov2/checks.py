"""Argument checks: a `ValueError` that names the argument and what is wrong."""

import numpy as np


def positive_int(name, value, allow_none=False):
    """`value` as an int ≥ 1 (or `None` when `allow_none`).

    >>> positive_int("batch_size", 2)
    2
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        allowed = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(f"{name} must be {allowed}, got {value!r}.")
    return int(value)


def number_in_range(name, value, low, high, meaning):
    """`value` as a float in `[low, high]`; `meaning` says what the number is.

    >>> number_in_range("score_thr", 0.1, 0.0, 1.0, "a score")
    0.1
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low}, {high}] ({meaning}), got {value!r}.")
    return float(value)
