"""`--lora-* VALUE` written with a space must not move pytest's rootdir and config file.

pytest finds its rootdir and config file before plugins register their options, so in
`pytest --lora-model /models/qwen2` it reads `/models/qwen2` as a test path. A path outside the
project then moves the rootdir there, no config file is read, and the team policy in pyproject.toml
silently becomes the defaults: a gate that passes against the wrong rules. The `=` form is immune.
pytest-lora cannot register its options earlier, so the session stops when a `--lora-*` value did
change the outcome, and says to write `--opt=VALUE`.
"""

from __future__ import annotations

import inspect
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

_PREFIX = "--lora-"


def spaced_values(args: Sequence[str]) -> list[tuple[str, str]]:
    """(flag, value) for every `--lora-* VALUE` written with a space, up to a `--` end of options.

    A flag without a value (`--lora-verify-base tests/`) yields its positional neighbour too; that is
    harmless, since the comparison in `check_rootdir` then finds the same rootdir with and without it.
    """
    pairs = []
    for index, token in enumerate(args[:-1]):
        if token == "--":
            break
        value = args[index + 1]
        if token.startswith(_PREFIX) and "=" not in token and not value.startswith("-"):
            pairs.append((token, value))
    return pairs


def _exists(path: Path) -> bool:
    """As pytest's own rootdir search sees it: a name too long or otherwise unusable is no path."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _setup(config: pytest.Config, args: list[str]) -> tuple[Path, Path | None]:
    """pytest's own rootdir and config file search for these path arguments (its signature varies by version)."""
    from _pytest.config.findpaths import determine_setup

    candidates: dict[str, Any] = {
        "inifile": config.option.inifilename,
        "override_ini": None,
        "args": args,
        "rootdir_cmd_arg": config.option.rootdir or None,
        "invocation_dir": config.invocation_params.dir,
        "config": config,
    }
    accepted = inspect.signature(determine_setup).parameters
    rootdir, inipath, *_ = determine_setup(**{k: v for k, v in candidates.items() if k in accepted})
    return Path(rootdir), Path(inipath) if inipath else None


def check_rootdir(config: pytest.Config) -> None:
    """Raise UsageError when a space-separated `--lora-*` value changed the rootdir or the config file.

    The values are those of the command line and of PYTEST_ADDOPTS (both are read before the
    options are known); the rootdir search is run again without them and the results compared.
    """
    tokens = [*shlex.split(os.environ.get("PYTEST_ADDOPTS", "")), *map(str, config.invocation_params.args)]
    here = config.invocation_params.dir
    spaced = [(flag, value) for flag, value in spaced_values(tokens) if _exists(here / value)]
    if not spaced:
        return
    positional = [str(here / arg) for arg in config.option.file_or_dir or ()]
    without = _setup(config, positional)
    with_values = _setup(config, positional + [str(here / value) for _, value in spaced])
    if with_values == without:
        return
    written = ", ".join(f"`{flag} {value}`" for flag, value in spaced)
    fixed = " ".join(f"{flag}={shlex.quote(value)}" for flag, value in spaced)
    (rootdir, inifile), (project, project_ini) = with_values, without
    raise pytest.UsageError(
        f"pytest-lora: {written} moved pytest's rootdir to {rootdir} (else {project}) and its config file to "
        f"{inifile or 'none'} (else {project_ini or 'none'}).\n"
        "  pytest looks for them before plugin options are known, so it took the value for a test path; the "
        "[tool.pytest_lora] settings and the team policy would silently become the defaults.\n"
        f"  fix: write {fixed}"
    )
