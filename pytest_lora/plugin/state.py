"""The plugin's session state in `config.stash`, and the `lora` markers merged into a test's settings, once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from pytest_lora.core.errors import SettingsError
from pytest_lora.core.settings import Settings, show

if TYPE_CHECKING:
    from pytest_lora.model.base_pool import BaseModelPool

MARKER = "lora"


@dataclass(eq=False)  # one per session, never compared by value
class LoraState:
    """What `pytest_configure` resolved: the session registry (settings, policy) and the pyproject used."""

    session: BaseModelPool
    pyproject: str | None
    changed_bases: list[str] | None = None  # filled at session end under --lora-verify-base


STATE = pytest.StashKey[LoraState]()
SETTINGS = pytest.StashKey[Settings]()  # on a test node: the settings in force for it


def marker_overrides(node: pytest.Item | Any) -> dict[str, Any]:
    """Keyword arguments of every `lora` marker on the test, its class and module; the closest wins.

    A positional argument is an error: `@pytest.mark.lora("./m")` would otherwise run on the default model.
    """
    merged: dict[str, Any] = {}
    for mark in reversed(list(node.iter_markers(MARKER))):
        if mark.args:
            raise SettingsError(
                f"@pytest.mark.lora on {node.nodeid}: takes keyword arguments only, got {show(mark.args[0])}; "
                "name the setting, e.g. @pytest.mark.lora(model='builtin:tiny-qwen2', seed=1)."
            )
        merged.update(mark.kwargs)
    return merged


def node_settings(node: pytest.Item | Any) -> Settings:
    """The settings in force for a test (or a function being parametrized): the session's with its `lora`
    markers' keywords applied. Merged once per node and kept in its stash; a bad keyword raises SettingsError."""
    settings = node.stash.get(SETTINGS, None)
    if settings is None:
        pool = node.config.stash[STATE].session
        overrides = marker_overrides(node)
        settings = pool.settings.with_overrides(overrides, node.nodeid) if overrides else pool.settings
        node.stash[SETTINGS] = settings
    return settings
