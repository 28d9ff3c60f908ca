"""The GitHub Actions workflows in examples/ci/ work as written, on a team's repository today: no repository
variable they need without a default, pytest-lora installed in a form pip accepts (it is not on PyPI yet),
the LoRA tests selected, pytest-xdist installed exactly where `-n` is used, and the README shows their
commands. Parsed, not run: no network."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / "examples" / "ci").glob("*.yml"))
HOMEPAGE = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Homepage"]
README = (ROOT / "README.md").read_text()
CI_HEADING = "## CI for your project"


def _commands(script: str) -> list[str]:
    """A `run:` script's command lines: continuations joined, whitespace collapsed, comments dropped."""
    joined = re.sub(r"\\\n", " ", script)
    lines = (" ".join(line.split()) for line in joined.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _runs(workflow: Path) -> list[str]:
    jobs = yaml.safe_load(workflow.read_text())["jobs"]
    return [command for job in jobs.values() for step in job["steps"] for command in _commands(step.get("run", ""))]


def _pip_requirements(command: str) -> list[Requirement]:
    """The requirements a `pip install` line names (options and their values left out)."""
    args = shlex.split(command)[2:]
    requirements = []
    skip = False
    for arg in args:
        if skip or arg.startswith("-"):
            skip = arg in ("--index-url", "-i", "--extra-index-url", "-c", "-r", "--constraint", "--requirement")
            continue
        if arg.endswith(".whl"):  # a built wheel: its file name starts with the distribution's name
            arg = f"{Path(arg).name.split('-')[0]} @ file:{arg}"
        requirements.append(Requirement(arg))
    return requirements


def _is(command: str, program: str) -> bool:
    return command.startswith(f"{program} ")


def _installs(workflow: Path) -> list[Requirement]:
    return [r for c in _runs(workflow) if _is(c, "pip install") for r in _pip_requirements(c)]


def _pytest_args(workflow: Path) -> list[list[str]]:
    return [shlex.split(c) for c in _runs(workflow) if _is(c, "pytest")]


@pytest.fixture(params=WORKFLOWS, ids=lambda p: p.name)
def workflow(request: pytest.FixtureRequest) -> Path:
    return Path(request.param)


def test_both_workflows_are_there() -> None:
    assert [p.name for p in WORKFLOWS] == ["cpu.yml", "gpu.yml"]


def test_every_repository_variable_has_a_default(workflow: Path) -> None:
    """`${{ vars.X }}` is the empty string where the repository does not set X: `--index-url ""` fails."""
    for expression in re.findall(r"\$\{\{(.*?)\}\}", workflow.read_text()):
        if "vars." in expression:
            assert re.fullmatch(r"\s*vars\.\w+\s*\|\|\s*'[^']+'\s*", expression), (
                f"{workflow.name}: ${{{{{expression}}}}} needs a default: ${{{{ vars.X || '...' }}}}"
            )


def test_pytest_lora_is_installed_from_where_it_is_today(workflow: Path) -> None:
    """Not on PyPI yet: a bare `pip install pytest-lora` fails; its repository (or a built wheel) works."""
    (requirement,) = [r for r in _installs(workflow) if canonicalize_name(r.name) == "pytest-lora"]
    assert requirement.url, f"{workflow.name}: {requirement} would look for pytest-lora on PyPI"
    assert requirement.url.startswith(f"git+{HOMEPAGE}@") or requirement.url.endswith(".whl"), requirement.url


def test_torch_is_pinned_before_anything_pulls_it(workflow: Path) -> None:
    installs = _installs(workflow)
    torch = [r for r in installs if r.name == "torch"]
    if torch:  # the CPU workflow pins the CPU build first; the GPU runner brings its own CUDA torch
        assert installs[0].name == "torch" and str(torch[0].specifier) == "==2.13.0"


def test_pytest_selects_the_lora_tests(workflow: Path) -> None:
    runs = _pytest_args(workflow)
    assert runs, f"{workflow.name} runs no pytest"
    for args in runs:
        assert "-m" in args and args[args.index("-m") + 1] == "lora", " ".join(args)


def test_xdist_is_installed_exactly_where_n_is_used(workflow: Path) -> None:
    names = {canonicalize_name(r.name): r for r in _installs(workflow)}
    xdist = "pytest-xdist" in names or "xdist" in getattr(names.get("pytest-lora"), "extras", set())
    for args in _pytest_args(workflow):
        workers = [args[i + 1] for i, arg in enumerate(args) if arg == "-n"]
        if xdist:
            assert workers and (workers[0].isdigit() or workers[0] in ("auto", "logical")), " ".join(args)
        else:
            assert not workers and not any(a.startswith("--numprocesses") for a in args), " ".join(args)


def test_the_readme_shows_the_workflows_commands() -> None:
    """The README's CI section shows each workflow's install and pytest commands, and only those."""
    start = README.index(CI_HEADING)
    section = README[start : README.index("\n## ", start + 1)]
    shown = {c for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S) for c in _commands(block)}
    actual = {c for w in WORKFLOWS for c in _runs(w)}
    relevant = {c for c in actual | shown if _is(c, "pip install") or _is(c, "pytest")}
    missing, extra = sorted(relevant & actual - shown), sorted(relevant & shown - actual)
    assert not missing and not extra, f"only in the workflows: {missing}; only in the README: {extra}"
    for w in WORKFLOWS:
        assert f"(examples/ci/{w.name})" in section, f"the README's CI section does not link examples/ci/{w.name}"


@pytest.mark.parametrize(
    ("name", "needles"),
    [
        ("gpu.yml", ["pytest -m lora --lora-require-gpu", "--benchmark-compare-fail=mean:10%", "upload-artifact"]),
        ("cpu.yml", ["torch==2.13.0", "pytest -m lora -n 2", "--lora-report=lora-report.json"]),
    ],
)
def test_ci_workflows_run_the_gate(name: str, needles: list[str]) -> None:
    text = (ROOT / "examples" / "ci" / name).read_text()
    commands = "\n".join(_runs(ROOT / "examples" / "ci" / name))
    for needle in needles:
        assert needle in commands or needle in text, needle
