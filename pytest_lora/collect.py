"""Adapter configs as test items: each file named in `[tool.pytest_lora] configs` or by `--lora-check`.

One item per file (an `adapter_config.json`, an adapter directory, or a TOML file of LoraConfig
fields), marked `lora`, its node id the file's path. The item checks the file against the policy
on the policy's base model, built on the meta device (`config_check`): a config is judged before
a GPU is booked for it. The items join the session's own collection, so `-k`, `-m`, xdist and the
"collected N items" line treat them like any test. The `configs` globs apply to runs without path
arguments (as testpaths do); `--lora-check` paths always.
"""

from __future__ import annotations

import argparse
import glob
import warnings
from pathlib import Path
from typing import Any

import pytest

from pytest_lora.assertions import LoraPolicyWarning
from pytest_lora.errors import AdapterConfigError
from pytest_lora.models import resolve_source
from pytest_lora.policy import Policy
from pytest_lora.settings import PYPROJECT_TABLE, Settings
from pytest_lora.state import MARKER, STATE
from pytest_lora.zoo import zoo_entry

CHECK_OPTION = "--lora-check"
RESUME_OPTION = "--lora-resume-rank"


def _rank(text: str) -> int:
    try:
        rank = int(text)
    except ValueError:
        rank = 0
    if rank < 1:
        raise argparse.ArgumentTypeError(f"{RESUME_OPTION} = {text!r} is not a rank; use an integer >= 1, e.g. 8")
    return rank


def pytest_addoption(parser: pytest.Parser) -> None:
    """`--lora-check PATH` (repeatable) and `--lora-resume-rank N`, in the `lora` group."""
    group = parser.getgroup("lora", "LoRA rank policy (pytest-lora)")
    group.addoption(
        CHECK_OPTION,
        action="append",
        default=[],
        dest="lora_check",
        metavar="PATH",
        help="Check an adapter_config.json, an adapter directory or a TOML file of LoraConfig fields against the "
        f"policy, without loading weights; repeat for several (default: none; see also configs in [{PYPROJECT_TABLE}])",
    )
    group.addoption(
        RESUME_OPTION,
        type=_rank,
        default=None,
        dest="lora_resume_rank",
        metavar="N",
        help="Rank a checked adapter is about to be resumed at; a saved adapter of another rank fails "
        "(default: resume_rank of the policy, else no check)",
    )


class LoraConfigItem(pytest.Item):
    """One adapter file checked against the policy; `target` is None for a glob that matched nothing."""

    def __init__(self, *, target: Path | None, origin: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.target = target
        self.origin = origin
        self.add_marker(MARKER)

    def runtest(self) -> None:
        from pytest_lora.config_check import check_adapter

        if self.target is None:
            raise AdapterConfigError(
                f"{self.origin}: {self.name!r} matches no file.\n"
                "  fix: correct the pattern (relative to the pyproject.toml directory), or remove it"
            )
        session = self.config.stash[STATE].session
        base, label = check_base(session.policy, session.settings)
        resume, source = self.config.getoption("lora_resume_rank"), RESUME_OPTION
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
    source = resolve_source(settings.model)
    if source.kind == "builtin":
        return zoo_entry(source.location)[1].config, source.label
    return source.location, source.label


def _targets(config: pytest.Config) -> dict[str, tuple[Path | None, str]]:
    """Node name -> (file, where it was named), in order: `configs` globs first, then `--lora-check` paths."""
    state = config.stash[STATE]
    found: dict[str, tuple[Path | None, str]] = {}
    seen: set[Path] = set()

    def add(path: Path | None, name: str, origin: str) -> None:
        if path is not None:
            path = path.resolve()
            if path in seen:
                return
            seen.add(path)
            name = _display(path, config.rootpath)
        found.setdefault(name, (path, origin))

    if config.args_source is not pytest.Config.ArgsSource.ARGS:
        root = Path(state.pyproject).parent if state.pyproject else config.rootpath
        origin = f"{state.pyproject or 'pyproject.toml'} [{PYPROJECT_TABLE}] configs"
        for pattern in state.session.settings.configs:
            matches = sorted(glob.glob(str(root / pattern), recursive=True))
            for match in matches:
                add(Path(match), match, origin)
            if not matches:
                add(None, pattern, origin)
    for text in config.getoption("lora_check"):
        add(config.invocation_params.dir / text, text, CHECK_OPTION)
    return found


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
        for name, (path, origin) in _targets(collector.config).items():
            report.result.append(
                LoraConfigItem.from_parent(
                    collector,
                    name=name,
                    nodeid=name,
                    path=path or collector.config.rootpath,
                    target=path,
                    origin=origin,
                )
            )
    return report
