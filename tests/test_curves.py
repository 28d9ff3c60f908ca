"""Loss-curve verdicts: the synthetic curves each rule is meant to catch or pass, plus properties."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pytest_lora.core.curves import (
    OverfitRule,
    PlateauRule,
    PlateauVerdict,
    analyze_overfit,
    analyze_plateau,
)
from pytest_lora.core.errors import CurveError


def noisy(values: list[float], amplitude: float, seed: int = 0) -> list[float]:
    """Multiplicative uniform noise of +-amplitude, seeded so every run sees the same curve."""
    rng = random.Random(seed)
    return [v * (1 + rng.uniform(-amplitude, amplitude)) for v in values]


# --- plateau: the curves from the brief ---------------------------------------------------------------------


def test_constant_curve_is_flat() -> None:
    verdict = analyze_plateau([2.5] * 20)
    assert (verdict.ok, verdict.kind) == (False, "flat")
    assert verdict.improvement == 0.0
    assert verdict.swing == 0.0
    assert verdict.start == verdict.end == verdict.best == 2.5
    assert (verdict.n_points, verdict.n_ignored, verdict.bad_index) == (20, 0, None)


@pytest.mark.parametrize("seed", range(5))
def test_constant_plus_small_noise_is_flat(seed: int) -> None:
    verdict = analyze_plateau(noisy([2.5] * 40, 0.005, seed))
    assert (verdict.ok, verdict.kind) == (False, "flat")
    assert abs(verdict.improvement) < 0.02


@pytest.mark.parametrize("seed", range(5))
def test_noisy_but_clearly_decreasing_curve_passes(seed: int) -> None:
    rng = random.Random(seed)
    losses = [5 * math.exp(-i / 20) + rng.uniform(-0.25, 0.25) for i in range(40)]
    verdict = analyze_plateau(losses)
    assert (verdict.ok, verdict.kind) == (True, "ok")
    assert verdict.improvement > 0.5


@pytest.mark.parametrize("seed", range(10))
def test_small_real_drop_is_told_apart_from_batch_noise(seed: int) -> None:
    """FACTS: r=8 lowers the loss ~8% in 40 steps, a useless adapter moves it only within +-1.4% noise."""
    trend = [2.5 * (1 - 0.08 * (1 - math.exp(-i / 15)) / (1 - math.exp(-39 / 15))) for i in range(40)]
    assert analyze_plateau(noisy(trend, 0.014, seed)).ok
    assert analyze_plateau(noisy([2.5] * 40, 0.014, seed)).kind == "flat"


@pytest.mark.parametrize("n", [10, 11, 40, 41])
def test_alternating_curve_is_oscillating_whatever_its_phase(n: int) -> None:
    for losses in ([2.0, 1.0] * 30, [1.0, 2.0] * 30):
        verdict = analyze_plateau(losses[:n])
        assert (verdict.ok, verdict.kind) == (False, "oscillating")
        assert verdict.swing > 2 * abs(verdict.improvement)


@pytest.mark.parametrize(
    "losses",
    [
        [3 + math.sin(2.5 * i) for i in range(40)],
        [3 + 0.5 * math.sin(2 * math.pi * i / 5) for i in range(40)],
    ],
)
def test_sine_around_a_constant_is_oscillating(losses: list[float]) -> None:
    assert analyze_plateau(losses).kind == "oscillating"


def test_progress_buried_in_swings_is_oscillating() -> None:
    """A 7% net drop means little when every step jumps 60%: the call is "oscillating", not "ok"."""
    losses = [(2.0 if i % 2 == 0 else 1.0) - 0.003 * i for i in range(41)]
    verdict = analyze_plateau(losses)
    assert 0.05 < verdict.improvement < 0.1
    assert verdict.swing > 0.5
    assert verdict.kind == "oscillating"
    assert analyze_plateau(losses, PlateauRule(oscillation=math.inf)).kind == "ok"


def test_sawtooth_with_real_progress_passes() -> None:
    losses = [3.0 * 0.93**i * (1.1 if i % 2 else 0.9) for i in range(40)]
    assert analyze_plateau(losses).ok


def test_rising_curve_is_diverging() -> None:
    verdict = analyze_plateau([1.0 + 0.05 * i for i in range(20)])
    assert (verdict.ok, verdict.kind) == (False, "diverging")
    assert verdict.improvement < -0.02
    assert verdict.end > verdict.start


def test_slight_rise_within_min_delta_is_flat_not_diverging() -> None:
    assert analyze_plateau([1.0 + 0.0005 * i for i in range(20)]).kind == "flat"


# --- plateau: non-finite values -----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_value_is_reported_with_its_index(bad: float) -> None:
    losses = [3.0 * 0.9**i for i in range(20)]
    losses[7] = bad
    losses[12] = math.nan
    verdict = analyze_plateau(losses)
    assert (verdict.ok, verdict.kind, verdict.bad_index) == (False, "non_finite", 7)
    assert verdict.bad_value is not None and (verdict.bad_value == bad or math.isnan(bad))
    assert math.isnan(verdict.improvement) and verdict.best_index == -1


def test_non_finite_beats_too_few_points() -> None:
    verdict = analyze_plateau([2.0, math.nan, 1.0])
    assert (verdict.kind, verdict.bad_index) == ("non_finite", 1)


def test_non_finite_inside_warmup_still_counts_in_original_indices() -> None:
    losses = [math.inf] + [3.0 * 0.9**i for i in range(19)]
    verdict = analyze_plateau(losses, PlateauRule(warmup=0.2))
    assert (verdict.kind, verdict.bad_index, verdict.n_ignored) == ("non_finite", 0, 4)


# --- plateau: too few points, warm-up, patience -------------------------------------------------------------


def test_too_short_curve_raises_with_counts_and_fix() -> None:
    with pytest.raises(CurveError) as info:
        analyze_plateau([3.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.05])
    message = str(info.value)
    assert "from 7 loss points" in message
    assert "at least 10" in message
    assert "min_points=8" in message and "2*window=10" in message
    assert "more steps" in message and "window" in message


def test_window_sets_the_minimum_length() -> None:
    losses = [3.0 * 0.9**i for i in range(8)]
    with pytest.raises(CurveError, match="at least 10"):
        analyze_plateau(losses)
    assert analyze_plateau(losses, PlateauRule(window=4)).ok


def test_warmup_points_are_skipped_and_counted() -> None:
    """A fast first drop hides a flat rest; the guide says judge after 10-20% of training."""
    losses = [10.0, 6.0, 4.0, 3.2] + [3.0] * 16
    assert analyze_plateau(losses).ok
    verdict = analyze_plateau(losses, PlateauRule(warmup=0.2))
    assert (verdict.kind, verdict.n_ignored, verdict.n_points) == ("flat", 4, 16)
    assert verdict.best_index == 4 + 4  # last point of the first (best-on-ties) window, original index


def test_warmup_skips_an_initial_rise() -> None:
    """Loss often climbs while the learning rate warms up; judged from step 0 the real drop is hidden."""
    losses = [1.0, 1.5, 2.0, 2.5] + [3.0 * 0.97**i for i in range(16)]
    assert not analyze_plateau(losses).ok
    assert analyze_plateau(losses, PlateauRule(warmup=0.2)).ok


def test_warmup_too_long_leaves_too_few_points() -> None:
    with pytest.raises(CurveError, match=r"from 6 loss points \(12 logged, 6 skipped.*or warmup"):
        analyze_plateau([3.0 * 0.9**i for i in range(12)], PlateauRule(warmup=0.5))


def test_warmup_fraction_is_floored_robustly() -> None:
    assert analyze_plateau([3.0 * 0.9**i for i in range(100)], PlateauRule(warmup=0.29)).n_ignored == 29


def test_patience_catches_a_curve_that_stopped_improving() -> None:
    losses = [3.0 * 0.9**i for i in range(25)] + [3.0 * 0.9**24] * 15
    assert analyze_plateau(losses).ok
    verdict = analyze_plateau(losses, PlateauRule(patience=10))
    assert (verdict.ok, verdict.kind) == (False, "stalled")
    assert verdict.stall_gain is not None and verdict.stall_gain < 0.02
    assert verdict.best == pytest.approx(3.0 * 0.9**24)


def test_patience_passes_a_curve_still_improving() -> None:
    """Rel gains are fractions of the earlier best: a curve still shrinking 10% a step is not stalled."""
    verdict = analyze_plateau([3.0 * 0.9**i for i in range(40)], PlateauRule(patience=5))
    assert verdict.kind == "ok"
    assert verdict.stall_gain == pytest.approx(1 - 0.9**5)


def test_patience_rel_mode_refuses_an_earlier_best_near_zero() -> None:
    losses = [1.0 - 0.1 * i for i in range(11)] + [0.0] * 9
    with pytest.raises(CurveError, match=r'best smoothed loss before the last `patience` points.*mode="abs"'):
        analyze_plateau(losses, PlateauRule(patience=3))
    assert analyze_plateau(losses, PlateauRule(patience=3, mode="abs")).kind == "stalled"


def test_patience_counts_a_late_rise_as_stalled() -> None:
    losses = [3.0 * 0.9**i for i in range(30)] + [3.0 * 0.9**29 * 1.05**i for i in range(1, 9)]
    verdict = analyze_plateau(losses, PlateauRule(patience=3))
    assert verdict.kind == "stalled" and verdict.stall_gain is not None and verdict.stall_gain < 0


def test_patience_sets_the_minimum_length() -> None:
    with pytest.raises(CurveError, match=r"at least 25 .*window\+patience=25.*patience"):
        analyze_plateau([3.0 * 0.9**i for i in range(20)], PlateauRule(patience=20))


def test_best_index_points_at_the_last_point_of_the_best_window() -> None:
    losses = [5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4]
    verdict = analyze_plateau(losses, PlateauRule(window=2, min_points=4))
    assert (verdict.best, verdict.best_index) == (pytest.approx(0.45), 6)


# --- plateau: modes -----------------------------------------------------------------------------------------


def test_abs_mode_uses_loss_units() -> None:
    losses = [0.10 - 0.0005 * i for i in range(20)]  # about -8% relative, -0.0075 absolute
    assert analyze_plateau(losses).ok
    verdict = analyze_plateau(losses, PlateauRule(mode="abs", min_delta=0.02))
    assert verdict.kind == "flat"
    assert verdict.improvement == pytest.approx(0.0075)
    assert analyze_plateau(losses, PlateauRule(mode="abs", min_delta=0.005)).ok


def test_rel_mode_refuses_a_start_near_zero() -> None:
    losses = [0.0] * 5 + [-0.1 * i for i in range(1, 15)]
    with pytest.raises(CurveError, match=r'\|start\|.*mode="abs"'):
        analyze_plateau(losses)
    assert analyze_plateau(losses, PlateauRule(mode="abs")).ok


def test_rel_mode_handles_negative_losses() -> None:
    assert analyze_plateau([-1.0 - 0.05 * i for i in range(20)]).ok
    assert analyze_plateau([-1.0 + 0.05 * i for i in range(20)]).kind == "diverging"


def test_huge_and_tiny_losses_do_not_overflow() -> None:
    assert analyze_plateau([1e308 * 0.9**i for i in range(20)]).ok
    assert analyze_plateau([1e-310 * 0.9**i for i in range(20)]).ok
    verdict = analyze_plateau([1.7e308, -1.7e308] * 10, PlateauRule(mode="abs"))
    assert verdict.kind == "oscillating" and verdict.swing == math.inf


# --- inputs and rules ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("losses", "match"),
    [
        ([1.0, "2.0", 3.0], r"losses\[1\] is '2.0' \(str\)"),
        ([1.0, 2.0, None], r"losses\[2\] is None"),
        ([1.0, True, 3.0], r"losses\[1\] is True \(bool\)"),
        ([1.0, 10**400], r"losses\[1\] = 1000.* too large"),
        ("3.0 2.0 1.0", "sequence of numbers, one per step, got str"),
        ({0: 1.0}, "got dict"),
        (2.0, "got float"),
    ],
)
def test_bad_inputs_raise_curve_error_naming_the_place(losses: object, match: str) -> None:
    with pytest.raises(CurveError, match=match):
        analyze_plateau(losses)  # type: ignore[arg-type]


def test_ints_fractions_tuples_and_iterators_are_accepted() -> None:
    expected = analyze_plateau([10.0 - i for i in range(10)])
    for losses in (
        [10 - i for i in range(10)],
        tuple(Fraction(10 - i) for i in range(10)),
        iter(range(10, 0, -1)),
    ):
        verdict = analyze_plateau(losses)  # type: ignore[arg-type]
        assert (verdict.kind, verdict.improvement) == (expected.kind, expected.improvement)


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"window": 0}, "window must be an int >= 1, got 0"),
        ({"window": True}, "window must be an int >= 1, got True"),
        ({"window": 2.0}, "window must be an int >= 1, got 2.0"),
        ({"min_delta": 0}, "min_delta must be a finite number > 0"),
        ({"min_delta": -0.1}, "got -0.1"),
        ({"min_delta": math.nan}, "min_delta"),
        ({"min_delta": math.inf}, "min_delta"),
        ({"min_delta": False}, "got False"),
        ({"mode": "relative"}, "mode must be 'rel' or 'abs', got 'relative'"),
        ({"patience": 0}, "patience must be None or an int >= 1, got 0"),
        ({"patience": True}, "patience"),
        ({"warmup": 1.0}, "warmup must be a fraction in [0, 1), got 1.0"),
        ({"warmup": -0.1}, "warmup"),
        ({"warmup": "0.1"}, "warmup"),
        ({"min_points": 1}, "min_points must be an int >= 2, got 1"),
        ({"oscillation": 0}, "oscillation must be a number > 0"),
        ({"oscillation": math.nan}, "oscillation"),
    ],
)
def test_plateau_rule_validation_names_field_and_value(kwargs: dict, text: str) -> None:
    with pytest.raises(ValueError, match="PlateauRule") as info:
        PlateauRule(**kwargs)
    assert text in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"tolerance": -0.01}, "tolerance must be a finite number >= 0, got -0.01"),
        ({"tolerance": math.inf}, "tolerance"),
        ({"tolerance": None}, "got None"),
        ({"mode": "ABS"}, "mode must be 'rel' or 'abs', got 'ABS'"),
        ({"window": 0}, "window must be an int >= 1, got 0"),
        ({"min_points": False}, "min_points must be an int >= 2, got False"),
    ],
)
def test_overfit_rule_validation_names_field_and_value(kwargs: dict, text: str) -> None:
    with pytest.raises(ValueError, match="OverfitRule") as info:
        OverfitRule(**kwargs)
    assert text in str(info.value)


def test_valid_rules_are_accepted() -> None:
    PlateauRule(window=1, min_delta=1, mode="abs", patience=1, warmup=0, min_points=2, oscillation=math.inf)
    OverfitRule(tolerance=0, mode="abs", window=1, min_points=2)


# --- overfitting --------------------------------------------------------------------------------------------

FALLING_TRAIN = [2.0 * 0.97**i for i in range(40)]
U_SHAPED_VAL = [1.0, 0.9, 0.82, 0.76, 0.73, 0.72, 0.74, 0.79, 0.85, 0.92]


def test_val_rising_while_train_falls_is_overfitting() -> None:
    verdict = analyze_overfit(FALLING_TRAIN, U_SHAPED_VAL)
    assert (verdict.ok, verdict.kind) == (False, "overfitting")
    assert verdict.val_best == pytest.approx((0.73 + 0.72 + 0.74) / 3)
    assert verdict.val_best_index == 6
    assert verdict.val_end == pytest.approx((0.79 + 0.85 + 0.92) / 3)
    assert verdict.rise == pytest.approx(verdict.val_end / verdict.val_best - 1)
    # val points 4..6 close train chunks 4..6 (4 train points each), train points 16..27; last window 28..39
    assert verdict.train_start == pytest.approx(sum(FALLING_TRAIN[16:28]) / 12)
    assert verdict.train_end == pytest.approx(sum(FALLING_TRAIN[28:]) / 12)
    assert (verdict.n_train, verdict.n_val, verdict.bad_index) == (40, 10, None)


def test_falling_val_is_not_overfitting() -> None:
    verdict = analyze_overfit(FALLING_TRAIN, [1.0 * 0.95**i for i in range(10)])
    assert (verdict.ok, verdict.kind, verdict.rise) == (True, "ok", 0.0)
    assert verdict.val_best == verdict.val_end


def test_val_rising_while_train_rises_is_left_to_the_plateau_check() -> None:
    verdict = analyze_overfit([1.0 + 0.01 * i for i in range(40)], U_SHAPED_VAL)
    assert verdict.rise > 0.02
    assert (verdict.ok, verdict.kind) == (True, "ok")
    assert verdict.train_end > verdict.train_start


def test_small_val_rise_within_tolerance_is_ok() -> None:
    val = [1.0, 0.9, 0.8, 0.75, 0.74, 0.745, 0.75, 0.75, 0.752, 0.751]
    assert analyze_overfit(FALLING_TRAIN, val).ok
    assert analyze_overfit(FALLING_TRAIN, val, OverfitRule(tolerance=0.001)).kind == "overfitting"


def test_overfit_abs_mode() -> None:
    rule = OverfitRule(mode="abs", tolerance=0.2)
    assert analyze_overfit(FALLING_TRAIN, U_SHAPED_VAL, rule).ok  # rise ~0.13 loss units
    assert analyze_overfit(FALLING_TRAIN, U_SHAPED_VAL, OverfitRule(mode="abs", tolerance=0.1)).kind == ("overfitting")


def test_overfit_with_equal_lengths_and_with_fewer_train_points() -> None:
    same = analyze_overfit(FALLING_TRAIN[:10], U_SHAPED_VAL)
    assert same.kind == "overfitting"
    assert same.train_start == pytest.approx(sum(FALLING_TRAIN[4:7]) / 3)
    assert analyze_overfit([2.0, 1.0], U_SHAPED_VAL).kind == "overfitting"


@pytest.mark.parametrize(("where", "index"), [("train", 5), ("val", 2)])
def test_overfit_non_finite(where: str, index: int) -> None:
    train, val = list(FALLING_TRAIN), list(U_SHAPED_VAL)
    (train if where == "train" else val)[index] = math.nan
    verdict = analyze_overfit(train, val[:3])  # non-finite is reported before "too few points"
    assert (verdict.ok, verdict.kind, verdict.bad_curve, verdict.bad_index) == (
        False,
        "non_finite",
        where,
        index,
    )


def test_overfit_too_few_points() -> None:
    with pytest.raises(CurveError, match=r"from 5 validation points; need at least 6 .*eval"):
        analyze_overfit(FALLING_TRAIN, U_SHAPED_VAL[:5])
    with pytest.raises(CurveError, match="from 1 train loss points"):
        analyze_overfit([1.0], U_SHAPED_VAL)
    with pytest.raises(CurveError, match=r"val_losses\[0\] is 'x'"):
        analyze_overfit(FALLING_TRAIN, ["x"])


def test_overfit_rel_mode_refuses_best_val_near_zero() -> None:
    val = [1.0, 0.5, 0.0, 0.0, 0.0, 0.3, 0.6, 0.9]
    with pytest.raises(CurveError, match=r'best val loss.*mode="abs"'):
        analyze_overfit(FALLING_TRAIN, val)
    assert analyze_overfit(FALLING_TRAIN, val, OverfitRule(mode="abs")).kind == "overfitting"


# --- properties ---------------------------------------------------------------------------------------------


def plateau_rules(modes: tuple[str, ...] = ("rel", "abs")) -> st.SearchStrategy[PlateauRule]:
    return st.builds(
        PlateauRule,
        window=st.integers(1, 6),
        min_delta=st.sampled_from([0.001, 0.02, 0.1, 0.5]),
        mode=st.sampled_from(modes),
        patience=st.none() | st.integers(1, 6),
        warmup=st.sampled_from([0.0, 0.1, 0.25]),
        min_points=st.integers(2, 10),
        oscillation=st.sampled_from([1.0, 2.0, 5.0, math.inf]),
    )


magnitudes = st.just(0.0) | st.floats(1e-6, 1e6) | st.floats(-1e6, -1e-6)


@st.composite
def trend_curves(draw: st.DrawFn) -> list[float]:
    """Level + linear trend + per-step noise, crossing zero at times: every verdict kind shows up."""
    n = draw(st.integers(8, 40))
    level = draw(st.floats(0.1, 10.0))
    slope = draw(st.floats(-0.05, 0.05)) * level
    noise = draw(st.lists(st.floats(-1.0, 1.0), min_size=n, max_size=n))
    amplitude = draw(st.sampled_from([0.0, 0.001, 0.01, 0.1, 0.5])) * level
    return [level + slope * i + amplitude * e for i, e in enumerate(noise)]


@st.composite
def positive_curves(draw: st.DrawFn) -> list[float]:
    """Like real losses: every point at least 0.2x the level, so no reference is near zero."""
    n = draw(st.integers(8, 40))
    level = draw(st.floats(0.1, 10.0))
    drift = draw(st.floats(-0.5, 0.5))
    amplitude = draw(st.sampled_from([0.0, 0.001, 0.01, 0.1, 0.3]))
    noise = draw(st.lists(st.floats(-1.0, 1.0), min_size=n, max_size=n))
    return [level * (1 + drift * i / n + amplitude * e) for i, e in enumerate(noise)]


curves = trend_curves() | positive_curves() | st.lists(magnitudes, max_size=40)


def _judge(losses: list[float], rule: PlateauRule) -> PlateauVerdict | str:
    try:
        return analyze_plateau(losses, rule)
    except CurveError as error:
        return str(error)


@settings(max_examples=200, deadline=None)
@given(curves, st.integers(-30, 30), plateau_rules(("rel",)))
def test_rel_verdict_is_exactly_invariant_under_power_of_two_scaling(
    losses: list[float], k: int, rule: PlateauRule
) -> None:
    original = _judge(losses, rule)
    scaled = _judge([math.ldexp(x, k) for x in losses], rule)
    if isinstance(original, str) or isinstance(scaled, str):
        assert scaled == original
        return
    same = ("ok", "kind", "improvement", "swing", "stall_gain", "best_index", "n_points", "n_ignored")
    assert [getattr(scaled, f) for f in same] == [getattr(original, f) for f in same]
    assert (scaled.start, scaled.end, scaled.best) == tuple(
        math.ldexp(v, k) for v in (original.start, original.end, original.best)
    )


def _near_a_threshold(verdict: PlateauVerdict) -> bool:
    """True where float rounding of a rescaled curve may legitimately flip a comparison."""
    rule = verdict.rule
    pairs = [
        (verdict.improvement, rule.min_delta),
        (verdict.improvement, -rule.min_delta),
        (verdict.swing, rule.min_delta),
        (verdict.swing, rule.oscillation * abs(verdict.improvement)),
    ]
    if verdict.stall_gain is not None:
        pairs.append((verdict.stall_gain, rule.min_delta))
    return any(abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b)) for a, b in pairs)


@settings(max_examples=200, deadline=None)
@given(positive_curves(), st.floats(1e-3, 1e3), plateau_rules(("rel",)))
def test_rel_verdict_is_invariant_under_any_positive_scaling(
    losses: list[float], factor: float, rule: PlateauRule
) -> None:
    """Off powers of two, rounding moves rel numbers by ulps: equal verdicts away from the thresholds."""
    original = _judge(losses, rule)
    scaled = _judge([x * factor for x in losses], rule)
    if isinstance(original, str) or isinstance(scaled, str):
        assert scaled == original
        return
    assume(not _near_a_threshold(original))
    assert (scaled.ok, scaled.kind) == (original.ok, original.kind)
    assert scaled.improvement == pytest.approx(original.improvement, rel=1e-9, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(
    st.floats(1e-6, 1e6),
    st.floats(0.0, 0.95, exclude_min=True),
    st.integers(PlateauRule().min_points + PlateauRule().window, 80),
)
def test_geometric_decay_always_passes(a: float, q: float, n: int) -> None:
    verdict = analyze_plateau([a * q**i for i in range(n)])
    assert (verdict.ok, verdict.kind) == (True, "ok"), verdict


@settings(max_examples=200, deadline=None)
@given(st.floats(-1e6, 1e6) | st.just(0.0), st.integers(0, 60), plateau_rules())
def test_constant_curve_never_passes(level: float, n: int, rule: PlateauRule) -> None:
    try:
        verdict = analyze_plateau([level] * n, rule)
    except CurveError:
        return
    assert (verdict.ok, verdict.kind) == (False, "flat")
    assert not (rule.mode == "rel" and level == 0.0)


any_floats = st.lists(st.floats() | st.integers(-(10**400), 10**400) | magnitudes, max_size=50)


@settings(max_examples=200, deadline=None)
@given(any_floats, plateau_rules())
def test_arbitrary_curves_raise_nothing_but_curve_error(losses: list[float], rule: PlateauRule) -> None:
    try:
        verdict = analyze_plateau(losses, rule)
    except CurveError:
        return
    assert verdict.ok == (verdict.kind == "ok")
    assert verdict.kind in {"ok", "flat", "oscillating", "stalled", "non_finite", "diverging"}
    assert (verdict.bad_index is None) == (verdict.kind != "non_finite")


@settings(max_examples=200, deadline=None)
@given(
    any_floats,
    any_floats,
    st.builds(
        OverfitRule,
        tolerance=st.sampled_from([0.0, 0.02, 1.0]),
        mode=st.sampled_from(["rel", "abs"]),
        window=st.integers(1, 4),
        min_points=st.integers(2, 8),
    ),
)
def test_arbitrary_overfit_inputs_raise_nothing_but_curve_error(
    train: list[float], val: list[float], rule: OverfitRule
) -> None:
    try:
        verdict = analyze_overfit(train, val, rule)
    except CurveError:
        return
    assert verdict.ok == (verdict.kind == "ok")
    assert verdict.kind in {"ok", "overfitting", "non_finite"}
