"""The team's LoRA policy: ranks, trainable share, alpha ratio, targets, dropout, budgets, curve rules.

Read from `[tool.pytest_lora.policy]` of pyproject.toml or from a standalone TOML file (keys at top
level). Pure (stdlib only) so a bad policy stops the session with one message naming the file, the
key, the value and the fix, before any model is loaded. Field checks, unknown keys and nested tables
are driven by the dataclass fields, so a field added here or in `pytest_lora.core.curves` needs no parser change.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, get_type_hints

from pytest_lora.core.curves import OverfitRule, PlateauRule
from pytest_lora.core.defaults import DEFAULT_POLICY_SOURCE
from pytest_lora.core.errors import PolicyError
from pytest_lora.core.recipe import MemoryRecipe
from pytest_lora.core.sessions import SESSIONS, PolicySource
from pytest_lora.core.settings import (
    PYPROJECT_TABLE,
    check_ranks,
    check_value,
    range_problem,
    read_pyproject,
    read_toml,
    reject_unknown,
    show,
    tool_table,
)

POLICY_TABLE = f"{PYPROJECT_TABLE}.policy"
RSLORA_MODES = ("scaling", "alpha", "forbid")
MAX_MEMORY_BUDGET_GB = 2**20  # 1 PiB: far above any accelerator or node, far below what bytes as a float can hold
_RSLORA_TEXT = {
    "scaling": "rsLoRA allowed; then lora_alpha / sqrt(r) must equal the ratio (same adapter scaling)",
    "alpha": "rsLoRA allowed; lora_alpha / r must equal the ratio even then",
    "forbid": "rsLoRA (use_rslora=True) is forbidden",
}


def _check(owner: object, bounds: Mapping[str, tuple[float, float | None, bool, bool]]) -> None:
    """Raise ValueError naming the first field of `owner` outside its (low, high, low_open, high_open)."""
    for name, (low, high, low_open, high_open) in bounds.items():
        value = getattr(owner, name)
        problem = None if value is None else range_problem(value, low, high, low_open=low_open, high_open=high_open)
        if problem:
            raise ValueError(f"{name} = {show(value)} {problem}")


PLANTED_PREFIX = "builtin:planted-rank-"


def planted_rank_of(name: str) -> int | None:
    """The K of `builtin:planted-rank-K` (ASCII digits, K >= 1); None for any other name; ValueError for a bad K.

    One parser for the policy's check at load and the data's generation (`model.planted`).
    """
    if not name.startswith(PLANTED_PREFIX):
        return None
    text = name.removeprefix(PLANTED_PREFIX)
    if not re.fullmatch("[0-9]+", text) or int(text) < 1:
        raise ValueError(f"{name!r}: the planted rank must be an int >= 1")
    return int(text)


@dataclass(frozen=True)
class SweepRule:
    """How `lora_sweep` picks a rank: train each rank briefly, prefer the smallest that is good enough.

    Attributes:
        ranks: ranks to try, default (4, 8, 16).
        metric_fraction: a rank is good enough when its metric reaches this share of the best rank's
            (0 < x <= 1), default 0.95.
        time_fraction: ... and its time is at most this share of the slowest rank's (0 < x <= 1),
            default 0.70.
        steps: training steps per rank (> 0), default 30.
        data_fraction: share of the training data each run uses (0 < x <= 1), default 0.1.
        metric: the compared metric, default "val_loss".
        higher_is_better: False for losses, True for accuracy-like metrics.
        dataset: what each rank trains on, default None (the built-in data): a `.jsonl` / `.json` /
            `.txt` / `.parquet` file or a `save_to_disk` directory, relative to the policy file.
    """

    ranks: tuple[int, ...] = (4, 8, 16)
    metric_fraction: float = 0.95
    time_fraction: float = 0.70
    steps: int = 30
    data_fraction: float = 0.1
    metric: str = "val_loss"
    higher_is_better: bool = False
    dataset: str | None = None

    def __post_init__(self) -> None:
        """Reject impossible values at construction; messages start with the field name."""
        problem = check_ranks(self.ranks)
        if problem:
            raise ValueError(f"ranks = {show(self.ranks)} {problem}")
        fraction = (0, 1, True, False)
        _check(self, {"metric_fraction": fraction, "time_fraction": fraction, "data_fraction": fraction})
        _check(self, {"steps": (1, None, False, False)})
        if not self.metric:
            raise ValueError('metric = "" is empty; name a metric, e.g. "val_loss"')
        if isinstance(self.dataset, str) and self.dataset.startswith("builtin:"):
            try:
                known = planted_rank_of(self.dataset) is not None
            except ValueError:
                known = False
            if not known:
                raise ValueError(
                    f"dataset = {show(self.dataset)} is no built-in dataset; use '{PLANTED_PREFIX}K' "
                    f"(K >= 1, e.g. '{PLANTED_PREFIX}8'), or a data file"
                )


@dataclass(frozen=True)
class Policy:
    """The team's LoRA rules. TOML keys are the field names; `source` is not a key.

    Attributes:
        ranks: allowed LoRA ranks r (each >= 1, no repeats), default (4, 8, 16).
        min_trainable_pct, max_trainable_pct: bounds on the trainable share of ALL parameters, in
            percent, counting 4-bit weights unpacked (0 <= min <= max <= 100), default 0.05 and 1.0.
        alpha_ratio: required lora_alpha / r (> 0), default 2.0.
        alpha_tolerance: relative tolerance on that ratio (>= 0), default 0.0 (exact).
        rslora: how use_rslora=True is judged: "scaling" (default; the adapter scaling
            lora_alpha / sqrt(r) must equal alpha_ratio), "alpha" (lora_alpha / r must still equal it),
            "forbid" (use_rslora violates the policy).
        required_targets, forbidden_targets: module names every adapter must / must not target; they
            may not overlap. Default () for both.
        min_dropout, max_dropout: bounds on lora_dropout (0 <= min <= max < 1), default 0.0 and 0.5.
        memory_budget_gb: peak accelerator memory a training step may use, in GiB (0 < x <= 2**20, i.e.
            1 PiB), default None (no budget).
        base_model: hub id or directory the static config checks count against, default None (the
            session's model).
        resume_rank: rank of the adapter checkpoint training resumes from (>= 1), default None.
        plateau, overfit, sweep: the `[...policy.plateau]`, `[...policy.overfit]` and `[...policy.sweep]`
            subtables (PlateauRule, OverfitRule, SweepRule).
        memory: the `[...policy.memory]` subtable: the training recipe `assert_fits_memory` prices
            (MemoryRecipe: optimizer, adapter dtype, autocast, checkpointing, attention, device).
        source: where the policy came from (file and table), for messages; "<defaults>" when built in.
    """

    ranks: tuple[int, ...] = (4, 8, 16)
    min_trainable_pct: float = 0.05
    max_trainable_pct: float = 1.0
    alpha_ratio: float = 2.0
    alpha_tolerance: float = 0.0
    rslora: str = "scaling"
    required_targets: tuple[str, ...] = ()
    forbidden_targets: tuple[str, ...] = ()
    min_dropout: float = 0.0
    max_dropout: float = 0.5
    memory_budget_gb: float | None = None
    base_model: str | None = None
    resume_rank: int | None = None
    plateau: PlateauRule = field(default_factory=PlateauRule)
    overfit: OverfitRule = field(default_factory=OverfitRule)
    sweep: SweepRule = field(default_factory=SweepRule)
    memory: MemoryRecipe = field(default_factory=MemoryRecipe)
    source: str = DEFAULT_POLICY_SOURCE

    def __post_init__(self) -> None:
        """Reject impossible policies at construction; messages start with the field name."""
        problem = check_ranks(self.ranks)
        if problem:
            raise ValueError(f"ranks = {show(self.ranks)} {problem}")
        percent, dropout = (0, 100, False, False), (0, 1, False, True)
        _check(
            self,
            {
                "min_trainable_pct": percent,
                "max_trainable_pct": percent,
                "alpha_ratio": (0, None, True, False),
                "alpha_tolerance": (0, None, False, False),
                "min_dropout": dropout,
                "max_dropout": dropout,
                "memory_budget_gb": (0, MAX_MEMORY_BUDGET_GB, True, False),
                "resume_rank": (1, None, False, False),
            },
        )
        for low, high in (("min_trainable_pct", "max_trainable_pct"), ("min_dropout", "max_dropout")):
            low_value, high_value = getattr(self, low), getattr(self, high)
            if low_value > high_value:
                raise ValueError(
                    f"{low} = {show(low_value)} is larger than {high} = {show(high_value)}; lower {low} or raise {high}"
                )
        if self.rslora not in RSLORA_MODES:
            raise ValueError(f"rslora = {show(self.rslora)} is not one of {', '.join(RSLORA_MODES)}; use one of those")
        for name in ("required_targets", "forbidden_targets"):
            if "" in getattr(self, name):
                raise ValueError(f'{name} = {show(getattr(self, name))} has an empty name ""; remove it')
        overlap = sorted(set(self.required_targets) & set(self.forbidden_targets))
        if overlap:
            raise ValueError(
                f"required_targets and forbidden_targets both list {show(overlap[0])}; remove it from one of them"
            )
        if self.base_model == "":
            raise ValueError('base_model = "" is empty; remove the key to check against the session model')

    def expected_alpha(self, r: int, use_rslora: bool = False) -> float | None:
        """The lora_alpha this policy asks for at rank `r`; None when rsLoRA is used but forbidden.

        PEFT scales the adapter output by lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA; in
        "scaling" mode the ratio pins that multiplier, so rsLoRA needs alpha_ratio * sqrt(r).
        """
        if use_rslora and self.rslora == "forbid":
            return None
        if use_rslora and self.rslora == "scaling":
            return self.alpha_ratio * math.sqrt(r)
        return self.alpha_ratio * r

    def describe(self) -> list[str]:
        """The policy in human lines, for the pytest report header and the README."""
        tolerance = f" (± {self.alpha_tolerance:.1%})" if self.alpha_tolerance else " (exact)"
        lines = [
            f"policy: {self.source}",
            f"ranks: {', '.join(map(str, self.ranks))}",
            f"trainable parameters: {self.min_trainable_pct}% to {self.max_trainable_pct}% of all "
            "parameters (4-bit weights counted unpacked)",
            f"lora_alpha / r = {self.alpha_ratio}{tolerance}; {_RSLORA_TEXT[self.rslora]}",
            f"lora_dropout: {self.min_dropout} to {self.max_dropout}",
        ]
        if self.required_targets:
            lines.append(f"required target modules: {', '.join(self.required_targets)}")
        if self.forbidden_targets:
            lines.append(f"forbidden target modules: {', '.join(self.forbidden_targets)}")
        if self.memory_budget_gb is not None:
            lines.append(f"memory budget: {self.memory_budget_gb} GB")
        lines.append(f"base model for config checks: {self.base_model or 'the session model'}")
        if self.resume_rank is not None:
            lines.append(f"resume rank: {self.resume_rank}")
        lines += [f"{name}: {_fields_text(getattr(self, name))}" for name in ("plateau", "overfit", "sweep", "memory")]
        return lines


def _fields_text(rule: object) -> str:
    return ", ".join(f"{f.name}={getattr(rule, f.name)!r}" for f in fields(rule))  # type: ignore[arg-type]


def _build(cls: Any, data: object, where: str, prefix: str = "", **extra: object) -> Any:
    """Build dataclass `cls` from one TOML table: unknown keys, types from the field hints (subtables
    recurse), then the class's own checks, every failure a PolicyError naming `where` and the dotted key."""
    names = [f.name for f in fields(cls) if f.name not in extra]
    if not isinstance(data, Mapping):
        what = prefix[:-1] if prefix else "the policy"
        raise PolicyError(
            f"{where} {what} = {show(data)} is not a table; it must be a table of keys: {', '.join(names)}."
        )
    reject_unknown(data, names, where, PolicyError, prefix=prefix)
    hints = get_type_hints(cls)
    values: dict[str, object] = {}
    for name, value in data.items():
        hint = hints[name]
        if is_dataclass(hint):
            values[name] = _build(hint, value, where, f"{prefix}{name}.")
        else:
            values[name] = check_value(value, hint, f"{where} {prefix}{name}", PolicyError)
    try:
        return cls(**values, **extra)
    # ArithmeticError: a rule from another module may compute with a huge TOML int.
    except (ValueError, ArithmeticError) as exc:
        table = f" {prefix[:-1]}:" if prefix else ""
        raise PolicyError(f"{where}{table} {exc}.") from None


def policy_from_mapping(data: Mapping[str, object], source: str) -> Policy:
    """A Policy from an already parsed table; `source` ("file [table]") prefixes every message.

    Any input either gives a Policy or raises PolicyError, so a hand-edited TOML can never crash the run.
    """
    policy: Policy = _build(Policy, data, source, source=source)
    return policy


def policy_from_table(table: Mapping[str, object], path: str | os.PathLike[str]) -> Policy | None:
    """The policy of an already parsed `[tool.pytest_lora]` table (of the pyproject at `path`); None when there
    is no `policy` subtable (a `policy` string is a file path, which the settings resolve)."""
    inline = table.get("policy")
    if not isinstance(inline, Mapping):
        return None
    return policy_from_mapping(inline, f"{os.fspath(path)} [{POLICY_TABLE}]")


def policy_from_pyproject(path: str | os.PathLike[str]) -> Policy | None:
    """The `[tool.pytest_lora.policy]` table of that pyproject.toml as a Policy, None when absent."""
    return policy_from_table(read_pyproject(path, PolicyError), path)


def load_policy(path: str | os.PathLike[str], where: str | None = None) -> Policy:
    """A Policy from a standalone TOML file (keys at top level), or from the `[tool.pytest_lora.policy]`
    table when given a pyproject.toml (any file with a `[tool]` table).

    `where` names the setting that gave the path in messages (`Settings.origin("policy")`)."""
    fix = (
        f"check {where or '--lora-policy, the lora_policy ini key or `policy = ...` in [tool.pytest_lora]'} "
        "(a relative path counts from the directory of the file it is written in, on the command line from the "
        "current directory)"
    )
    data = read_toml(path, PolicyError, "policy file", fix)
    if "tool" not in data:
        return policy_from_mapping(data, os.fspath(path))
    policy = policy_from_table(tool_table(data, path, PolicyError), path)
    if policy is None:
        raise PolicyError(
            f"policy file {os.fspath(path)} has a [tool] table but no [{POLICY_TABLE}] table; add one there, "
            "or point --lora-policy at a standalone policy file"
        )
    return policy


# --- the policy in force -----------------------------------------------------------------------------

# `use_policy`'s policy, in this thread (context) only, with the session it was set in (None: outside any): a
# ContextVar, so nested blocks restore exactly; the session, so an in-process run inside the block (pytester)
# checks against its own session's policy, not the caller's block.
_ACTIVE_POLICY: ContextVar[tuple[Policy, PolicySource | None]] = ContextVar("pytest_lora_active_policy")
_DEFAULT_POLICY = Policy()


def _innermost() -> PolicySource | None:
    return SESSIONS[-1] if SESSIONS else None


def active_policy() -> Policy:
    """The policy the assertions default to: `use_policy`'s, else the pytest session's (in any thread, from
    module import and collection to the session's end; `core.sessions`), else the built-in defaults."""
    chosen = _ACTIVE_POLICY.get(None)
    session = _innermost()
    if chosen is not None and chosen[1] is session:
        return chosen[0]
    return session.policy if session is not None else _DEFAULT_POLICY


@contextmanager
def use_policy(policy: Policy) -> Iterator[Policy]:
    """Temporarily check against another policy: `with use_policy(strict): assert_param_budget(m)`.

    In this thread (context) only: a thread started inside the block sees the session's policy."""
    token = _ACTIVE_POLICY.set((policy, _innermost()))
    try:
        yield policy
    finally:
        _ACTIVE_POLICY.reset(token)
