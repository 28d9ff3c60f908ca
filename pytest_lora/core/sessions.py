"""The pytest sessions in progress, innermost last (pytester's in-process runs nest): where `active_policy`
finds the session's policy, from module import and collection to the session's end, in any thread.

Apart from `core.policy` so that the plugin can push a session at configure without loading the policy code: a
session gives its policy through `policy`, built when first asked (`BaseModelPool.policy`), so a run that never
asks (`--collect-only` of a project without LoRA tests) builds none."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pytest_lora.core.policy import Policy


class PolicySource(Protocol):
    """What a session is here: something that gives its policy (the plugin's `BaseModelPool`)."""

    @property
    def policy(self) -> Policy: ...


SESSIONS: list[PolicySource] = []


def end_session(session: PolicySource) -> None:
    """Take `session` off the stack, by identity (two sessions with equal settings are still two)."""
    for index in range(len(SESSIONS) - 1, -1, -1):
        if SESSIONS[index] is session:
            del SESSIONS[index]
            return
