"""The pool of base models of a session: each loaded once, with its adapter manager and what ran.

It knows nothing of pytest; the plugin keeps one in `config.stash` and the fixtures ask it
for a base model. A base is keyed by everything that changes what is loaded (model, device,
quantization, trust), so a marker that asks for another model loads that one once too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from pytest_lora.core.defaults import DEFAULT_POLICY_SOURCE
from pytest_lora.core.errors import LoraError
from pytest_lora.core.settings import Settings, Worker

if TYPE_CHECKING:  # the model side loads with the first base, the policy code with the first use of a policy
    from pytest_lora.core.policy import Policy
    from pytest_lora.model.adapters import AdapterManager
    from pytest_lora.model.loading import LoadedBase

_MODEL_KEYS = (
    "model",
    "task",
    "device",
    "load_in_4bit",
    "quant_type",
    "compute_dtype",
    "double_quant",
    "trust_remote_code",
    "allow_unsafe_pickle",
    "cache_dir",
)


def model_key(settings: Settings) -> tuple[Any, ...]:
    """What identifies a loaded base: two settings with the same key share one model."""
    return tuple(getattr(settings, name) for name in _MODEL_KEYS)


@dataclass(eq=False)  # a pool is itself: two sessions with equal settings are two pools
class BaseModelPool:
    """Base models by key, loaded lazily on first use; load counts and digests for the checks."""

    settings: Settings
    team_policy: Policy | None = None  # None: no policy configured, the built-in defaults apply
    bases: dict[tuple[Any, ...], LoadedBase] = field(default_factory=dict)
    managers: dict[tuple[Any, ...], AdapterManager] = field(default_factory=dict)
    loads: Counter[tuple[Any, ...]] = field(default_factory=Counter)
    digests: dict[tuple[Any, ...], str] = field(default_factory=dict)
    failures: dict[tuple[Any, ...], LoraError] = field(default_factory=dict)
    worker: Worker | None = None  # under pytest-xdist: which GPU and how many CPU threads this process takes
    # One line per long step (a load, a sweep rank, a benchmark round): the plugin prints it in the terminal.
    progress: Callable[[str], None] = lambda text: None
    threads_before: int | None = None  # torch's thread count before the first load set the session's (`close`)

    @cached_property
    def policy(self) -> Policy:
        """The session's policy: the team's, else the built-in defaults, built on first use, so a run that never
        asks (`--collect-only` in a project without LoRA tests) does not import the policy code."""
        if self.team_policy is not None:
            return self.team_policy
        from pytest_lora.core.policy import Policy

        return Policy()

    @property
    def policy_source(self) -> str:
        """Where the session's policy comes from, without building the defaults."""
        return self.team_policy.source if self.team_policy is not None else DEFAULT_POLICY_SOURCE

    def base(self, settings: Settings | None = None) -> LoadedBase:
        """The base model for these settings, loaded on first use only."""
        from pytest_lora.model.adapters import AdapterManager, weights_digest
        from pytest_lora.model.loading import load_base_model

        settings = settings or self.settings
        key = model_key(settings)
        if key in self.failures:
            raise self.failures[key]
        if key not in self.bases:
            if self.threads_before is None:
                import torch

                self.threads_before = torch.get_num_threads()
            label = settings.model or "builtin:tiny-llama"
            self.progress(f"loading base model {label} ({settings.quantization_label()})")
            try:
                loaded = load_base_model(settings, self.worker)
            except LoraError as exc:  # every later test gets the same message, without a second attempt
                self.failures[key] = exc
                raise
            self.loads[key] += 1
            self.bases[key] = loaded
            self.managers[key] = AdapterManager(
                loaded.model,
                seed=settings.seed,
                reload=lambda: load_base_model(settings, self.worker).model,
                verify_weights=self.settings.verify_base,
            )
            if self.settings.verify_base:
                self.digests[key] = weights_digest(loaded.model)
        return self.bases[key]

    def close(self) -> None:
        """At the session's end: torch's thread count back as it was before the first base loaded."""
        if self.threads_before is not None:
            import torch

            torch.set_num_threads(self.threads_before)

    def manager(self, settings: Settings | None = None) -> AdapterManager:
        """The adapter manager of the base for these settings (loading it if needed)."""
        settings = settings or self.settings
        self.base(settings)
        return self.managers[model_key(settings)]

    def check_clean(self, when: str) -> None:
        """Every base is exactly as loaded, no adapter attached; raises (after repairing) when one is not."""
        for manager in self.managers.values():
            manager.assert_clean(when)

    def changed_bases(self) -> list[str]:
        """Labels of bases whose weights differ from the digest taken when they were loaded."""
        from pytest_lora.model.adapters import weights_digest

        return [
            self.bases[key].source.label
            for key, digest in self.digests.items()
            if weights_digest(self.bases[key].model) != digest
        ]
