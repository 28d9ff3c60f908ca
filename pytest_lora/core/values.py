"""What counts as a number in a setting, a policy, a rule or a run argument: one rule for all of them.

`True` is an int to Python but never a rank, a step count or a learning rate, so bools are refused.
"""

from __future__ import annotations

import numbers


def is_int(value: object) -> bool:
    """An integer (int or another `numbers.Integral`), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A real number (int, float, Fraction, ...: a `numbers.Real`), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
