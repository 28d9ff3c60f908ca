"""The README cannot rot: its code is the examples' code, its failure output is today's output."""

from __future__ import annotations

import re
import shutil
import textwrap
from pathlib import Path

import pytest

from pytest_lora.core.settings import OPTIONS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
pytestmark = pytest.mark.lora


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_python_blocks_are_verbatim_from_the_examples() -> None:
    sources = "\n".join(p.read_text() for p in (ROOT / "examples").rglob("*.py"))
    blocks = _blocks("python")
    assert blocks
    for block in blocks:
        assert textwrap.dedent(block).strip() in sources, block[:200]


def test_every_option_is_documented() -> None:
    for spec in OPTIONS:
        assert f"`{spec.flag}`" in README and f"`{spec.name}`" in README, spec.name


def test_failure_output_is_what_the_checks_print_today(pytester: pytest.Pytester) -> None:
    marker = re.search(r"<!-- failure-output: (\S+) -->\n```text\n(.*?)```", README, flags=re.S)
    assert marker, "the README lost its failure-output block"
    shutil.copy(ROOT / "examples" / "pyproject.toml", pytester.path / "pyproject.toml")
    shutil.copy(ROOT / marker.group(1), pytester.path / "test_failure_sample.py")
    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:randomly")  # the README's order: file order
    result.assert_outcomes(failed=2)
    actual = [line.replace(f"{pytester.path}/", "") for line in result.stdout.lines if line.startswith("E ")]
    shown = [line for line in marker.group(2).splitlines() if line.startswith("E ")]
    assert shown == actual


def test_first_snippet_runs_as_a_user_pastes_it(pytester: pytest.Pytester) -> None:
    """The README's first python block, pasted into a user's test file with the team's policy beside it, runs
    under `pytest -m lora`: every test is selected (test_alpha_ratio uses no pytest-lora fixture, so only the
    snippet's `pytestmark` marks it) and passes. Only the two quick tests are run; the others are collected."""
    snippet = textwrap.dedent(_blocks("python")[0])
    assert "pytestmark = pytest.mark.lora" in snippet
    shutil.copy(ROOT / "examples" / "pyproject.toml", pytester.path / "pyproject.toml")
    pytester.makepyfile(test_snippet=snippet)
    collected = pytester.runpytest("-p", "no:cacheprovider", "-m", "lora", "--collect-only", "-q")
    items = [line for line in collected.stdout.lines if line.startswith("test_snippet.py::")]
    assert len(items) == 3 * 3 + 1 and "deselected" not in collected.stdout.str(), collected.stdout.str()
    quick = pytester.runpytest("-p", "no:cacheprovider", "-m", "lora", "-k", "param_budget or alpha_ratio")
    quick.assert_outcomes(passed=3 + 3, deselected=4)  # 3 + 1 deselected by -k, none by -m
