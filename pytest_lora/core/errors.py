"""Typed errors of pytest-lora.

Usage errors (bad settings, bad policy) stop the session before any test runs; assertion
failures fail one test with a diagnosis. Both carry the place (file, key, value) and the fix.
"""

from __future__ import annotations


class LoraError(Exception):
    """Base class of every error pytest-lora raises on purpose."""


class SettingsError(LoraError, ValueError):
    """A `--lora-*` option, an ini value or a `[tool.pytest_lora]` key is invalid."""


class PolicyError(SettingsError):
    """The team policy (TOML) is malformed, has an unknown key, a wrong type or an impossible range."""


class ModelLoadError(LoraError):
    """The base model cannot be loaded (missing path, no config.json, unknown architecture, offline)."""


class AdapterConfigError(LoraError, ValueError):
    """A LoraConfig is invalid for this model (values out of range, targets that match nothing)."""


class LoraAssertionError(AssertionError):
    """A LoRA check failed; the message is a diagnosis: the numbers, what they mean, the fix."""


class TrainingError(LoraAssertionError):
    """The short training run went wrong: non-finite loss, dead gradients, bad data."""


class BaseModelModifiedError(LoraAssertionError):
    """The shared base model is no longer as loaded (stacked adapters, changed weights)."""


class CurveError(LoraError, ValueError):
    """A loss curve cannot be judged (too few points, wrong type): never a silent pass."""


class LoraPolicyWarning(UserWarning):
    """A config is legal but a policy heuristic may not apply to it (e.g. a custom init)."""
