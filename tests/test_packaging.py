"""The package metadata says only what is tested: floors that the min-versions env installs, a build
backend that understands the license expression, classifiers that match requires-python. No network."""

from __future__ import annotations

import configparser
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
TOX = configparser.ConfigParser(interpolation=None)
TOX.read(ROOT / "tox.ini")
CONSTRAINTS = ROOT / "tests" / "constraints-min.txt"


def _floor(requirement: Requirement) -> Version:
    floors = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    assert len(floors) == 1, f"{requirement}: declare exactly one `>=` floor"
    return floors[0]


def _pins(lines: str) -> dict[str, Requirement]:
    requirements = [Requirement(line.split("#")[0]) for line in lines.splitlines() if line.split("#")[0].strip()]
    return {r.name.lower(): r for r in requirements}


def _declared(specs: list[str]) -> dict[str, Requirement]:
    return {r.name.lower(): r for r in map(Requirement, specs)}


def test_min_versions_constraints_pin_the_declared_floors() -> None:
    """Each runtime dependency but torch is pinned at its floor (torch stays at the CPU build tox pins)."""
    runtime = _declared(PROJECT["dependencies"])
    extras = _declared([spec for specs in PROJECT["optional-dependencies"].values() for spec in specs])
    pins = _pins(CONSTRAINTS.read_text())
    assert set(runtime) - {"torch"} <= set(pins), "a runtime dependency is missing from constraints-min.txt"
    assert "torch" not in pins
    for name, pin in pins.items():
        declared = runtime.get(name) or extras.get(name)
        assert declared is not None, f"constraints-min.txt pins {name}, which pyproject.toml does not declare"
        assert [(s.operator, Version(s.version)) for s in pin.specifier] == [("==", _floor(declared))], (
            f"constraints-min.txt: {pin} is not the floor pyproject.toml declares ({declared})"
        )
        assert pin.marker == declared.marker, f"{pin}: marker differs from pyproject.toml's {declared}"


def test_min_versions_env_uses_the_constraints_file() -> None:
    assert "PIP_CONSTRAINT = {toxinidir}/tests/constraints-min.txt" in TOX["testenv:min-versions"]["setenv"]


def test_tox_torch_pins_are_inside_the_declared_range() -> None:
    torch = _declared(PROJECT["dependencies"])["torch"]
    pins = re.findall(r"torch==(\S+)", (ROOT / "tox.ini").read_text())
    assert pins
    for pin in pins:
        assert Version(pin) in torch.specifier, f"tox.ini pins torch=={pin}, outside pyproject's {torch}"


def test_build_backend_floor_understands_the_license_expression() -> None:
    """A PEP 639 `license = "MIT"` needs setuptools 77, which rejects `License ::` classifiers beside it."""
    assert isinstance(PROJECT["license"], str)
    (backend,) = [r for r in map(Requirement, PYPROJECT["build-system"]["requires"]) if r.name == "setuptools"]
    assert _floor(backend) >= Version("77")
    assert not [c for c in PROJECT["classifiers"] if c.startswith("License ::")]
    assert PROJECT["license-files"] and all((ROOT / name).is_file() for name in PROJECT["license-files"])


def test_build_floor_env_pins_the_declared_backend_floor() -> None:
    (backend,) = [r for r in map(Requirement, PYPROJECT["build-system"]["requires"]) if r.name == "setuptools"]
    assert f"setuptools=={_floor(backend)}" in TOX["testenv:build-floor"]["deps"].split()


def test_python_classifiers_start_at_requires_python() -> None:
    classifiers = "\n".join(PROJECT["classifiers"])
    minors = sorted(int(m) for m in re.findall(r"^Programming Language :: Python :: 3\.(\d+)$", classifiers, re.M))
    assert minors == list(range(minors[0], minors[-1] + 1)), "the Python 3.x classifiers leave a gap"
    requires = SpecifierSet(PROJECT["requires-python"])
    assert f"3.{minors[0]}" in requires and f"3.{minors[0] - 1}" not in requires


def test_typed_classifier_ships_py_typed() -> None:
    assert "Typing :: Typed" in PROJECT["classifiers"]
    assert (ROOT / "pytest_lora" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["pytest_lora"]
