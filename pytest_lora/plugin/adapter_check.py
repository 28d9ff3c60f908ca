"""Adapter configs as test items: each file named in `[tool.pytest_lora] configs` or by `--lora-check`.

One item per file (an `adapter_config.json`, an adapter directory, or a TOML file of LoraConfig
fields), marked `lora`, its node id the file's path. The item checks the file against the policy
on the policy's base model, built on the meta device (`config_check`): a config is judged before
a GPU is booked for it. The items join the session's own collection, so `-k`, `-m`, xdist and the
"collected N items" line treat them like any test. The `configs` globs apply to runs without path
arguments (as testpaths do) and stay inside the project (`pytest_lora.core.globs` walks them, bounded and
without following directory symlinks in `**`); `--lora-check` paths always apply, wherever they are.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_lora.core.errors import AdapterConfigError, LoraPolicyWarning
from pytest_lora.core.settings import Settings
from pytest_lora.plugin.state import MARKER, STATE

if TYPE_CHECKING:  # loaded when a config file is checked, not with the plugin
    from pytest_lora.core.policy import Policy

CHECK_OPTION = "--lora-check"
RESUME_OPTION = "--lora-resume-rank"


class LoraConfigItem(pytest.Item):
    """One adapter file checked against the policy; for a glob that found nothing usable, `problem` says why."""

    def __init__(self, *, target: Path | None, origin: str, problem: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.target = target
        self.origin = origin
        self.problem = problem
        self.add_marker(MARKER)

    def runtest(self) -> None:
        from pytest_lora.model.adapter_check import check_adapter

        if self.problem is not None or self.target is None:
            raise AdapterConfigError(self.problem)
        session = self.config.stash[STATE].session
        base, label = check_base(session.policy, session.settings)
        resume, source = session.settings.resume_rank, session.settings.origin("resume_rank")
        if resume is None and session.policy.resume_rank is not None:
            resume, source = session.policy.resume_rank, f"resume_rank of {session.policy.source}"
        result = check_adapter(
            self.target,
            session.policy,
            base,
            base_label=label,
            resume_rank=resume,
            resume_source=source,
            trust_remote_code=session.settings.trust_remote_code,
        )
        if result.count is not None:
            self.user_properties.append(
                ("lora_params", {"trainable": result.count.trainable, "total": result.count.total, "base": label})
            )
        for note in result.notes:
            warnings.warn(LoraPolicyWarning(note), stacklevel=1)

    def reportinfo(self) -> tuple[Path, None, str]:
        return self.path, None, f"LoRA config check: {self.name}"


def check_base(policy: Policy, settings: Settings) -> tuple[Any, str]:
    """The base model configs are checked against, and its label: the policy's `base_model`, else the session's.

    A relative `base_model` counts from the policy file's directory when that directory exists there
    (else it is a hub id). The built-in model needs no file: its config is a constant.
    """
    if policy.base_model is not None:
        if settings.policy:
            candidate = Path(settings.policy).parent / policy.base_model
            if candidate.is_dir():
                return str(candidate), policy.base_model
        return policy.base_model, policy.base_model
    from pytest_lora.model.loading import resolve_source
    from pytest_lora.model.zoo import zoo_entry

    source = resolve_source(settings.model, settings.describe("model"))
    if source.kind == "builtin":
        return zoo_entry(source.location)[1].config, source.label
    return source.location, source.label


Target = tuple[Path | None, str, str | None]  # (file, where it was named, why a glob found nothing usable)


def _targets(config: pytest.Config) -> dict[str, Target]:
    """Node name -> target, in order: `configs` globs first, then `--lora-check` paths."""
    state = config.stash[STATE]
    found: dict[str, Target] = {}
    seen: set[Path] = set()

    def add(path: Path | None, name: str, origin: str, problem: str | None = None) -> None:
        if path is not None:
            path = path.resolve()
            if path in seen:
                return
            seen.add(path)
            name = _display(path, config.rootpath)
        found.setdefault(name, (path, origin, problem))

    settings = state.session.settings
    if config.args_source is not pytest.Config.ArgsSource.ARGS:
        root = Path(state.pyproject).parent if state.pyproject else config.rootpath
        origin = settings.origin("configs")  # where the patterns were written: pyproject, ini or command line
        for pattern in settings.configs:
            matches, problem = _glob(root, pattern, origin)
            for match in matches:
                add(match, str(match), origin)
            if problem:
                add(None, pattern, origin, problem)
    for text in settings.check:  # relative: to the pyproject (resolved in the settings) or the invocation dir
        add(config.invocation_params.dir / text, text, settings.origin("check"))
    return found


def _glob(root: Path, pattern: str, origin: str) -> tuple[list[Path], str | None]:
    """The files a `configs` pattern names inside `root`, and what is wrong with it (None when nothing).

    The pattern counts from `root` (the pyproject.toml directory, the rootdir) and may not leave it,
    not even through a symlink: a glob in a shared pyproject.toml must not collect files from
    elsewhere on the machine. A file outside is checked when named explicitly with --lora-check.
    """
    from pytest_lora.core.globs import find, literal_prefix

    where = f"{origin}: {pattern!r}"
    explicit = f"or name a file outside the project explicitly with {CHECK_OPTION} PATH"
    base = root.resolve()
    prefix = Path(os.path.normpath(root.joinpath(*literal_prefix(pattern))))
    if not _inside(prefix.resolve(), base):
        return [], (
            f"{where} reaches outside the project directory {root} (it starts at {prefix}).\n"
            f"  configs patterns count from {root} and must stay inside it.\n  fix: correct the pattern, {explicit}"
        )
    result = find(root, pattern)
    inside = [path for path in result.matches if _inside(path.resolve(), base)]
    outside = [path for path in result.matches if path not in inside]
    problems = []
    if outside:
        problems.append(
            f"{where} matches {len(outside)} path(s) outside the project directory {root}, e.g. {outside[0]} -> "
            f"{outside[0].resolve()} (through a symlink or '..'); they are not checked.\n"
            f"  fix: correct the pattern, {explicit}"
        )
    if result.stopped_at is not None:
        problems.append(
            f"{where}: the search stopped after reading {result.stopped_at:,} directory entries, so its matches are "
            "incomplete.\n  fix: narrow the pattern, e.g. adapters/**/adapter_config.json instead of **/*.json"
        )
    if not result.matches and result.stopped_at is None:
        problems.append(f"{where} matches no file.\n  fix: correct the pattern (relative to {root}), or remove it")
    return inside, "\n".join(problems) or None


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def _display(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Any:
    """Add one item per adapter file to the session's own collection (so they are counted and selectable)."""
    report = yield
    if isinstance(collector, pytest.Session) and report.passed and STATE in collector.config.stash:
        for name, (path, origin, problem) in _targets(collector.config).items():
            report.result.append(
                LoraConfigItem.from_parent(
                    collector,
                    name=name,
                    nodeid=name,
                    path=path or collector.config.rootpath,
                    target=path,
                    origin=origin,
                    problem=problem,
                )
            )
    return report
