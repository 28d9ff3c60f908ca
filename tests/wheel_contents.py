"""Check a built wheel (`tox -e build-floor`): the typing marker and the license ship, the tests do not."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path


def problems(wheel: Path) -> list[str]:
    names = zipfile.ZipFile(wheel).namelist()
    found = []
    if "pytest_lora/py.typed" not in names:
        found.append("pytest_lora/py.typed is missing")
    if not any(name.endswith(".dist-info/licenses/LICENSE") for name in names):
        found.append("the LICENSE file is missing from .dist-info/licenses/")
    found += [f"{name} should not ship" for name in names if name.startswith(("tests/", "examples/"))]
    return found


if __name__ == "__main__":
    (wheel,) = Path(sys.argv[1]).glob("pytest_lora-*.whl")
    errors = problems(wheel)
    print("\n".join(errors) or f"{wheel.name}: py.typed and LICENSE present, no tests")
    sys.exit(1 if errors else 0)
