"""The ``lora-ci`` Hypothesis settings profile, registered by the entry point and by `strategies` on import.

Its own module so that the entry point (`integrations.hypothesis`) and the strategies share it without
importing each other.
"""

from __future__ import annotations

CI_PROFILE = "lora-ci"
"""Name of the settings profile for CI runs: ``pytest --hypothesis-profile=lora-ci``."""

CI_MAX_EXAMPLES = 25
"""Examples per test under ``lora-ci``: each may attach an adapter to the 4-bit base, so keep it bounded."""


def register_profile() -> None:
    """Register ``lora-ci``: reproducible (derandomized, no example database), no deadline (a loaded CI
    runner is slow), bounded."""
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        CI_PROFILE,
        derandomize=True,
        database=None,
        deadline=None,
        max_examples=CI_MAX_EXAMPLES,
        suppress_health_check=[HealthCheck.too_slow],
        print_blob=True,
    )
