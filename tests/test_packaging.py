"""The package metadata says only what is tested: floors that the min-versions env installs, a lock of the
versions last tested inside the declared ranges, a build backend that understands the license expression,
classifiers that match requires-python. No network."""

from __future__ import annotations

import configparser
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
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
LOCK = ROOT / "tests" / "constraints.txt"
# the tox envs that install the versions last tested (tests/constraints.txt)
PINNED_ENVS = ["py", "examples", "mypy", "assert-plain", "perf", "lint"]
# the libraries pytest-lora is about: the lock must pin them, the README names their tested versions
TESTED = ["torch", "transformers", "peft", "bitsandbytes", "accelerate"]


def _floor(requirement: Requirement) -> Version:
    floors = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    assert len(floors) == 1, f"{requirement}: declare exactly one `>=` floor"
    return floors[0]


def _pins(lines: str) -> dict[str, Requirement]:
    requirements = [Requirement(line.split("#")[0]) for line in lines.splitlines() if line.split("#")[0].strip()]
    return {canonicalize_name(r.name): r for r in requirements}


def _declared(specs: list[str]) -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in map(Requirement, specs)}


def _option(env: str, key: str) -> str:
    """An env's own value of a tox.ini key, else [testenv]'s (what tox falls back to)."""
    section = f"testenv:{env}"
    if TOX.has_section(section) and key in TOX[section]:
        return TOX[section][key]
    return TOX["testenv"].get(key, "")


def _setenv(env: str) -> dict[str, str]:
    pairs = [line.split("=", 1) for line in _option(env, "setenv").splitlines() if line.strip()]
    return {name.strip(): value.strip() for name, value in pairs}


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


def test_lock_pins_are_inside_the_declared_ranges() -> None:
    """tests/constraints.txt pins one version of each package, and each declared dependency's pin satisfies
    pyproject.toml's range; the libraries the suite is about, and every runtime and dev dependency, are pinned."""
    runtime = _declared(PROJECT["dependencies"])
    optional = PROJECT["optional-dependencies"]
    extras = _declared([spec for specs in optional.values() for spec in specs])
    pins = _pins(LOCK.read_text())
    for name in TESTED:
        assert name in pins, f"constraints.txt does not pin {name}"
    # the lock is a fresh resolve on Python 3.11: what a marker leaves out there (tomli) is not in it
    applicable = {name for name, r in {**runtime, **_declared(optional["dev"])}.items() if r.marker is None}
    assert applicable <= set(pins), f"constraints.txt lacks {sorted(applicable - set(pins))}"
    for name, pin in pins.items():
        (spec,) = pin.specifier
        assert spec.operator == "==" and not pin.marker and not pin.extras, f"constraints.txt: {pin} is not a plain pin"
        assert "+" not in spec.version, f"constraints.txt: {pin}: no local label (+cpu), it would match one build only"
        declared = runtime.get(name) or extras.get(name)
        if declared is not None:
            assert Version(spec.version) in declared.specifier, (
                f"constraints.txt pins {pin}, outside pyproject.toml's {declared}"
            )


def test_default_envs_install_the_lock() -> None:
    """`tox` (and the other CPU envs) install tests/constraints.txt; tox.ini's own pins agree with it."""
    envlist = [env.strip() for env in TOX["tox"]["envlist"].split(",")]
    assert set(envlist) <= set(PINNED_ENVS)
    pins = _pins(LOCK.read_text())
    for env in PINNED_ENVS:
        assert _setenv(env).get("PIP_CONSTRAINT") == "{toxinidir}/tests/constraints.txt", env
        for pin in (Requirement(dep) for dep in _option(env, "deps").split() if "==" in dep):
            locked = pins[canonicalize_name(pin.name)]
            assert pin.specifier == locked.specifier, f"tox.ini [testenv:{env}] pins {pin}, constraints.txt {locked}"


def test_latest_env_installs_the_newest_releases() -> None:
    """`tox -e latest`: no constraints file, eager upgrades, no pre-releases, torch held at the CPU build; it
    prints the versions it resolved, then runs the suite and the examples."""
    assert _setenv("latest")["PIP_CONSTRAINT"] == ""  # tox passes the caller's PIP_* on
    install = _option("latest", "install_command").split()
    assert install[install.index("install") + 1 :][:3] == ["--upgrade", "--upgrade-strategy", "eager"]
    assert "--pre" not in install and _option("latest", "pip_pre") == "false"
    assert [arg for arg in install if arg.startswith("torch")] == ["torch==2.13.0"]
    assert "version(" in _option("latest", "commands_pre")
    commands = [line.strip() for line in _option("latest", "commands").splitlines() if line.strip()]
    guard = "python {toxinidir}/scripts/unless_locked.py {toxinidir}/tests/constraints.txt -- "
    assert commands[0] == guard + _option("py", "commands").strip()
    assert [c for c in commands[1:] if c.startswith(guard + "pytest") and " -m lora examples/ " in f"{c} "]


def test_ci_runs_the_readme_command_then_latest_and_min_versions() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    assert "pip install tox && tox" in (ROOT / "README.md").read_text()
    runs = [line.split("||")[0].strip() for line in script.splitlines() if line.startswith(("pip ", "tox"))]
    assert runs == [
        "pip install tox && tox",
        "tox run-parallel -e latest,min-versions,gpu-check-cpu --parallel-no-spinner --parallel-live",
    ]
    assert "torch==2.13.0" in script and 'exit "$status"' in script


def test_readme_tested_versions_are_the_lock() -> None:
    """The README's "Tested versions" table is tests/constraints.txt's pins; it names the envs and where to report."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Tested versions") :]
    shown = dict(re.findall(r"^\| ([\w.-]+) \| (\d[^ |]*) \|$", section, flags=re.M))
    assert list(shown) == [*TESTED, "pytest", "pytest-benchmark", "hypothesis"]
    pins = _pins(LOCK.read_text())
    for name, version in shown.items():
        assert pins[name].specifier == SpecifierSet(f"=={version}"), f"README: {name} {version}; lock: {pins[name]}"
    assert "`tox -e latest`" in section and "`tox -e min-versions`" in section
    assert f"{PROJECT['urls']['Issues']} " in section and "`pip list`" in section
    assert re.search(r"^tox -e latest +# ", readme, flags=re.M), "the README's list of tox envs lacks latest"


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
