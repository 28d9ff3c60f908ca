"""Run a command unless this environment holds exactly the lock's versions: `tox -e latest`'s guard.

`tox -e latest` installs the newest release of every dependency. On a day when those are the versions of
tests/constraints.txt, the default `tox` run has already tested them, so running the suite again proves
nothing and costs CI its longest step twice. Then this says so and exits 0; otherwise it prints what differs
from the lock (the news the run is for) and runs the command, with its exit status.

    python scripts/unless_locked.py tests/constraints.txt -- pytest ...
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import distributions
from pathlib import Path

# Not the project's dependencies: the package under test and the installer's own tools.
_IGNORED = {"pytest-lora", "pip", "setuptools", "wheel"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].split(";", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_canonical(name)] = version.strip()
    return pins


def _differences(lock: dict[str, str]) -> list[str]:
    installed = {_canonical(dist.metadata["Name"]): dist.version for dist in distributions()}
    return [
        f"{name} {version} (lock: {lock.get(name, 'not pinned')})"
        for name, version in sorted(installed.items())
        if name not in _IGNORED and lock.get(name) != version.split("+", 1)[0]
    ]


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    different = _differences(_lock(Path(argv[0])))
    if not different:
        print(f"unless_locked: every installed package is at the version {argv[0]} pins; the default tox run")
        print(f"  tested exactly these, so this run is skipped: {' '.join(argv[2:])}")
        return 0
    print(f"unless_locked: {len(different)} package(s) differ from {argv[0]}: {', '.join(different)}")
    return subprocess.call(argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
