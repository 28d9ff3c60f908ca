"""A line in pytest's terminal per long step (loading a base, a sweep rank, a benchmark round).

On a real model these steps take minutes; one dot for all of it reads as a hang. The lines go through
pytest's own reporter, outside the test's output capture (as live logging does), and stay silent with
`-q` and on pytest-xdist workers, which have no terminal of their own.
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest

from pytest_lora.plugin.xdist import is_worker


class TerminalProgress:
    """Callable the model side is handed: `progress("loading ...")` prints one line, or nothing."""

    def __init__(self, config: pytest.Config) -> None:
        self._config = config

    def __call__(self, text: str) -> None:
        config = self._config
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None or config.get_verbosity() < 0 or is_worker(config):
            return
        capture = config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture is not None else nullcontext():
            reporter.write_line(f"lora: {text}")
