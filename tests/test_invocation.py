"""`--lora-* VALUE` with a space: a value outside the project must not silently move the rootdir (pytester)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_lora.plugin.invocation import spaced_values

pytestmark = pytest.mark.lora

TEAM_POLICY = "[tool.pytest_lora.policy]\nranks = [8]\n"
PROBE = "def test_policy(lora_policy):\n    assert lora_policy.ranks == (8,)\n"
# Every --lora-* option that takes a path, with what its value names outside the project.
PATH_OPTIONS = [
    ("--lora-model", "models/qwen2"),
    ("--lora-policy", "policies/team.toml"),
    ("--lora-cache-dir", "cache"),
    ("--lora-report", "reports/lora.json"),
    ("--lora-configs", "adapters/adapter_config.json"),
    ("--lora-check", "adapters"),
    ("--lora-sweep-dir", "sweeps"),
    ("--lora-mlflow", "mlruns"),
]


@pytest.fixture
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory outside the pytester project, holding a file or directory for every path option."""
    root = tmp_path_factory.mktemp("outside")
    for _, relative in PATH_OPTIONS:
        path = root / relative
        if path.suffix:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(TEAM_POLICY.split("\n", 1)[1] if path.suffix == ".toml" else "{}")
        else:
            path.mkdir(parents=True, exist_ok=True)
    return root


@pytest.mark.parametrize(("flag", "relative"), PATH_OPTIONS, ids=[flag for flag, _ in PATH_OPTIONS])
def test_a_path_option_with_a_space_that_moves_the_rootdir_stops_the_session(
    lora_pytester: pytest.Pytester, outside: Path, flag: str, relative: str
) -> None:
    lora_pytester.makepyprojecttoml(TEAM_POLICY)
    lora_pytester.makepyfile(PROBE)
    value = str(outside / relative)

    spaced = lora_pytester.runpytest(flag, value)
    assert spaced.ret == pytest.ExitCode.USAGE_ERROR
    spaced.stderr.fnmatch_lines(
        [
            f"ERROR: pytest-lora: `{flag} {value}` moved pytest's rootdir to * (else {lora_pytester.path}) and its "
            f"config file to * (else {lora_pytester.path / 'tox.ini'}).",
            "*it took the value for a test path; the [[]tool.pytest_lora[]] settings and the team policy would "
            "silently become the defaults.",
            f"  fix: write {flag}={value}",
        ]
    )
    assert "test_policy" not in spaced.stdout.str()  # stopped before any test ran

    equals = lora_pytester.runpytest(f"{flag}={value}", "--collect-only")
    assert equals.ret == pytest.ExitCode.OK
    equals.stdout.fnmatch_lines([f"rootdir: {lora_pytester.path}", "configfile: tox.ini"])
    if flag != "--lora-policy":
        equals.stdout.fnmatch_lines(
            [f"lora: policy={lora_pytester.path / 'pyproject.toml'} [[]tool.pytest_lora.policy[]]"]
        )


def test_a_space_inside_the_project_that_keeps_the_rootdir_is_accepted(lora_pytester: pytest.Pytester) -> None:
    lora_pytester.makepyprojecttoml(TEAM_POLICY)
    lora_pytester.makepyfile(PROBE)
    lora_pytester.mkdir("policies").joinpath("team.toml").write_text("ranks = [8]\nalpha_ratio = 2.0\n")
    result = lora_pytester.runpytest("--lora-policy", "policies/team.toml")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["lora: policy=policies/team.toml"])


def test_spaced_values_reads_flags_with_a_separate_value() -> None:
    args = ["--lora-model", "/m", "--lora-report=r.json", "-k", "x", "--lora-verify-base", "tests", "--lora-seed"]
    assert spaced_values(args) == [("--lora-model", "/m"), ("--lora-verify-base", "tests")]
    assert spaced_values(["--", "--lora-model", "/m"]) == []
    assert spaced_values(["--lora-model", "--lora-seed=1"]) == []


def test_values_that_name_no_path_are_left_to_the_options(lora_pytester: pytest.Pytester) -> None:
    """A glob list longer than a file name may be, or a device name: no path, so no rootdir question."""
    lora_pytester.makepyfile("def test_it(lora_settings):\n    assert len(lora_settings.configs) == 60\n")
    configs = ",".join(f"adapters/run_{index:02d}/*.json" for index in range(60)).replace("/", "_")
    result = lora_pytester.runpytest("--lora-configs", configs, "--lora-device", "cpu", "-k", "test_it")
    result.assert_outcomes(passed=1)
