"""The examples are the product's main job: `pytest -m lora examples/` must pass, serially and under xdist."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.lora


def _run_examples(*extra: str) -> dict[str, str]:
    """Run the example project as a user would; return {nodeid: outcome} from the -rA summary."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "lora", "examples/", "-p", "no:cacheprovider", "-rA", *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    outcomes = dict(
        (nodeid, outcome)
        for outcome, nodeid in re.findall(r"^(PASSED|XFAIL|SKIPPED|FAILED|ERROR) (\S+)", result.stdout, flags=re.M)
    )
    assert outcomes, result.stdout[-3000:]
    return outcomes


def test_examples_pass_serially_and_with_two_workers() -> None:
    serial = _run_examples()
    assert "FAILED" not in serial.values() and "ERROR" not in serial.values()
    assert serial["examples/test_rank_policy.py::test_alpha_gotcha"] == "XFAIL"
    assert serial["examples/test_rank_policy.py::test_no_plateau_on_a_short_run"] == "PASSED"
    parallel = _run_examples("-n", "2")
    assert parallel == serial
