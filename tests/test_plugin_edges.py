"""Users' situations at the plugin's edges: where a value came from in messages, the frames a traceback shows,
hooks with the plugin disabled or raising, the policy in threads, marker arguments, paths in ini files.

Found by an adversarial review of the layered layout (pytester, in-process, no model loaded unless the
situation needs one).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.lora

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def test_a_frame_inside_the_model_and_core_layers_is_hidden_from_a_lora_error(
    lora_pytester: pytest.Pytester,
) -> None:
    """pytest-lora's errors show the user's line, not pytest-lora's own frames: all of its layers, not only
    `pytest_lora/plugin` (before the move into folders the filter covered the whole package)."""
    lora_pytester.makepyfile(
        """
        from pytest_lora import load_policy

        def test_missing_policy():
            load_policy("missing.toml")
        """
    )
    result = lora_pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(['*load_policy("missing.toml")*', "*PolicyError*missing.toml does not exist*"])
    assert "pytest_lora/core/" not in result.stdout.str()


@no_cuda
def test_a_device_set_in_pyproject_is_named_as_pyproject_in_the_error(lora_pytester: pytest.Pytester) -> None:
    """`device = "cuda"` in [tool.pytest_lora] on a machine without CUDA: the message names that key, not a
    `--lora-device` flag the user never typed (README: "a message about a bad value names where it was set")."""
    lora_pytester.makepyprojecttoml('[tool.pytest_lora]\ndevice = "cuda"\n')
    lora_pytester.makepyfile("def test_model(lora_model):\n    pass\n")
    result = lora_pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*pyproject.toml [[]tool.pytest_lora[]] device = 'cuda': CUDA is not available*"])
    assert "--lora-device cuda" not in result.stdout.str()


def test_the_readme_hooks_conftest_works_with_the_plugin_disabled(pytester: pytest.Pytester) -> None:
    """A team's conftest implementing pytest-lora's hooks must not break `pytest -p no:lora` (or a run where
    pytest-lora is not installed) with pluggy's "unknown hook" INTERNALERROR: the documented fix is
    `@pytest.hookimpl(optionalhook=True)`, so the README's example has to use it."""
    shutil.copy(EXAMPLES / "hooks_conftest.py", pytester.path / "conftest.py")
    pytester.makepyfile("def test_plain():\n    pass\n")
    result = pytester.runpytest("-p", "no:lora", "-p", "no:randomly")
    assert result.ret == 0, result.stdout.str()
    result.assert_outcomes(passed=1)


def test_the_sessions_policy_is_in_force_in_a_thread_the_test_starts(lora_pytester: pytest.Pytester) -> None:
    """A test that checks adapters in a worker thread (a ThreadPoolExecutor, pytest-run-parallel) must be
    checked against the team policy, not silently against the built-in defaults: a new thread does not
    inherit the ContextVar the plugin sets (the module global it replaced was seen by every thread)."""
    lora_pytester.makepyprojecttoml("[tool.pytest_lora.policy]\nranks = [64]\n")
    lora_pytester.makepyfile(
        """
        from concurrent.futures import ThreadPoolExecutor

        from pytest_lora import Policy, active_policy, use_policy

        def test_in_a_thread():
            assert active_policy().ranks == (64,)
            with ThreadPoolExecutor(1) as pool:
                assert pool.submit(lambda: active_policy().ranks).result() == (64,)

        def test_use_policy_still_scopes_this_context():
            with use_policy(Policy(ranks=(2,))):
                assert active_policy().ranks == (2,)
            assert active_policy().ranks == (64,)
        """
    )
    lora_pytester.runpytest().assert_outcomes(passed=2)
    from pytest_lora import active_policy

    assert active_policy().ranks != (64,)  # the inner session's policy does not outlive it


def test_a_positional_marker_argument_is_an_error_not_ignored(lora_pytester: pytest.Pytester) -> None:
    """`@pytest.mark.lora("builtin:tiny-qwen2")` must not run the test on the default model in silence."""
    lora_pytester.makepyfile(
        """
        import pytest

        @pytest.mark.lora("builtin:tiny-qwen2")
        def test_positional(lora_settings):
            pass
        """
    )
    result = lora_pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*SettingsError: @pytest.mark.lora on *test_positional*keyword*'builtin:tiny-qwen2'*"])


def test_a_marker_typo_on_a_sweep_is_a_message_not_a_traceback(lora_pytester: pytest.Pytester) -> None:
    """A bad `lora` keyword on a `lora_sweep` test is found while the ranks are parametrized (collection):
    it must read like the same typo on any other test, without pluggy's and pytest's frames."""
    lora_pytester.makepyfile(
        """
        import pytest

        @pytest.mark.lora(sweeep=[2])
        def test_sweep(lora_sweep):
            pass
        """
    )
    result = lora_pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*unknown keyword 'sweeep' = [[]2[]]. Did you mean 'sweep'?*"])
    output = result.stdout.str()
    assert "pluggy/" not in output and "_pytest/" not in output and "pytest_lora/" not in output


def test_a_relative_path_in_the_ini_counts_from_the_config_file_not_the_cwd(
    lora_pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`lora_policy = "team.toml"` in [tool.pytest.ini_options] (or pytest.ini): `cd tests && pytest` must use the
    same policy as `pytest` at the root, as `policy = ...` in [tool.pytest_lora] does and pytest's own paths."""
    lora_pytester.makepyprojecttoml('[tool.pytest.ini_options]\nlora_policy = "team.toml"\n')
    (lora_pytester.path / "tox.ini").unlink()  # the pyproject is the config file
    (lora_pytester.path / "team.toml").write_text("ranks = [64]\n")
    tests = lora_pytester.mkdir("tests")
    (tests / "test_team_ini_policy.py").write_text(
        "from pytest_lora import active_policy\n\ndef test_team():\n    assert active_policy().ranks == (64,)\n"
    )
    monkeypatch.chdir(tests)
    result = lora_pytester.runpytest("-p", "no:randomly")
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize("args", [["--lora-check="], ["--lora-check", "a.json", "--lora-check="]])
def test_an_empty_check_path_is_a_usage_error_not_a_check_of_the_current_directory(
    lora_pytester: pytest.Pytester, args: list[str]
) -> None:
    lora_pytester.makepyfile("def test_plain():\n    pass\n")
    result = lora_pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--lora-check = [[]*''[]] has an empty entry; name a file, directory or pattern*"])


def test_a_missing_policy_file_names_where_it_was_set(lora_pytester: pytest.Pytester) -> None:
    """`Settings.sources` in the message: the ini key the user wrote, not a list of the three places it could be."""
    lora_pytester.makeini("[pytest]\naddopts = -p no:randomly\nlora_policy = missing.toml\n")
    lora_pytester.makepyfile("def test_plain():\n    pass\n")
    result = lora_pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*policy file *missing.toml does not exist; check ini option lora_policy *"])


def test_the_layer_check_sees_a_lazy_import_through_the_package_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`from pytest_lora import SweepRun` inside a model-side function loads `pytest_lora.plugin.sweep` (the
    package root resolves it lazily): the layer test must count it as an import of the plugin."""
    import test_layers

    fake = tmp_path / "fake.py"
    fake.write_text("def later():\n    from pytest_lora import SweepRun\n    return SweepRun\n")
    monkeypatch.setitem(test_layers.MODULES, "pytest_lora.model.fake", fake)
    assert "pytest_lora.plugin.sweep" in test_layers.imports("pytest_lora.model.fake", top_level_only=False)


SWEEPS = """
import pytest
from pytest_lora import synthetic_data

DATA = synthetic_data(256, 16, n_train=16, n_val=4)

@pytest.mark.lora(sweep=[2])
def test_first(lora_sweep):
    lora_sweep.run({"target_modules": ["q_proj"]}, steps=1, dataset=DATA, seq_len=16, batch_size=4)

@pytest.mark.lora(sweep=[2])
def test_second(lora_sweep):
    lora_sweep.run({"target_modules": ["q_proj"]}, steps=1, dataset=DATA, seq_len=16, batch_size=4)
"""


def test_a_sweep_hook_that_raises_loses_no_sweep_and_fails_the_session(lora_pytester: pytest.Pytester) -> None:
    """A team's tracker hook that raises (its server is down) must not end the run in an INTERNALERROR that
    drops the other sweeps' decisions and the summary: each sweep is still decided, written and shown, the
    failure is named under it, and the session fails."""
    lora_pytester.makeconftest("def pytest_lora_sweep_decided(report):\n    raise RuntimeError('tracker down')\n")
    lora_pytester.makepyfile(test_sweeps=SWEEPS)
    result = lora_pytester.runpytest("--lora-sweep-dir=out")
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "*lora rank sweep*",
            "test_sweeps.py::test_first:",
            "*chosen rank: r=2*",
            "*pytest_lora_sweep_decided failed: RuntimeError: tracker down (conftest.py:2)*",
            "test_sweeps.py::test_second:",
            "*chosen rank: r=2*",
            "*pytest_lora_sweep_decided failed: RuntimeError: tracker down (conftest.py:2)*",
        ]
    )
    assert len(list((lora_pytester.path / "out").glob("*.json"))) == 2


def test_the_team_policy_is_active_at_collection_and_session_finish_as_while_tests_run(
    lora_pytester: pytest.Pytester,
) -> None:
    """README: the assertions' default is the session's policy, the built-in defaults only outside a pytest
    session. Module-level code, a conftest's `pytest_generate_tests` and `pytest_sessionfinish` run inside the
    session too: they must not get the defaults in silence (a parametrization by `active_policy().sweep.ranks`
    would then list other ids under --collect-only and in the run than the team's policy says)."""
    lora_pytester.makepyprojecttoml("[tool.pytest_lora.policy]\nalpha_ratio = 1.0\n")
    lora_pytester.makeconftest(
        """
        from pytest_lora import active_policy

        def pytest_generate_tests(metafunc):
            if "ratio" in metafunc.fixturenames:
                metafunc.parametrize("ratio", [active_policy().alpha_ratio], ids=lambda r: f"ratio={r}")

        def pytest_sessionfinish(session):
            print("at session finish: alpha_ratio", active_policy().alpha_ratio)
        """
    )
    lora_pytester.makepyfile(
        test_policy_windows="""
        from pytest_lora import active_policy

        AT_IMPORT = active_policy().alpha_ratio

        def test_ratio(ratio):
            assert (AT_IMPORT, ratio, active_policy().alpha_ratio) == (1.0, 1.0, 1.0)
        """
    )
    collected = lora_pytester.runpytest("--collect-only", "-q")
    collected.stdout.fnmatch_lines(["test_policy_windows.py::test_ratio[[]ratio=1.0[]]"])
    result = lora_pytester.runpytest("-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*at session finish: alpha_ratio 1.0*"])


def test_the_sweep_section_follows_the_lora_section_whenever_its_recorder_was_registered(
    lora_pytester: pytest.Pytester,
) -> None:
    """The sweep's recorder is registered when the first sweep item is collected, after the `lora` reporter;
    pluggy calls the later plugin first, which put the sweep's decision above the `lora` section (it was below it
    while the recorder loaded at configure). The order is the reporter's to set, not the registration's."""
    lora_pytester.makepyfile(test_sweeps=SWEEPS)
    result = lora_pytester.runpytest("--lora-sweep-dir=out")
    result.assert_outcomes(passed=2)
    headers = [line.strip("= ") for line in result.outlines if line.startswith("=") and " lora" in line]
    assert headers == ["lora", "lora rank sweep"], headers


def test_a_blocked_sweep_recorder_leaves_the_sweep_items_running_with_mlflow_on(lora_pytester: pytest.Pytester) -> None:
    """`-p no:lora-sweep-recorder` (pytest's way to switch a named plugin off: the sweep items run as plain tests,
    no report is written) with `--lora-mlflow`: each sweep test's parametrization starts the recorder, which must
    happen once, not register the MLflow logger a second time (a collection error: name already registered)."""
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        pytest.skip("needs pytest-lora[mlflow]")
    lora_pytester.makepyfile(test_sweeps=SWEEPS)
    result = lora_pytester.runpytest(
        "-p", "no:lora-sweep-recorder", "--lora-mlflow", f"sqlite:///{lora_pytester.path / 'mlflow.db'}"
    )
    result.assert_outcomes(passed=2)
    assert "lora rank sweep" not in result.stdout.str()
    assert not (lora_pytester.path / ".lora-sweep").exists()


@pytest.mark.parametrize(
    "args",
    [(), ("-n", "0"), ("-p", "no:xdist"), ("--collect-only", "-n", "2")],
    ids=["serial", "n0", "no-xdist", "collect-only"],
)
def test_only_a_distributing_xdist_controller_records_sweeps_from_configure(
    lora_pytester: pytest.Pytester, args: tuple[str, ...]
) -> None:
    """Where the process collects its own tests, the first sweep item starts the recorder; only the controller of
    a distributed run (`-n 2`: the xdist sweep test in test_sweep.py) starts it at configure."""
    lora_pytester.makeconftest(
        """
        import pytest
        from pytest_lora.plugin.xdist import distributes

        @pytest.hookimpl(trylast=True)
        def pytest_configure(config):
            print("distributes:", distributes(config), config.pluginmanager.has_plugin("lora-sweep-recorder"))
        """
    )
    lora_pytester.makepyfile("def test_plain():\n    pass\n")
    result = lora_pytester.runpytest("-s", *args)
    result.stdout.fnmatch_lines(["distributes: False False"])
