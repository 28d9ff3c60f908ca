"""`pytest_lora.core.globs`: glob's rules, without following directory symlinks in `**`, with a bound."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest

from pytest_lora.core.globs import find, literal_prefix


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for folder in ("a/b/c", ".hidden/x", "loop"):
        (tmp_path / folder).mkdir(parents=True)
    for name in ("a/x.json", "a/b/y.json", "a/b/c/z.json", "a/.dot.json", ".hidden/x/h.json", "a/b/notes.txt"):
        (tmp_path / name).write_text("{}")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "pattern", ["a/**/*.json", "a/*", "a/**", "*", ".*", "a/.*", "a/b/../x.json", "a/b/", "a/?/*.txt", "nope/*"]
)
def test_same_matches_as_glob_without_symlinks(tree: Path, pattern: str) -> None:
    expected = [os.path.normpath(path) for path in glob.glob(pattern, recursive=True)]
    assert [os.path.normpath(path.relative_to(tree)) for path in find(tree, pattern).matches] == sorted(expected)


def test_directory_symlinks_are_not_followed_by_double_star(tree: Path) -> None:
    (tree / "loop" / "up").symlink_to("..")
    (tree / "loop" / "self").symlink_to(".")
    (tree / "loop" / "real").mkdir()
    (tree / "loop" / "real" / "adapter_config.json").write_text("{}")
    result = find(tree, "loop/**/adapter_config.json")
    assert result.matches == [tree / "loop" / "real" / "adapter_config.json"]
    assert result.stopped_at is None
    # a one-level wildcard still goes through a link, as glob does
    assert find(tree, "loop/*/a/x.json").matches == [tree / "loop" / "up" / "a" / "x.json"]


def test_the_walk_is_bounded(tree: Path) -> None:
    bounded = find(tree, "**/*.json", max_entries=4)
    assert bounded.stopped_at == 4
    assert len(bounded.matches) < len(find(tree, "**/*.json").matches)
    assert find(tree, "**/*.json").stopped_at is None


def test_absolute_patterns_and_the_literal_prefix(tree: Path) -> None:
    assert find(Path("/nonexistent"), f"{tree}/a/*.json").matches == [tree / "a" / "x.json"]
    assert literal_prefix("../../etc/*") == ("..", "..", "etc")
    assert literal_prefix("adapters/**/adapter_config.json") == ("adapters",)
    assert literal_prefix("exact/file.json") == ("exact", "file.json")
    assert find(tree, "").matches == []
