"""Every option from the user's side (pytester): `--opt VALUE`, `--opt=VALUE`, `--no-lora-*`, pyproject keys,
and messages that name where a value came from."""

from __future__ import annotations

import importlib.util

import pytest

from pytest_lora.plugin.state import STATE

pytestmark = pytest.mark.lora

PYPROJECT = """
[tool.pytest_lora]
verify_base = true
resume_rank = 8
"""


CHANGED = {"verify_base": False, "load_in_4bit": False, "sweep_dir": "reports", "resume_rank": 4, "mlflow": "file:///r"}


@pytest.mark.parametrize(
    ("args", "changed"),
    [
        ([], {}),
        (
            [
                "--no-lora-verify-base",
                "--lora-load-in-4bit",
                "false",
                "--lora-sweep-dir",
                "reports",
                "--lora-resume-rank",
                "4",
                "--lora-mlflow",
                "file:///r",
            ],
            CHANGED,
        ),
        (
            [
                "--lora-verify-base",
                "--no-lora-verify-base",  # the last flag wins
                "--lora-load-in-4bit=false",
                "--lora-sweep-dir=reports",
                "--lora-resume-rank=4",
                "--lora-mlflow=file:///r",
            ],
            CHANGED,
        ),
        (["--no-lora-load-in-4bit"], {"load_in_4bit": False}),
    ],
    ids=["pyproject", "spaced", "equals", "no-flag"],
)
def test_command_line_forms_override_the_pyproject(lora_pytester: pytest.Pytester, args, changed) -> None:
    """The options as pytest parses them (a real config, its `pytest_configure` run), no test run needed."""
    if "mlflow" in changed and importlib.util.find_spec("mlflow") is None:
        pytest.skip("needs pytest-lora[mlflow]")
    lora_pytester.makepyprojecttoml(PYPROJECT)
    settings = lora_pytester.parseconfigure(*args).stash[STATE].session.settings
    expected = {"verify_base": True, "load_in_4bit": True, "sweep_dir": None, "resume_rank": 8, "mlflow": None}
    assert {name: getattr(settings, name) for name in expected} == {**expected, **changed}


def test_a_bad_value_of_a_former_standalone_option_is_a_usage_error(lora_pytester: pytest.Pytester) -> None:
    result = lora_pytester.runpytest("--lora-resume-rank=0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*argument --lora-resume-rank: resume_rank = 0 is out of range; use a value >= 1.*"])
    lora_pytester.makepyprojecttoml("[tool.pytest_lora]\nresume_rank = 0\n")
    result = lora_pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*pyproject.toml [[]tool.pytest_lora] resume_rank = 0 is out of range; use a value >= 1.*"]
    )


def test_mlflow_from_the_pyproject_without_mlflow_names_the_key(lora_pytester: pytest.Pytester, monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    lora_pytester.makepyprojecttoml('[tool.pytest_lora]\nmlflow = "sqlite:///x.db"\n')
    result = lora_pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*pyproject.toml [[]tool.pytest_lora] mlflow = 'sqlite:///x.db': MLflow is not installed.*"]
    )


@pytest.mark.parametrize(
    ("model", "problem"),
    [("./no/such/dir", "no such directory"), ("builtin:nope", "no built-in model of that name")],
    ids=["directory", "builtin"],
)
def test_a_bad_model_from_a_marker_names_the_marker(lora_pytester: pytest.Pytester, model: str, problem: str) -> None:
    lora_pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.lora(model={model!r})
        def test_it(lora_model):
            pass
        """
    )
    result = lora_pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*ModelLoadError: @pytest.mark.lora(model={model!r}) on *::test_it: {problem}*"])
    assert f"--lora-model {model}" not in result.stdout.str()  # the flag was never typed
