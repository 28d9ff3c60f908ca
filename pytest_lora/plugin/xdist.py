"""pytest-xdist, in one place: which process is a worker, and which the controller of a distributed run.

Results travel from the workers to the controller in the test reports' `user_properties`, so what is
gathered once per session (the JSON report, the rank sweep's decision) is done by the controller or a
serial run; a worker only runs its tests. pytest-lora sends nothing to the workers when they start, so it
needs no `pytest_configure_node` hook. What the model side needs of xdist (which worker, of how many) is
read here, from `workerinput`, and handed to the base-model pool.
"""

from __future__ import annotations

import pytest

from pytest_lora.core.settings import Worker


def is_worker(config: pytest.Config) -> bool:
    """Whether this process is a pytest-xdist worker (xdist sets `workerinput` on a worker's config)."""
    return hasattr(config, "workerinput")


def distributes(config: pytest.Config) -> bool:
    """Whether this process is the controller of a distributed run (`-n 4`): it runs and collects no test,
    so what gathers results over the session starts at configure. Read as xdist decides it (`--dist`, `--tx`,
    set from `-n` before configure); `--collect-only` distributes nothing."""
    option = config.option
    dist, tx = getattr(option, "dist", "no"), getattr(option, "tx", None)
    return not is_worker(config) and dist != "no" and bool(tx) and not option.collectonly


def worker(config: pytest.Config) -> Worker | None:
    """This worker's index and the worker count (`gw3` of 4 -> Worker(3, 4)); None in a serial run."""
    if not is_worker(config):
        return None
    info = config.workerinput  # type: ignore[attr-defined]  # set by pytest-xdist on a worker's config
    digits = str(info.get("workerid", "gw0")).removeprefix("gw")
    return Worker(int(digits) if digits.isdigit() else 0, int(info.get("workercount", 1)))
