"""Numbers shown next to a threshold, with the digits it takes for the shown pair to agree with the verdict.

A time share of 0.7004 fails `<= 70%`, yet `{0.7004:.0%}` prints "70%": the reader sees "70% of the
longest" next to "rule NOT met". `beside` starts at the usual precision and adds digits until the
shown number, compared with the limit as shown (`limit_text`), gives the real verdict, so 0.7004 prints
"70.04%". Pure (stdlib only).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from decimal import Decimal

_MAX_PRECISION = 17  # a float's shortest round-trip needs at most 17 significant digits


def limit_text(limit: float, *, scale: float = 1.0) -> str:
    """A threshold as shown: its shortest exact decimal form, scaled without float noise (0.7, 100 -> "70").

    Never rounded: a limit shown shorter than it is (5.0000001 as "5") could itself contradict the verdict.
    """
    if not math.isfinite(limit):
        return repr(limit * scale)
    exact = Decimal(repr(limit)) * Decimal(repr(scale))
    return format(exact.normalize(), "f")


def beside(
    value: float,
    limit: float,
    holds: Callable[[float, float], bool],
    *,
    ok: bool | None = None,
    precision: int = 3,
    kind: str = "g",
    scale: float = 1.0,
) -> str:
    """`value * scale` formatted as `{:.<precision><kind>}`, with more digits where fewer would contradict the verdict.

    `holds(value, limit)` is the rule (e.g. `operator.le` for "at most"); `ok` the verdict the caller
    reached, default `holds(value, limit)` (pass it when the rule allows a tolerance). The shown number is
    compared with the limit as `limit_text` shows it, in the same scale.

    >>> beside(0.7004, 0.70, operator.le, precision=0, kind="f", scale=100)
    '70.04'
    """
    verdict = holds(value, limit) if ok is None else ok
    shown_limit = float(limit_text(limit, scale=scale))
    text = ""
    for digits in range(precision, precision + _MAX_PRECISION + 1):
        text = f"{value * scale:.{digits}{kind}}"
        if holds(float(text), shown_limit) == verdict:
            return text
    return text  # within rounding of the limit itself: the verdict's own tolerance decided
