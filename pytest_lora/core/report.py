"""What `lora_benchmark` measured, as a rank table in the terminal and as JSON (`--lora-report`).

A `RunRecord` is flat and JSON-friendly: the same dict is the benchmark's `extra_info`, travels from
an xdist worker to the controller in `report.user_properties`, and lands in the JSON report. Nothing
here imports pytest or torch: the table and the file are built from records alone.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from typing import Any

from pytest_lora.core.memory import format_bytes

RUN_PROPERTY = "pytest_lora_run"  # the user_properties key a benchmark's record travels under
REPORT_VERSION = 1


@dataclass(frozen=True)
class RunRecord:
    """One `lora_benchmark` run: the config, its size, its speed, its memory, its FLOPs."""

    nodeid: str
    label: str  # "r=8 alpha=16 q_proj,v_proj": the benchmark group
    model: str
    device: str
    device_name: str
    r: int
    alpha: float
    targets: tuple[str, ...]
    trainable_params: int
    total_params: int
    trainable_pct: float
    batch_size: int
    seq_len: int
    steps_per_round: int
    rounds: int  # timed rounds behind the numbers (1 when pytest-benchmark is disabled)
    tokens_per_second: float
    samples_per_second: float
    step_time_s: float
    peak_memory_bytes: int
    peak_memory_scope: str  # "cuda max_memory_allocated", "process peak (run)" or "process peak (lifetime)"
    estimated_memory_bytes: int
    flops_per_token: float  # model FLOPs (the MFU numerator)
    hardware_flops_per_token: float  # recompute included
    achieved_flops_per_second: float
    peak_flops_per_second: float | None
    mfu: float | None
    mfu_note: str  # where the peak came from, or why there is no MFU
    benchmark_disabled: bool

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["targets"] = list(self.targets)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunRecord:
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        values["targets"] = tuple(values.get("targets", ()))
        return cls(**values)


def records_from_properties(properties: Iterable[Sequence[Any]]) -> list[RunRecord]:
    """The records in a test report's `user_properties` (tuples in process, lists after xdist)."""
    return [RunRecord.from_dict(value) for name, value in properties if name == RUN_PROPERTY]


def _group_key(record: RunRecord) -> tuple[str, str, int, int]:
    return record.model, record.device, record.batch_size, record.seq_len


def in_config_order(records: Iterable[RunRecord]) -> list[RunRecord]:
    """The records by setting, then config (r, alpha, targets): the report must not depend on the order the
    tests ran in (pytest-randomly, xdist scheduling), only on what was measured."""
    return sorted(
        records,
        key=lambda record: (*_group_key(record), record.r, record.alpha, record.targets, record.label, record.nodeid),
    )


def rank_table(records: Sequence[RunRecord]) -> list[str]:
    """The rank table: per comparable setting (model, device, batch, seq), one row per config by rank.

    "time" is the step time relative to the fastest config of the same setting: the guide's production
    rule picks the rank with 95% of the best metric at under 70% of the longest training time.
    """
    groups: dict[tuple[str, str, int, int], list[RunRecord]] = {}
    for record in in_config_order(records):
        groups.setdefault(_group_key(record), []).append(record)
    header = (
        f"  {'config':<34}{'trainable':>12}{'%':>9}{'tokens/s':>12}{'time':>8}{'peak mem':>12}{'est. mem':>12}"
        f"{'MFU':>8}"
    )
    lines = []
    for (model, device, batch, seq), rows in groups.items():
        fastest = min(record.step_time_s for record in rows)
        scopes = sorted({record.peak_memory_scope for record in rows})
        disabled = any(record.benchmark_disabled for record in rows)
        note = ", one untimed round each (pytest-benchmark disabled)" if disabled else ""
        lines.append(f"LoRA rank table: {model} on {device}, batch {batch} x seq {seq}{note}")
        lines.append(header)
        for record in rows:
            mfu = f"{record.mfu:.1%}" if record.mfu is not None else "n/a"
            relative = record.step_time_s / fastest if fastest > 0 else float("nan")
            lines.append(
                f"  {record.label:<34}{record.trainable_params:>12,}{record.trainable_pct:>8.3f}%"
                f"{record.tokens_per_second:>12,.0f}{relative:>7.2f}x{format_bytes(record.peak_memory_bytes):>12}"
                f"{format_bytes(record.estimated_memory_bytes):>12}{mfu:>8}"
            )
        lines.append(f"  peak mem: {', '.join(scopes)}; MFU: {rows[0].mfu_note}")
    return lines


def write_rank_table(terminalreporter: Any, records: Sequence[RunRecord]) -> None:
    """Write the rank table into the terminal summary (call it inside the `lora` section)."""
    for line in rank_table(records):
        terminalreporter.write_line(line)


def report_document(records: Sequence[RunRecord], sections: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The `--lora-report` JSON document: the runs, plus any other sections the plugin adds."""
    return {
        "version": REPORT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(),
        "runs": [record.to_dict() for record in in_config_order(records)],
        **(sections or {}),
    }


def write_json(
    path: str | os.PathLike[str], records: Sequence[RunRecord], sections: Mapping[str, Any] | None = None
) -> None:
    """Write the JSON report atomically (a temporary file renamed over `path`), creating its directory."""
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".lora-report-", suffix=".json", dir=directory)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(report_document(records, sections), stream, indent=2, allow_nan=False)
            stream.write("\n")
        os.replace(temporary, target)
    except BaseException:
        os.unlink(temporary)
        raise
