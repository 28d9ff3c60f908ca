"""Choosing the LoRA rank from a short sweep, and the record of that choice.

The rule (thresholds in the policy's `[sweep]` table): the smallest rank whose metric reaches
`metric_fraction` (0.95) of the best rank's, with a training time of at most `time_fraction` (0.70)
of the slowest rank's.

The time side compares a deterministic cost, the run's model FLOPs (`flops.step_flops` times the tokens
trained), whenever every rank has one: measured time on a shared machine moves by more than 30% from
run to run, and a rule on it would choose a different rank in a serial run, under xdist or in another
test order. The measured seconds are reported beside it. Points without FLOPs (hand-made, or a model
whose shape cannot be read) are compared on their seconds, and the decision says which basis it used.

"Reaching 95% of the best" compares how far each rank falls short of a perfect score, so that it
means the same for losses and accuracies:
- a loss-like metric (lower is better, perfect is 0): quality = best / metric, so 95% allows a loss
  up to best / 0.95, 5.3% above the best;
- an accuracy-like metric with a ceiling (1.0, or 100 for percent): quality = best error / error,
  the error being ceiling - metric. The guide's example, 92% / 94% / 94.1% at r = 8 / 16 / 32, gives
  r=8 a quality of 5.9 / 8 = 74% (35% more errors than r=32) and r=16 5.9 / 6 = 98%: r=16 is chosen,
  as the guide concludes. Compared as raw accuracies (92 / 94.1 = 97.8%), r=8 would pass;
- a higher-is-better metric without a ceiling: quality = metric / best.

When no rank meets both thresholds (on a small model every rank trains in about the same time), the
smallest rank reaching the metric threshold is chosen and the decision says the rule was not met.
Pure (stdlib only); the plots are drawn by `pytest_lora.integrations.plots`, the files written by the plugin.
"""

from __future__ import annotations

import math
import operator
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from pytest_lora.core.policy import SweepRule
from pytest_lora.core.thresholds import beside, limit_text

REPORT_SCHEMA = "pytest-lora/rank-sweep/1"
_PACKAGES = ("pytest-lora", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "pytest")
_EPS = 1e-12
FLOPS = "model FLOPs"  # the time side's bases, as the report names them
SECONDS = "measured seconds"


@dataclass(frozen=True)
class SweepPoint:
    """One rank's short run: its validation metric, its training time and cost, and what produced them."""

    rank: int
    metric: float
    seconds: float
    details: Mapping[str, Any] = field(default_factory=dict)
    flops: float | None = None  # model FLOPs of the run: the time side's basis when every point has them


@dataclass(frozen=True)
class RankRow:
    """A point judged by the rule: its share of the best metric and of the costliest run (FLOPs or seconds)."""

    point: SweepPoint
    quality: float
    time_share: float
    meets_metric: bool
    meets_time: bool

    def quality_text(self, rule: SweepRule) -> str:
        """The share of the best metric in percent, with the digits it takes to agree with `meets_metric`."""
        shown = beside(
            self.quality, rule.metric_fraction, operator.ge, ok=self.meets_metric, precision=1, kind="f", scale=100
        )
        return f"{shown}%"

    def time_text(self, rule: SweepRule) -> str:
        """The share of the costliest run in percent, with the digits it takes to agree with `meets_time`."""
        shown = beside(
            self.time_share, rule.time_fraction, operator.le, ok=self.meets_time, precision=0, kind="f", scale=100
        )
        return f"{shown}%"


def percent(fraction: float) -> str:
    """A threshold of the rule in percent, as `RankRow`'s texts compare with it: 0.7 -> "70%", 0.955 -> "95.5%"."""
    return f"{limit_text(fraction, scale=100)}%"


@dataclass(frozen=True)
class SweepDecision:
    """The chosen rank, whether the full rule was met, why, and every rank's row (by rank)."""

    rows: tuple[RankRow, ...]
    chosen: int
    rule_met: bool
    best_rank: int
    reason: str
    rule: SweepRule
    ceiling: float | None = None
    time_basis: str = SECONDS

    @property
    def costliest(self) -> str:
        """The time side's reference in words."""
        return costliest(self.time_basis)

    def cost(self, row: RankRow) -> float:
        """A row's value on the time side's basis (model FLOPs or seconds)."""
        return _cost(row.point, self.time_basis)

    def summary(self) -> str:
        """One line naming the chosen rank, for the terminal."""
        verdict = "rule met" if self.rule_met else "rule NOT met"
        return f"chosen rank: r={self.chosen} ({verdict}: {self.reason})"


def _cost(point: SweepPoint, basis: str) -> float:
    return float(point.flops) if basis == FLOPS and point.flops is not None else point.seconds


def costliest(basis: str) -> str:
    """What a time share is a share of: "most model FLOPs" or "longest time"."""
    return "most model FLOPs" if basis == FLOPS else "longest time"


def quality(metric: float, best: float, *, higher_is_better: bool, ceiling: float | None = None) -> float:
    """How close `metric` comes to `best`, in (0, 1]: the best's shortfall from perfect over this one's.

    Raises ValueError for a value the chosen comparison cannot judge (a negative loss, an accuracy
    above its ceiling, a non-positive metric without a ceiling).
    """
    if not math.isfinite(metric):
        return 0.0
    if not higher_is_better:
        if metric < 0 or best < 0:
            raise ValueError(f"metric {metric:g} (best {best:g}): a lower-is-better metric must be >= 0, like a loss")
        return 1.0 if metric <= _EPS else best / metric
    if ceiling is not None:
        error, best_error = ceiling - metric, ceiling - best
        if error < 0 or best_error < 0:
            raise ValueError(f"metric {metric:g} (best {best:g}) is above its ceiling {ceiling:g}")
        return 1.0 if error <= _EPS else best_error / error
    if metric <= 0 or best <= 0:
        raise ValueError(f"metric {metric:g} (best {best:g}): a higher-is-better metric without a ceiling must be > 0")
    return metric / best


def metric_threshold(best: float, rule: SweepRule, ceiling: float | None = None) -> float:
    """The metric value at exactly `metric_fraction` of `best`: the line a rank must reach."""
    if not rule.higher_is_better:
        return best / rule.metric_fraction
    if ceiling is not None:
        return ceiling - (ceiling - best) / rule.metric_fraction
    return best * rule.metric_fraction


def choose_rank(points: Sequence[SweepPoint], rule: SweepRule, *, ceiling: float | None = None) -> SweepDecision:
    """Apply the rule to the sweep's points (any order, one per rank)."""
    if not points:
        raise ValueError("no sweep results: every rank's run failed or none ran")
    ranks = [p.rank for p in points]
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"ranks {sorted(ranks)}: each rank must appear once")
    finite = [p for p in points if math.isfinite(p.metric)]
    if not finite:
        raise ValueError(f"no finite metric among ranks {sorted(ranks)}: every run diverged")
    pick = max if rule.higher_is_better else min
    best = pick(finite, key=lambda p: (p.metric, -p.rank) if rule.higher_is_better else (p.metric, p.rank))
    basis = FLOPS if all(p.flops is not None for p in points) else SECONDS
    longest = max(_cost(p, basis) for p in points)
    rows = []
    for point in sorted(points, key=lambda p: p.rank):
        share = quality(point.metric, best.metric, higher_is_better=rule.higher_is_better, ceiling=ceiling)
        time_share = _cost(point, basis) / longest if longest > 0 else 1.0
        rows.append(
            RankRow(
                point=point,
                quality=share,
                time_share=time_share,
                meets_metric=share >= rule.metric_fraction - _EPS,
                meets_time=time_share <= rule.time_fraction + _EPS,
            )
        )
    good = [row for row in rows if row.meets_metric and row.meets_time]
    metric_name = rule.metric
    threshold = f">= {percent(rule.metric_fraction)} of the best {metric_name}"
    if good:
        row = good[0]
        reason = (
            f"smallest rank with {threshold} ({row.quality_text(rule)}) in <= {percent(rule.time_fraction)} of the "
            f"{costliest(basis)} ({row.time_text(rule)})"
        )
        return SweepDecision(tuple(rows), row.point.rank, True, best.rank, reason, rule, ceiling, basis)
    row = next(row for row in rows if row.meets_metric)
    reason = (
        f"no rank reached {threshold} in <= {percent(rule.time_fraction)} of the {costliest(basis)} "
        f"(r={row.point.rank} took {row.time_text(rule)}); chose the smallest rank reaching {threshold} "
        f"({row.quality_text(rule)})"
    )
    return SweepDecision(tuple(rows), row.point.rank, False, best.rank, reason, rule, ceiling, basis)


def decide(records: Sequence[Mapping[str, Any]], rule: SweepRule) -> SweepDecision:
    """The decision from the per-rank records the sweep items report (as JSON-like dicts).

    Each record holds rank, metric, seconds, flops (None when unknown), metric_name, higher_is_better and
    ceiling, plus details kept for the report. The policy's `rule` gives the thresholds; the records give
    the metric and its direction.
    """
    if not records:
        raise ValueError("no rank has a result (every item failed, was skipped or never called run())")
    keys = {(r["metric_name"], r["higher_is_better"], r["ceiling"]) for r in records}
    if len(keys) > 1:
        raise ValueError(f"the ranks recorded different metrics (name, higher_is_better, ceiling): {sorted(keys)}")
    metric_name, higher_is_better, ceiling = keys.pop()
    points = [
        SweepPoint(
            rank=r["rank"],
            metric=r["metric"],
            seconds=r["seconds"],
            details={k: v for k, v in r.items() if k not in ("rank", "metric", "seconds", "flops")},
            flops=r.get("flops"),
        )
        for r in records
    ]
    rule = replace(rule, metric=metric_name, higher_is_better=higher_is_better)
    return choose_rank(points, rule, ceiling=ceiling)


def definition(rule: SweepRule, ceiling: float | None) -> str:
    """What "reaching X% of the best" meant for this metric, in words, for the report."""
    if not rule.higher_is_better:
        return f"lower is better: quality = best / metric; a rank qualifies at quality >= {rule.metric_fraction:g}"
    if ceiling is not None:
        return (
            f"higher is better, ceiling {ceiling:g}: quality = (ceiling - best) / (ceiling - metric), the error "
            f"ratio; a rank qualifies at quality >= {rule.metric_fraction:g}"
        )
    return f"higher is better: quality = metric / best; a rank qualifies at quality >= {rule.metric_fraction:g}"


def report_data(decision: SweepDecision, provenance: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON report: the decision, the rule with its thresholds, every rank's row, and the provenance."""
    rule = asdict(decision.rule)
    rule["metric_ceiling"] = decision.ceiling
    rule["definition"] = definition(decision.rule, decision.ceiling)
    rule["time_basis"] = decision.time_basis
    return {
        "schema": REPORT_SCHEMA,
        **provenance,
        "chosen_rank": decision.chosen,
        "rule_met": decision.rule_met,
        "reason": decision.reason,
        "best_rank": decision.best_rank,
        "rule": rule,
        "ranks": [
            {
                "rank": row.point.rank,
                "metric": row.point.metric,
                "seconds": row.point.seconds,
                "flops": row.point.flops,
                "quality": row.quality,
                "time_share": row.time_share,
                "meets_metric": row.meets_metric,
                "meets_time": row.meets_time,
                **row.point.details,
            }
            for row in decision.rows
        ],
    }


def markdown(decision: SweepDecision, title: str) -> str:
    """A Markdown table of the sweep, the chosen rank marked, for a PR comment or a run log."""
    rule = decision.rule
    lines = [
        f"## Rank sweep: {title}",
        "",
        f"| rank | {rule.metric} | share of best | train time (s) | model FLOPs | share of {decision.costliest} | "
        f">= {percent(rule.metric_fraction)} of best | <= {percent(rule.time_fraction)} of {decision.costliest} | "
        "chosen |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | :---: | :---: | :---: |",
    ]
    for row in decision.rows:
        flops = "" if row.point.flops is None else f"{row.point.flops:.3g}"
        lines.append(
            f"| {row.point.rank} | {row.point.metric:.4g} | {row.quality_text(rule)} | {row.point.seconds:.3g} | "
            f"{flops} | {row.time_text(rule)} | {_mark(row.meets_metric)} | {_mark(row.meets_time)} | "
            f"{'**r=' + str(row.point.rank) + '**' if row.point.rank == decision.chosen else ''} |"
        )
    lines += ["", decision.summary(), "", f"Quality: {definition(rule, decision.ceiling)}.", ""]
    return "\n".join(lines)


def _mark(ok: bool) -> str:
    return "yes" if ok else "no"


def package_versions() -> dict[str, str | None]:
    """Versions of the packages a sweep result depends on (None when not installed)."""
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(directory: str | Path) -> str | None:
    """The checked-out commit of the repository holding `directory` (with "+dirty" for local changes), or None."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head
