"""Logging a rank sweep to MLflow: one run per rank and a parent run holding the decision.

The guide's last production step: when the model ages and needs retraining, the rank choice still
has its evidence (each rank's metric and time, the rule, the data fingerprint, the commit). Uses
`MlflowClient` with an explicit tracking URI, so the user's global MLflow state is left alone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pytest_lora.core.errors import SettingsError

EXPERIMENT = "pytest-lora rank sweep"
_PROVENANCE = ("base_model", "dataset", "dataset_fingerprint", "git_commit", "policy")


def require_mlflow(where: str) -> None:
    """`--lora-mlflow` without MLflow installed is a usage error before any test runs, not lost results.

    `where` names the setting and its value as the user wrote it (`--lora-mlflow URI`, a pyproject key, ...).
    """
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        raise SettingsError(
            f"{where}: MLflow is not installed.\n"
            "  fix: pip install 'pytest-lora[mlflow]' (mlflow-skinny, plus SQLAlchemy and Alembic for sqlite:// stores)"
        )


def _scalar(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


class MlflowSweepLogger:
    """`--lora-mlflow URI`: an implementation of the `pytest_lora_sweep_decided` hook (pluggy matches it by name).

    A tracking store that fails must not lose the sweep: the report files are written already, and the
    note under the sweep in the terminal summary says what happened.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def pytest_lora_sweep_decided(self, decision: Any, report: Any) -> None:
        try:
            run_id = log_sweep(self.uri, decision, report.provenance, report.paths)
        except Exception as exc:  # any store error; the report on disk stays the record
            failure = f"{type(exc).__name__}: {exc}"
            report.notes.append(f"MLflow logging to {self.uri} FAILED ({failure}); the report files above are complete")
        else:
            report.notes.append(f"MLflow: logged to {self.uri} (decision run {run_id}, one child run per rank)")


def log_sweep(uri: str, decision: Any, provenance: Mapping[str, Any], artifacts: Sequence[Path]) -> str:
    """Log the decision and every rank's row to the tracking store at `uri`; return the parent run id."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT)
    sweep = str(provenance.get("sweep", "sweep"))
    rule = decision.rule
    parent = client.create_run(
        experiment_id,
        run_name=f"{sweep}: chosen r={decision.chosen}",
        tags={"pytest_lora.sweep": sweep, "pytest_lora.rule_met": str(decision.rule_met)},
    )
    parent_id = parent.info.run_id
    params = {
        "chosen_rank": decision.chosen,
        "best_rank": decision.best_rank,
        "rule_met": decision.rule_met,
        "reason": decision.reason,
        "metric": rule.metric,
        "metric_fraction": rule.metric_fraction,
        "time_fraction": rule.time_fraction,
        "ranks": [row.point.rank for row in decision.rows],
        **{
            key: provenance.get(key) for key in ("base_model", "dataset", "dataset_fingerprint", "git_commit", "policy")
        },
    }
    client.log_batch(
        parent_id,
        params=[Param(key, _scalar(value)[:6000]) for key, value in params.items()],
        metrics=[Metric("chosen_rank", decision.chosen, 0, 0)],
    )
    for path in artifacts:
        client.log_artifact(parent_id, str(path))
    for row in decision.rows:
        child = client.create_run(
            experiment_id,
            run_name=f"{sweep}: r={row.point.rank}",
            tags={"mlflow.parentRunId": parent_id, "pytest_lora.sweep": sweep},
        )
        details = {key: value for key, value in row.point.details.items() if key != "config"}
        config = row.point.details.get("config", {})
        client.log_batch(
            child.info.run_id,
            params=[Param(key, _scalar(value)[:6000]) for key, value in {"rank": row.point.rank, **config}.items()],
            metrics=[
                Metric(name, float(value), 0, 0)
                for name, value in {
                    rule.metric: row.point.metric,
                    "train_seconds": row.point.seconds,
                    "quality": row.quality,
                    "time_share": row.time_share,
                }.items()
            ],
            tags=[RunTag(f"pytest_lora.{key}", _scalar(value)[:5000]) for key, value in details.items()],
        )
        client.set_terminated(child.info.run_id)
    client.set_terminated(parent_id)
    return parent_id
