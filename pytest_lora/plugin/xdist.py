"""pytest-xdist, in one place: which process is a worker.

Results travel from the workers to the controller in the test reports' `user_properties`, so what is
gathered once per session (the JSON report, the rank sweep's decision) is done by the controller or a
serial run; a worker only runs its tests. pytest-lora sends nothing to the workers when they start, so it
needs no `pytest_configure_node` hook.
"""

from __future__ import annotations

import pytest


def is_worker(config: pytest.Config) -> bool:
    """Whether this process is a pytest-xdist worker (xdist sets `workerinput` on a worker's config)."""
    return hasattr(config, "workerinput")
