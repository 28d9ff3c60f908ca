"""`pytest_lora.core.thresholds`: a number shown beside a threshold never contradicts the verdict."""

from __future__ import annotations

import operator

from hypothesis import given
from hypothesis import strategies as st

from pytest_lora.core.thresholds import beside, limit_text

_RULES = st.sampled_from([operator.le, operator.lt, operator.ge, operator.gt])


def test_the_sweep_case_and_the_usual_precision() -> None:
    # 0.7004 of the longest time fails "<= 70%": "70%" would say it passed
    assert beside(0.7004, 0.70, operator.le, precision=0, kind="f", scale=100) == "70.04"
    assert beside(0.69, 0.70, operator.le, precision=0, kind="f", scale=100) == "69"
    assert beside(0.7, 0.70, operator.le, precision=0, kind="f", scale=100) == "70"
    # 0.94999 of the best fails ">= 95%": "95.0%" would say it passed
    assert beside(0.94999, 0.95, operator.ge, precision=1, kind="f", scale=100) == "94.999"
    # a tolerance the caller applied decides, not a float's last bit
    assert beside(0.7000000000001, 0.7, operator.le, ok=True, precision=0, kind="f", scale=100) == "70"
    assert beside(4.99996, 5.0, operator.ge, precision=4) == "4.99996"


def test_limits_are_shown_exactly() -> None:
    assert [limit_text(0.7, scale=100), limit_text(0.955, scale=100), limit_text(0.02, scale=100)] == [
        "70",
        "95.5",
        "2",
    ]
    assert [limit_text(2.0), limit_text(5), limit_text(0.05), limit_text(5.0000001)] == ["2", "5", "0.05", "5.0000001"]


@given(
    value=st.floats(-1e9, 1e9),
    limit=st.floats(-1e9, 1e9),
    holds=_RULES,
    precision=st.integers(0, 4),
    scale=st.sampled_from([1.0, 100.0]),
)
def test_significant_digits_agree_with_the_verdict(value, limit, holds, precision, scale) -> None:
    shown_limit = float(limit_text(limit, scale=scale))
    verdict = holds(value * scale, shown_limit)
    text = beside(value, limit, holds, ok=verdict, precision=precision, scale=scale)
    assert holds(float(text), shown_limit) == verdict


@given(value=st.floats(0.01, 2.0), limit=st.floats(0.01, 1.0), holds=_RULES, precision=st.integers(0, 2))
def test_percent_decimals_agree_with_the_verdict(value, limit, holds, precision) -> None:
    shown_limit = float(limit_text(limit, scale=100))
    verdict = holds(value * 100, shown_limit)
    text = beside(value, limit, holds, ok=verdict, precision=precision, kind="f", scale=100)
    assert holds(float(text), shown_limit) == verdict
