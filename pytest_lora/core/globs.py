"""Glob patterns of adapter files: `**` never follows a directory symlink, and the walk is bounded.

`glob.glob(recursive=True)` follows directory symlinks in `**`, so a link to `.` or a parent makes
it walk without end and collection hangs. Here `**` descends into real directories only (a linked
directory can still be named, or matched by a one-level `*`), and the walk stops after
`max_entries` directory entries, saying so (`stopped_at`). Otherwise the rules are glob's: `*`, `?` and
`[...]` stay within one path segment, names starting with "." match only a segment that starts
with ".", a final `**` matches files and directories. Pure (stdlib only).
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path

MAX_ENTRIES = 100_000
_MAGIC = re.compile(r"[*?[]")


@dataclass(frozen=True)
class GlobResult:
    """The matching paths, sorted; `stopped_at` is the bound when the walk hit it (the matches are then incomplete)."""

    matches: list[Path]
    stopped_at: int | None = None


class _Budget:
    """Directory entries the walk may still read."""

    def __init__(self, entries: int) -> None:
        self.left = entries

    @property
    def exhausted(self) -> bool:
        return self.left < 0

    def scan(self, directory: Path) -> list[os.DirEntry[str]]:
        """The entries of `directory`, as far as the budget goes; [] for what is not a readable directory."""
        if self.left <= 0:
            self.left = -1  # a directory left unread: the result may be incomplete
            return []
        try:
            with os.scandir(directory) as entries:
                found = []
                for entry in entries:
                    self.left -= 1
                    if self.left < 0:
                        break
                    found.append(entry)
                return found
        except OSError:  # not a directory, unreadable, vanished: glob skips it too
            return []


def _is_real_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _descendants(base: Path, budget: _Budget, *, files: bool) -> list[Path]:
    """`base` and every real, non-hidden directory under it (and their files when `files`), iteratively."""
    found, stack = [base], [base]
    while stack:
        for entry in budget.scan(stack.pop()):
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            if _is_real_dir(entry):
                found.append(path)
                stack.append(path)
            elif files:
                found.append(path)
    return found


def _matching(base: Path, segment: str, budget: _Budget, *, last: bool) -> list[Path]:
    """Children of `base` whose name matches the wildcard `segment` (directories only unless `last`)."""
    hidden = segment.startswith(".")
    found = []
    for entry in budget.scan(base):
        if entry.name.startswith(".") and not hidden:
            continue
        if fnmatch.fnmatch(entry.name, segment) and (last or entry.is_dir()):
            found.append(Path(entry.path))
    return found


def literal_prefix(pattern: str) -> tuple[str, ...]:
    """The segments of `pattern` before its first wildcard, where its walk starts: `../../etc/*` -> .., .., etc."""
    parts = Path(pattern).parts
    for index, part in enumerate(parts):
        if part == "**" or _MAGIC.search(part):
            return parts[:index]
    return parts


def find(root: Path, pattern: str, *, max_entries: int | None = None) -> GlobResult:
    """The paths matching `pattern` (relative to `root`, or absolute), as `glob.glob(recursive=True)` finds
    them but without following directory symlinks in `**` and reading at most `max_entries` entries
    (default `MAX_ENTRIES`)."""
    limit = MAX_ENTRIES if max_entries is None else max_entries
    pure = Path(pattern)
    current, segments = ([Path(pure.anchor)], pure.parts[1:]) if pure.is_absolute() else ([root], pure.parts)
    if not segments:
        return GlobResult([])
    budget = _Budget(limit)
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        following: list[Path] = []
        for base in current:
            if segment == "**":
                following += _descendants(base, budget, files=last)
            elif _MAGIC.search(segment):
                following += _matching(base, segment, budget, last=last)
            else:
                path = base / segment
                if os.path.lexists(path) if last else path.is_dir():
                    following.append(path)
        current = list(dict.fromkeys(following))
    if not pure.is_absolute():
        current = [path for path in current if path != root]  # as glob: `**` alone does not match ""
    return GlobResult(sorted(current), limit if budget.exhausted else None)
