"""Plots of a rank sweep (matplotlib, optional: `pip install 'pytest-lora[plots]'`)."""

from __future__ import annotations

from pathlib import Path

from pytest_lora.core.sweep import FLOPS, SweepDecision, metric_threshold, percent


def plot(decision: SweepDecision, path: str | Path, title: str) -> bool:
    """Rank vs metric and rank vs training cost (the time side's basis) as one PNG; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        return False
    rule = decision.rule
    ranks = [row.point.rank for row in decision.rows]
    best = next(row.point.metric for row in decision.rows if row.point.rank == decision.best_rank)
    costs = [decision.cost(row) for row in decision.rows]
    figure, (left, right) = pyplot.subplots(1, 2, figsize=(9, 3.5))
    try:
        for axis, values, label, line, line_label in (
            (
                left,
                [row.point.metric for row in decision.rows],
                rule.metric,
                metric_threshold(best, rule, decision.ceiling),
                f"{percent(rule.metric_fraction)} of best",
            ),
            (
                right,
                costs,
                "training cost (model FLOPs)" if decision.time_basis == FLOPS else "training time (s)",
                rule.time_fraction * max(costs),
                f"{percent(rule.time_fraction)} of {decision.costliest}",
            ),
        ):
            axis.plot(ranks, values, marker="o")
            axis.axhline(line, color="tab:gray", linestyle=":", label=line_label)
            axis.axvline(decision.chosen, color="tab:green", linestyle="--", label=f"chosen r={decision.chosen}")
            axis.set_xscale("log", base=2)
            axis.set_xticks(ranks, [str(r) for r in ranks])
            axis.set_xlabel("LoRA rank r")
            axis.set_ylabel(label)
            axis.legend()
        figure.suptitle(title)
        figure.tight_layout()
        figure.savefig(path, dpi=100)
    finally:
        pyplot.close(figure)
    return True
