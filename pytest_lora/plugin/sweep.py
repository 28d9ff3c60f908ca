"""The rank sweep's run and choice: the `lora_sweep` object, and the recorder that decides at the session's end.

A test that takes the `lora_sweep` fixture (`plugin.fixtures`) runs once per rank (`--lora-sweep 4,8,16`, the
`sweep` marker keyword, or the policy's `sweep.ranks`), so pytest-xdist spreads the ranks over
workers and GPUs. Each item trains briefly on a fraction of the data and records its validation
metric and training time in the test report's `user_properties`; reports travel from xdist
workers to the controller, which applies the rule (`pytest_lora.core.sweep`) exactly as a serial run
would, writes the JSON / Markdown / PNG report and names the chosen rank in the terminal summary.
The default data is the planted-rank task (`pytest_lora.model.planted`): the summary then says whether the
sweep found the planted rank, a calibration of the whole pipeline.

Not a plugin module of its own: the first sweep item collected (or, under xdist, the controller at configure)
calls `record_sweeps`, so a session without sweeps never loads this module.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import time
import traceback
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_lora.core.defaults import DEFAULT_BATCH_SIZE, DEFAULT_LR, DEFAULT_SEQ_LEN
from pytest_lora.core.errors import AdapterConfigError, PolicyError
from pytest_lora.plugin.state import STATE
from pytest_lora.plugin.xdist import is_worker

if TYPE_CHECKING:
    from pytest_lora.core.policy import SweepRule
    from pytest_lora.core.settings import Settings
    from pytest_lora.core.sweep import SweepDecision
    from pytest_lora.model.base_pool import BaseModelPool

SWEEP_DIR_OPTION = "--lora-sweep-dir"
SWEEP_PROPERTY = "lora_sweep"  # user_properties key of a rank's result
ITEM_PROPERTY = "lora_sweep_item"  # ... of every sweep item, so a failed rank is known too
DEFAULT_SWEEP_DIR = ".lora-sweep"
_RECORDER = "lora-sweep-recorder"
_WARMUP_STEPS = 1
_warm_bases: weakref.WeakSet[Any] = weakref.WeakSet()  # base models this process has trained on once


def record_sweeps(config: pytest.Config) -> None:
    """Gather the ranks' results in this process from now on (once per session): the controller under
    pytest-xdist, else the serial run. An xdist worker only sends them, in its reports. `-p no:lora-sweep-recorder`
    blocks the registration: then nothing is recorded (nor logged to MLflow), however many sweeps are collected."""
    plugins = config.pluginmanager
    if is_worker(config) or plugins.has_plugin(_RECORDER) or plugins.is_blocked(_RECORDER):
        return
    plugins.register(SweepRecorder(config), _RECORDER)
    uri = config.stash[STATE].session.settings.mlflow
    if uri:  # the first user of the `pytest_lora_sweep_decided` hook
        from pytest_lora.integrations.mlflow import MlflowSweepLogger

        plugins.register(MlflowSweepLogger(uri), "lora-mlflow")


def start_run(
    item: pytest.Item, rank: int, session: BaseModelPool, settings: Settings, train: Callable[..., Any]
) -> SweepRun:
    """The `lora_sweep` fixture's object for this item, which is marked as a sweep item in its report
    (so a rank that fails before recording is still known to the choice)."""
    group = sweep_group(item)
    item.user_properties.append((ITEM_PROPERTY, {"group": group, "rank": rank}))
    return SweepRun(
        rank=rank,
        rule=session.policy.sweep,
        settings=settings,
        session=session,
        train=train,
        record=lambda point: item.user_properties.append((SWEEP_PROPERTY, point)),
        group=group,
    )


def sweep_group(item: pytest.Item) -> str:
    """The sweep an item belongs to: its node id without the `r=N` parameter id (other parameters stay)."""
    base, _, params = item.nodeid.partition("[")
    rest = [part for part in params.rstrip("]").split("-") if part and not re.fullmatch(r"r=\d+", part)]
    return f"{base}[{'-'.join(rest)}]" if rest else base


class SweepRun:
    """The fixture object: trains one rank of the sweep and records the result in the test report."""

    def __init__(
        self,
        *,
        rank: int,
        rule: SweepRule,
        settings: Settings,
        session: BaseModelPool,
        train: Callable[..., Any],
        record: Callable[[dict[str, Any]], None],
        group: str,
    ) -> None:
        self.rank = rank
        self.rule = rule
        self._settings = settings
        self._session = session
        self._train = train
        self._record = record
        self.group = group
        self.result: Any = None

    def run(
        self,
        config: Any,
        *,
        metric: Callable[[Any, Any], float] | None = None,
        higher_is_better: bool | None = None,
        ceiling: float | None = None,
        steps: int | None = None,
        dataset: Any = None,
        lr: float = DEFAULT_LR,
        batch_size: int = DEFAULT_BATCH_SIZE,
        seq_len: int = DEFAULT_SEQ_LEN,
    ) -> float:
        """Train this rank for the policy's `sweep.steps` on its `sweep.data_fraction` of the training data.

        The metric is the final validation loss, or `metric(model, val_ids)` (e.g. accuracy; its name is
        the policy's `sweep.metric` or the function's name, its direction the policy's `higher_is_better`
        unless given; `ceiling`: its perfect value, e.g. 1.0 for accuracy). Returns the metric.
        `dataset` defaults to `builtin:planted-rank-8`, the calibration task (its update is on the output
        head, which the config must adapt).
        """
        __tracebackhide__ = True
        from pytest_lora.model import planted
        from pytest_lora.model.counting import count_parameters

        rule = self._metric_rule(metric, higher_is_better)
        lora_config = self._config(config)
        data = self._fraction(self._policy_dataset() if dataset is None else dataset, seq_len, batch_size)
        if isinstance(data, planted.PlantedData):
            from pytest_lora.model.adapters import matched_modules

            planted.check_targets(data, matched_modules(self._session.base(self._settings).model, lora_config))
        steps = steps or rule.steps
        self._session.progress(f"sweep {self.group}: training r={self.rank} ({steps} steps on {data.name})")
        self._warm_up(lora_config, data, batch_size)
        result = self._train(
            lora_config, steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len, dataset=data, eval_every=steps
        )
        value = float(metric(result.model, data.val) if metric is not None else result.val_losses[-1])
        self.result = result
        count = count_parameters(result.model)
        self._record(
            {
                "rank": self.rank,
                "metric": value,
                "seconds": result.step_time_s * result.steps,
                "flops": _flops(result),
                "metric_name": rule.metric,
                "higher_is_better": rule.higher_is_better,
                "ceiling": ceiling,
                "steps": result.steps,
                "lr": lr,
                "batch_size": batch_size,
                "seq_len": result.seq_len,
                "seed": result.seed,
                "device": result.device,
                "trainable_parameters": count.trainable,
                "total_parameters": count.total,
                "base_model": self._session.base(self._settings).source.label,
                "dataset": data.name,
                "dataset_fingerprint": result.data_fingerprint,
                "train_sequences": len(data.train),
                "val_sequences": len(data.val),
                **_planted_fields(data),
                "final_train_loss": result.losses[-1],
                "val_losses": result.val_losses,
                "config": _jsonable(lora_config.to_dict()),
            }
        )
        return value

    def _metric_rule(self, metric: Callable[..., float] | None, higher_is_better: bool | None) -> SweepRule:
        """The policy's rule with this run's metric name and direction."""
        if metric is None:
            if self.rule.higher_is_better or higher_is_better:
                raise PolicyError(
                    "lora_sweep: the built-in metric is the validation loss (lower is better), but the policy's "
                    "sweep.higher_is_better is true.\n  fix: pass metric=<function(model, val_ids) -> float>, or set "
                    "higher_is_better = false"
                )
            return dataclasses.replace(self.rule, metric="val_loss", higher_is_better=False)
        name = self.rule.metric if self.rule.metric != "val_loss" else getattr(metric, "__name__", "metric")
        direction = self.rule.higher_is_better if higher_is_better is None else higher_is_better
        return dataclasses.replace(self.rule, metric=name, higher_is_better=direction)

    def _config(self, config: Any) -> Any:
        from pytest_lora.model.adapters import as_lora_config

        if isinstance(config, Mapping):
            fields = dict(config)
            fields.setdefault("r", self.rank)
            if "lora_alpha" not in fields:
                alpha = self._session.policy.expected_alpha(fields["r"], bool(fields.get("use_rslora", False)))
                fields["lora_alpha"] = alpha if alpha is not None else 2 * fields["r"]
            config = fields
        lora_config = as_lora_config(config)
        if lora_config.r != self.rank:
            raise AdapterConfigError(
                f"lora_sweep: this item is the r={self.rank} run of the sweep, but the config has r={lora_config.r}.\n"
                "  fix: build the config from lora_sweep.rank, or leave r out of a dict config"
            )
        return lora_config

    def _fraction(self, dataset: Any, seq_len: int, batch_size: int) -> Any:
        """The sweep's share of the training split (at least one batch); validation stays whole for a fair metric.

        The planted data is generated at a sweep's size (from the session's base, once per process), so
        it is used whole.
        """
        from pytest_lora.model import planted, training

        base = self._session.base(self._settings).model
        rank = planted.planted_rank(planted.DEFAULT_DATASET if dataset is None else dataset)
        if rank is not None:
            training.check_seq_len(seq_len, base)
            self._session.manager(self._settings).detach()  # the teacher is the bare base
            return planted.planted_data(base, rank, seq_len=seq_len, seed=self._settings.seed)
        data = training.model_data(base, dataset, seq_len=seq_len, seed=self._settings.seed)
        keep = min(len(data.train), max(batch_size, math.ceil(len(data.train) * self.rule.data_fraction)))
        name = f"{data.name}, first {keep} of {len(data.train)} training sequences"
        labels = None if data.train_labels is None else data.train_labels[:keep]
        return training.TokenData(data.train[:keep], data.val, name, labels, data.val_labels)

    def _policy_dataset(self) -> Any:
        """The policy's `sweep.dataset`, a relative path counting from the policy file's directory."""
        from pytest_lora.model.data import resolve_path

        value = self.rule.dataset
        return None if value is None else resolve_path(value, self._settings.policy)

    def _warm_up(self, config: Any, data: Any, batch_size: int) -> None:
        """A first training run in a process pays one-off costs (kernels, allocator); keep them out of the timing."""
        manager = self._session.manager(self._settings)
        if manager.base in _warm_bases:
            return
        from pytest_lora.model import training

        with manager.attached(config) as model:
            training.train(model, data, steps=_WARMUP_STEPS, batch_size=batch_size, eval_every=_WARMUP_STEPS)
        _warm_bases.add(manager.base)


def _flops(result: Any) -> float | None:
    """Model FLOPs of the run (`flops.step_flops` x tokens trained): the sweep's deterministic time basis.

    None when the model's shape cannot be read (the sweep then compares measured seconds, and says so).
    """
    from pytest_lora.core.flops import step_flops
    from pytest_lora.model.shapes import model_shape

    try:
        per_token = step_flops(model_shape(result.model), result.seq_len).model
    except (AdapterConfigError, AttributeError, TypeError, ValueError):
        return None
    return per_token * result.steps * result.batch_size * result.seq_len


def _planted_fields(data: Any) -> dict[str, Any]:
    """What the report needs of a planted dataset to judge the sweep as a calibration."""
    from pytest_lora.model import planted

    if not isinstance(data, planted.PlantedData):
        return {}
    return {"planted_rank": data.rank, "planted_floor": data.floor, "planted_base_loss": data.base_loss}


def _jsonable(value: Any) -> Any:
    """PEFT's to_dict() holds sets and enums (str subclasses); the report and xdist need plain JSON types."""
    if isinstance(value, enum.Enum):
        return _jsonable(value.value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_jsonable(v) for v in value]
        return sorted(items, key=str) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


@dataclasses.dataclass
class SweepReport:
    """What `pytest_lora_sweep_decided` implementations get besides the decision: the sweep and its files.

    `notes` are shown under the sweep in the terminal summary; an implementation appends its own.
    """

    group: str
    provenance: dict[str, Any]
    paths: list[Path]
    notes: list[str]


def _raised_at(exc: Exception, root: Path) -> str:
    """`RuntimeError: down (conftest.py:12)`: the error and the line that raised it, relative to the rootdir."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return f"{type(exc).__name__}: {exc}"
    path = Path(frames[-1].filename)
    shown = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
    return f"{type(exc).__name__}: {exc} ({shown}:{frames[-1].lineno})"


class SweepRecorder:
    """Controller side: gathers each rank's result from the reports, decides at the end, writes the report."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.points: dict[str, list[dict[str, Any]]] = {}
        self.missing: dict[str, list[str]] = {}  # sweep -> items that failed or recorded nothing
        self.outcomes: list[tuple[str, Any, list[Path], list[str]]] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Results arrive here from this process or, under xdist, from the workers."""
        if report.when != "call":
            return
        properties: dict[str, Any] = dict(report.user_properties)
        item = properties.get(ITEM_PROPERTY)
        if item is None:
            return
        point = properties.get(SWEEP_PROPERTY)
        if point is not None and report.passed:
            self.points.setdefault(item["group"], []).append(point)
        else:
            reason = "failed" if report.failed else ("skipped" if report.skipped else "no lora_sweep.run() result")
            self.missing.setdefault(item["group"], []).append(f"r={item['rank']} ({reason})")

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """Apply the rule to every sweep and write its report (before the terminal summary prints)."""
        if not self.points and not self.missing:
            return
        from pytest_lora.core import sweep

        state = self.config.stash[STATE]
        directory = Path(state.session.settings.sweep_dir or self.config.rootpath / DEFAULT_SWEEP_DIR)
        commit = sweep.git_commit(self.config.rootpath)
        versions = sweep.package_versions()
        for group in sorted({*self.points, *self.missing}):
            records = self.points.get(group, [])
            try:
                decision = sweep.decide(records, state.session.policy.sweep)
            except ValueError as exc:
                self.outcomes.append((group, exc, [], []))
                continue
            first = records[0]
            provenance = {
                "sweep": group,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "base_model": first["base_model"],
                "dataset": first["dataset"],
                "dataset_fingerprint": first["dataset_fingerprint"],
                "policy": state.session.policy.source,
                "ranks_left_out": self.missing.get(group, []),
                "git_commit": commit,
                "versions": versions,
            }
            calibration = _calibration(decision)
            if calibration is not None:
                provenance["calibration"] = {"planted_rank": first["planted_rank"], "passed": calibration[0]}
            paths, notes = write_report(decision, provenance, directory, _file_name(group))
            report = SweepReport(group, provenance, paths, notes)
            try:
                self.config.hook.pytest_lora_sweep_decided(config=self.config, decision=decision, report=report)
            except Exception as exc:  # a tracker's bug or outage: this sweep and the next ones are still shown
                report.notes.append(f"pytest_lora_sweep_decided failed: {_raised_at(exc, self.config.rootpath)}")
                if session.exitstatus == pytest.ExitCode.OK:
                    session.exitstatus = pytest.ExitCode.TESTS_FAILED
            self.outcomes.append((group, decision, report.paths, report.notes))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        """Name the chosen rank of each sweep, with its table and where the report is."""
        if not self.outcomes:
            return
        terminalreporter.section("lora rank sweep")
        for group, decision, paths, notes in self.outcomes:
            terminalreporter.write_line(f"{group}:")
            missing = self.missing.get(group)
            if missing:
                terminalreporter.write_line(f"  left out of the choice: {', '.join(missing)}", red=True)
            if isinstance(decision, Exception):
                terminalreporter.write_line(f"  no rank chosen: {decision}", red=True)
                continue
            for row in decision.rows:
                flops = "" if row.point.flops is None else f", {row.point.flops:.3g} FLOPs"
                terminalreporter.write_line(
                    f"  r={row.point.rank:<4} {decision.rule.metric} {row.point.metric:.4g} "
                    f"({row.quality_text(decision.rule)} of best)"
                    f"  time {row.point.seconds:.3g}s{flops} ({row.time_text(decision.rule)} of {decision.costliest})"
                )
            met = decision.rule_met
            terminalreporter.write_line(f"  {decision.summary()}", green=met, yellow=not met)
            calibration = _calibration(decision)
            if calibration is not None:
                terminalreporter.write_line(f"  {calibration[1]}", green=calibration[0], red=not calibration[0])
            for note in notes:
                terminalreporter.write_line(f"  {note}")
            terminalreporter.write_line(f"  report: {', '.join(str(path) for path in paths)}")


def _calibration(decision: Any) -> tuple[bool, str] | None:
    """On the planted-rank data the right answer is known: did the sweep find it? None for other data."""
    details = decision.rows[0].point.details
    k = details.get("planted_rank")
    if k is None:
        return None
    floor = f"floor {details['planted_floor']:.4g}, base {details['planted_base_loss']:.4g}"
    if decision.chosen == k:
        return True, f"calibration passed: the data plants rank {k} and the sweep chose r={k} ({floor})"
    swept = [row.point.rank for row in decision.rows]
    if k not in swept:
        return False, (
            f"calibration not possible: the data plants rank {k} but the sweep's ranks are "
            f"{', '.join(map(str, swept))} ({floor}).\n    fix: sweep r={k} too, or plant one of the swept ranks "
            f"(dataset='builtin:planted-rank-{swept[len(swept) // 2]}')"
        )
    return False, (
        f"calibration FAILED: the data plants rank {k} but the sweep chose r={decision.chosen} ({floor}); "
        "this sweep's budget cannot tell ranks apart: raise sweep.steps or lr, and check that every rank "
        "has the same alpha / r, before trusting its choice on real data"
    )


def _file_name(group: str) -> str:
    """A file name from a node id: `tests/test_x.py::test_sweep[qv]` -> `tests.test_x.test_sweep_qv`."""
    path, _, name = group.partition("::")
    stem = path.removesuffix(".py").replace("/", ".")
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{stem}.{name}" if name else stem).strip("_")


def write_report(
    decision: SweepDecision, provenance: Mapping[str, Any], directory: str | Path, name: str
) -> tuple[list[Path], list[str]]:
    """Write `<name>.json`, `<name>.md` and `<name>.png` under `directory`; return the paths and any notes."""
    import json

    from pytest_lora.core.sweep import markdown, report_data
    from pytest_lora.integrations.plots import plot

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    title = str(provenance.get("sweep", name))
    json_path, md_path, png_path = (directory / f"{name}{suffix}" for suffix in (".json", ".md", ".png"))
    json_path.write_text(json.dumps(report_data(decision, provenance), indent=2, default=str) + "\n")
    md_path.write_text(markdown(decision, title))
    written, notes = [json_path, md_path], []
    if plot(decision, png_path, title):
        written.append(png_path)
    else:
        notes.append("plots skipped: matplotlib is not installed (pip install 'pytest-lora[plots]')")
    return written, notes
