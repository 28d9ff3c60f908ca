"""The plugin's session state in `config.stash`, and marker keyword merging."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from pytest_lora.session import LoraSession

MARKER = "lora"


@dataclass
class LoraState:
    """What `pytest_configure` resolved: the session registry (settings, policy) and the pyproject used."""

    session: LoraSession
    pyproject: str | None
    changed_bases: list[str] | None = None  # filled at session end under --lora-verify-base


STATE = pytest.StashKey[LoraState]()


def marker_overrides(node: pytest.Item | Any) -> dict[str, Any]:
    """Keyword arguments of every `lora` marker on the test, its class and module; the closest wins."""
    merged: dict[str, Any] = {}
    for mark in reversed(list(node.iter_markers(MARKER))):
        merged.update(mark.kwargs)
    return merged
