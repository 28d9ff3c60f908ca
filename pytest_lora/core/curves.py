"""Judge loss curves: did training make progress (no plateau), and did it overfit?

Pure arithmetic on lists of floats, stdlib only, so the verdicts are cheap to property-test. The assertion
layer turns a verdict into a failure message, so every verdict carries the numbers that message needs.

Conventions shared by both checks:

- Smoothing is a trailing simple moving average over full windows only: smoothed value ``j`` is the mean of
  points ``j .. j + window - 1`` and belongs to point ``j + window - 1``, the step at which it is known.
- A curve is first divided by the power of two just above its largest ``|loss|``: sums cannot overflow, and
  multiplying a curve by ``2**k`` gives bit-identical verdicts (any other positive factor changes the "rel"
  numbers only by float rounding).
- "rel" quantities are fractions of a reference loss's magnitude (``|start|`` for a plateau's improvement and
  swing, the earlier best for its patience gain, ``|best val|`` for overfitting), so they do not depend on the
  curve's scale. A reference that is zero or at most 1e-12 of the curve's largest ``|loss|`` makes "rel"
  meaningless: that is a `CurveError` telling the user to pick ``mode="abs"``.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass

from pytest_lora.core.errors import CurveError
from pytest_lora.core.values import is_int, is_real

_MODES = ("rel", "abs")
# "rel" refuses a reference loss at most this fraction of the curve's largest |loss| (scale-free "near zero").
_TINY = 1e-12


def _check_int(owner: str, name: str, value: object, minimum: int) -> None:
    if not is_int(value) or value < minimum:  # type: ignore[operator]
        raise ValueError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}")


def _check_mode(owner: str, mode: object) -> None:
    if mode not in _MODES:
        raise ValueError(f"{owner}: mode must be 'rel' or 'abs', got {mode!r}")


@dataclass(frozen=True)
class PlateauRule:
    """When a training-loss curve counts as making progress (see `analyze_plateau` for the exact rule)."""

    window: int = 5
    min_delta: float = 0.02
    mode: str = "rel"
    patience: int | None = None
    warmup: float = 0.0
    min_points: int = 8
    oscillation: float = 2.0

    def __post_init__(self) -> None:
        """Reject bad settings at construction, where the caller can still see which argument was wrong."""
        owner = "PlateauRule"
        _check_int(owner, "window", self.window, 1)
        if not is_real(self.min_delta) or not 0 < self.min_delta < math.inf:
            raise ValueError(
                f"{owner}: min_delta must be a finite number > 0 (0 would pass a flat curve), got {self.min_delta!r}"
            )
        _check_mode(owner, self.mode)
        if self.patience is not None and (not is_int(self.patience) or self.patience < 1):
            raise ValueError(f"{owner}: patience must be None or an int >= 1, got {self.patience!r}")
        if not is_real(self.warmup) or not 0 <= self.warmup < 1:
            raise ValueError(f"{owner}: warmup must be a fraction in [0, 1), got {self.warmup!r}")
        _check_int(owner, "min_points", self.min_points, 2)
        if not is_real(self.oscillation) or not self.oscillation > 0:
            raise ValueError(
                f"{owner}: oscillation must be a number > 0 (math.inf turns the call off), got {self.oscillation!r}"
            )


@dataclass(frozen=True)
class OverfitRule:
    """How far validation loss may climb back above its best while train loss still falls."""

    tolerance: float = 0.02
    mode: str = "rel"
    window: int = 3
    min_points: int = 6

    def __post_init__(self) -> None:
        """Reject bad settings at construction, where the caller can still see which argument was wrong."""
        owner = "OverfitRule"
        if not is_real(self.tolerance) or not 0 <= self.tolerance < math.inf:
            raise ValueError(f"{owner}: tolerance must be a finite number >= 0, got {self.tolerance!r}")
        _check_mode(owner, self.mode)
        _check_int(owner, "window", self.window, 1)
        _check_int(owner, "min_points", self.min_points, 2)


@dataclass(frozen=True)
class PlateauVerdict:
    """Outcome of `analyze_plateau`; differences are in ``rule.mode`` units, levels in loss units.

    For ``kind == "non_finite"`` the level and difference fields are NaN and ``best_index`` is -1.
    """

    ok: bool
    kind: str  # "ok" | "flat" | "oscillating" | "stalled" | "non_finite" | "diverging"
    start: float  # smoothed loss of the first window after warm-up
    end: float  # smoothed loss of the last window
    improvement: float  # start - end: a fraction of |start| (rel) or loss units (abs); negative = worse
    best: float  # lowest smoothed loss
    best_index: int  # index (in the original sequence) of the last point of the best window
    n_points: int  # points judged, after warm-up
    n_ignored: int  # warm-up points skipped
    swing: float  # median |step-to-step change| of the judged points, same units as improvement
    bad_index: int | None  # first non-finite point, index into the original sequence
    rule: PlateauRule
    bad_value: float | None = None  # the non-finite value itself (nan, inf or -inf)
    # With patience: best smoothed loss before the last `patience` smoothed values minus the best within them,
    # as a fraction of |that earlier best| (rel) or in loss units (abs); stalled when < min_delta. None
    # without patience.
    stall_gain: float | None = None


@dataclass(frozen=True)
class OverfitVerdict:
    """Outcome of `analyze_overfit`; ``rise`` is in ``rule.mode`` units, the rest in loss units.

    For ``kind == "non_finite"`` the loss fields are NaN and ``val_best_index`` is -1.
    """

    ok: bool
    kind: str  # "ok" | "overfitting" | "non_finite"
    train_start: float  # mean train loss over the steps of the best validation window
    train_end: float  # mean train loss over the steps of the last validation window
    val_best: float  # lowest smoothed validation loss
    val_best_index: int  # index of the last validation point of the best window
    val_end: float  # smoothed validation loss of the last window
    rise: float  # val_end - val_best: a fraction of |val_best| (rel) or loss units (abs)
    bad_index: int | None  # first non-finite point of the curve named by bad_curve
    rule: OverfitRule
    bad_curve: str | None = None  # "train" | "val"
    bad_value: float | None = None
    n_train: int = 0
    n_val: int = 0


def _as_floats(values: Sequence[float], name: str) -> list[float]:
    """Convert up front so a wrong type is a CurveError naming the place, never a TypeError mid-way."""
    if isinstance(values, (str, bytes, Mapping, Set)) or not isinstance(values, Iterable):
        raise CurveError(f"{name} must be a sequence of numbers, one per step, got {type(values).__name__}")
    floats = []
    for i, value in enumerate(values):
        if not is_real(value):
            raise CurveError(
                f"{name}[{i}] is {value!r:.80} ({type(value).__name__}), not a real number: "
                "pass plain floats (e.g. loss.item())"
            )
        try:
            floats.append(float(value))
        except OverflowError:
            raise CurveError(f"{name}[{i}] = {value!r:.80} is too large for a float") from None
    return floats


def _first_non_finite(values: list[float]) -> int | None:
    return next((i for i, value in enumerate(values) if not math.isfinite(value)), None)


def _normalise(values: list[float]) -> tuple[list[float], int]:
    """Divide by the power of two just above max |value|: exact, overflow-free, and scale-free for 2**k."""
    exponent = math.frexp(max(map(abs, values), default=0.0))[1]
    return [math.ldexp(value, -exponent) for value in values], exponent


def _unscale(value: float, exponent: int) -> float:
    """Undo `_normalise`; a difference of two huge losses may not fit a float, so it saturates to inf."""
    try:
        return math.ldexp(value, exponent)
    except OverflowError:
        return math.copysign(math.inf, value)


def _smooth(values: list[float], window: int) -> list[float]:
    return [math.fsum(values[j : j + window]) / window for j in range(len(values) - window + 1)]


def _mean(values: list[float], lo: int, hi: int) -> float:
    """Mean of values[lo:hi], widened to one point when a short curve maps a span onto no point at all."""
    lo = min(lo, len(values) - 1)
    hi = max(hi, lo + 1)
    return math.fsum(values[lo:hi]) / (hi - lo)


def _rel_reference(reference: float, values: list[float], what: str) -> float:
    """|reference| for "rel" mode, refusing one that is zero or negligible next to the curve's values."""
    if abs(reference) <= _TINY * max(map(abs, values)):
        raise CurveError(
            f'mode="rel" divides by |{what}|, which is zero or negligible next to the curve\'s values, so a '
            'relative change means nothing here: use mode="abs" with a threshold in loss units'
        )
    return abs(reference)


def _in_units(difference: float, rel_reference: float | None, exponent: int) -> float:
    """A difference of normalised losses, as a fraction of the rel reference or in loss units (abs)."""
    if rel_reference is not None:
        return difference / rel_reference
    return _unscale(difference, exponent)


def analyze_plateau(losses: Sequence[float], rule: PlateauRule = PlateauRule()) -> PlateauVerdict:
    """Judge whether a training-loss curve made progress.

    The first ``floor(warmup * len(losses))`` points are skipped; the rest need at least
    ``max(min_points, 2 * window, window + patience)`` points (start and end windows must not overlap),
    else `CurveError`. A non-finite value anywhere, warm-up included, is checked first: kind "non_finite".
    ``start``/``end`` are the means of the first/last ``window`` judged points, ``improvement`` is
    ``start - end`` (over ``|start|`` in rel mode) and ``swing`` the median absolute step-to-step change
    of the judged points in the same units. The first matching kind wins:

    - "oscillating": ``swing > min_delta`` and ``swing > oscillation * |improvement|`` (the net change is
      lost in the step-to-step noise, whatever its sign);
    - "diverging": ``improvement < -min_delta``;
    - "flat": ``improvement < min_delta``;
    - "stalled" (only with ``patience``): the best smoothed loss over the last ``patience`` smoothed values
      beats the best before them by less than ``min_delta`` (``stall_gain``; in rel mode a fraction of that
      earlier best, as in ReduceLROnPlateau, so a curve still shrinking geometrically is not stalled);
    - otherwise "ok".
    """
    values = _as_floats(losses, "losses")
    n_ignored = math.floor(rule.warmup * len(values) + 1e-9)  # 1e-9: 0.29 * 100 is 28.999...
    judged = values[n_ignored:]
    bad = _first_non_finite(values)
    if bad is not None:
        nan = math.nan
        return PlateauVerdict(
            ok=False,
            kind="non_finite",
            start=nan,
            end=nan,
            improvement=nan,
            best=nan,
            best_index=-1,
            n_points=len(judged),
            n_ignored=n_ignored,
            swing=nan,
            bad_index=bad,
            rule=rule,
            bad_value=values[bad],
        )

    needs = {"min_points": rule.min_points, "2*window": 2 * rule.window}
    if rule.patience is not None:
        needs["window+patience"] = rule.window + rule.patience
    needed = max(needs.values())
    if len(judged) < needed:
        detail = ", ".join(f"{name}={count}" for name, count in needs.items())
        smaller = "window, min_points" + (", patience" if rule.patience is not None else "")
        raise CurveError(
            f"cannot judge a plateau from {len(judged)} loss points ({len(values)} logged, "
            f"{n_ignored} skipped as warm-up); need at least {needed} ({detail}): "
            f"log the loss at more steps, or lower {smaller}" + (" or warmup" if n_ignored else "")
        )

    normalised, exponent = _normalise(judged)
    smoothed = _smooth(normalised, rule.window)
    start, end = smoothed[0], smoothed[-1]
    reference = _rel_reference(start, normalised, "start") if rule.mode == "rel" else None
    improvement = _in_units(start - end, reference, exponent)
    steps = [abs(b - a) for a, b in itertools.pairwise(normalised)]
    swing = _in_units(statistics.median(steps), reference, exponent)
    best_j = min(range(len(smoothed)), key=smoothed.__getitem__)
    stall_gain = None
    if rule.patience is not None:
        best_before, best_recent = min(smoothed[: -rule.patience]), min(smoothed[-rule.patience :])
        earlier = "the best smoothed loss before the last `patience` points"
        best_reference = _rel_reference(best_before, normalised, earlier) if rule.mode == "rel" else None
        stall_gain = _in_units(best_before - best_recent, best_reference, exponent)

    if swing > rule.min_delta and swing > rule.oscillation * abs(improvement):
        kind = "oscillating"
    elif improvement < -rule.min_delta:
        kind = "diverging"
    elif improvement < rule.min_delta:
        kind = "flat"
    elif stall_gain is not None and stall_gain < rule.min_delta:
        kind = "stalled"
    else:
        kind = "ok"
    return PlateauVerdict(
        ok=kind == "ok",
        kind=kind,
        start=_unscale(start, exponent),
        end=_unscale(end, exponent),
        improvement=improvement,
        best=_unscale(smoothed[best_j], exponent),
        best_index=n_ignored + best_j + rule.window - 1,
        n_points=len(judged),
        n_ignored=n_ignored,
        swing=swing,
        bad_index=None,
        rule=rule,
        stall_gain=stall_gain,
    )


def analyze_overfit(
    train_losses: Sequence[float], val_losses: Sequence[float], rule: OverfitRule = OverfitRule()
) -> OverfitVerdict:
    """Judge whether validation loss climbed back above its best while train loss kept falling.

    Validation is smoothed with ``window``; ``val_best`` is the lowest smoothed value (first one on ties),
    ``val_end`` the last, and ``rise = val_end - val_best`` (over ``|val_best|`` in rel mode). Both curves
    are taken to span the same run, val point ``k`` of ``n_val`` closing the k-th of ``n_val`` equal chunks
    of the train curve; ``train_start``/``train_end`` are the mean train losses over the chunks of the best
    and of the last validation window. "overfitting" when ``rise > tolerance`` and
    ``train_end < train_start``; a val rise while train also rises is divergence, left to the plateau check
    (ok here). Non-finite values (train checked first) give "non_finite"; fewer than
    ``max(min_points, window + 1)`` val points or 2 train points give `CurveError`.
    """
    train = _as_floats(train_losses, "train_losses")
    val = _as_floats(val_losses, "val_losses")
    n_train, n_val = len(train), len(val)
    for curve, values in (("train", train), ("val", val)):
        bad = _first_non_finite(values)
        if bad is not None:
            nan = math.nan
            return OverfitVerdict(
                ok=False,
                kind="non_finite",
                train_start=nan,
                train_end=nan,
                val_best=nan,
                val_best_index=-1,
                val_end=nan,
                rise=nan,
                bad_index=bad,
                rule=rule,
                bad_curve=curve,
                bad_value=values[bad],
                n_train=n_train,
                n_val=n_val,
            )

    needed = max(rule.min_points, rule.window + 1)
    if n_val < needed:
        raise CurveError(
            f"cannot judge overfitting from {n_val} validation points; need at least {needed} "
            f"(min_points={rule.min_points}, window+1={rule.window + 1}): evaluate more often "
            "(e.g. a smaller eval_steps) or lower window/min_points"
        )
    if n_train < 2:
        raise CurveError(f"cannot judge overfitting from {n_train} train loss points; need at least 2")

    val_normalised, val_exponent = _normalise(val)
    smoothed = _smooth(val_normalised, rule.window)
    best_j = min(range(len(smoothed)), key=smoothed.__getitem__)
    best, end = smoothed[best_j], smoothed[-1]
    reference = _rel_reference(best, val_normalised, "best val loss") if rule.mode == "rel" else None
    rise = _in_units(end - best, reference, val_exponent)

    train_normalised, train_exponent = _normalise(train)
    last_j = len(smoothed) - 1
    best_lo, best_hi = best_j * n_train // n_val, (best_j + rule.window) * n_train // n_val
    train_start = _mean(train_normalised, best_lo, best_hi)
    train_end = _mean(train_normalised, last_j * n_train // n_val, n_train)

    kind = "overfitting" if rise > rule.tolerance and train_end < train_start else "ok"
    return OverfitVerdict(
        ok=kind == "ok",
        kind=kind,
        train_start=_unscale(train_start, train_exponent),
        train_end=_unscale(train_end, train_exponent),
        val_best=_unscale(best, val_exponent),
        val_best_index=best_j + rule.window - 1,
        val_end=_unscale(end, val_exponent),
        rise=rise,
        bad_index=None,
        rule=rule,
        n_train=n_train,
        n_val=n_val,
    )
