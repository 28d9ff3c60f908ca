"""The plugin as users meet it: options, marker, settings precedence, errors, output (pytester)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pytest_lora.core.settings import OPTIONS

pytestmark = pytest.mark.lora

CONFIG = "from peft import LoraConfig\nCFG = LoraConfig(r=8, lora_alpha=16, target_modules=['q_proj', 'v_proj'])\n"


def test_help_documents_every_option(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["LoRA rank policy (pytest-lora):"])
    for spec in OPTIONS:
        assert spec.flag in result.stdout.str(), spec.flag
        assert spec.ini in result.stdout.str(), spec.ini


def test_importing_the_plugin_imports_no_torch() -> None:
    code = (
        "import sys, pytest_lora, pytest_lora.plugin;"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_collect_only_without_lora_tests_loads_no_policy_or_model_code(pytester: pytest.Pytester) -> None:
    """What keeps `--collect-only` in a project without LoRA tests as fast as with `-p no:lora` (the timing is
    tests/perf's `test_collect_only_cost_of_the_plugin`): the policy, curves and model code stay unloaded."""
    pytester.makeconftest(
        """
        import sys

        def pytest_collection_finish(session):
            print("loaded:", sorted(m for m in sys.modules if m.startswith("pytest_lora.")))
        """
    )
    pytester.makepyfile("def test_plain():\n    pass\n")
    result = pytester.runpytest_subprocess("--collect-only", "-q", "-p", "no:randomly")
    result.assert_outcomes()
    line = next(line for line in result.outlines if line.startswith("loaded:"))
    assert "pytest_lora.plugin" in line  # the probe sees the plugin's modules at all
    unused = ("core.policy", "core.curves", "core.recipe", "core.globs", "model.training", "model.loading")
    # the config-file checks load only when files are named, the sweep's recorder with the first sweep item
    for module in (*unused, "plugin.adapter_check", "plugin.sweep", "integrations.mlflow"):
        assert f"'pytest_lora.{module}'" not in line, module


def test_the_sessions_policy_is_active_while_its_tests_run_and_nested_runs_restore_it(
    lora_pytester: pytest.Pytester,
) -> None:
    """The assertions' default policy is the innermost session's: an in-process run with a policy, and one without
    (the built-in defaults), each see their own, inside the caller's `use_policy` block too, and the caller gets
    its back."""
    from pytest_lora import Policy, active_policy, use_policy

    lora_pytester.makepyfile(
        """
        import os
        from pytest_lora import active_policy

        def test_sees_its_sessions_policy():
            assert active_policy().source == os.environ["EXPECTED_POLICY"], active_policy().source
        """
    )
    policy_file = lora_pytester.path / "team.toml"
    policy_file.write_text("alpha_ratio = 1.0\n")
    with use_policy(Policy(alpha_ratio=3.0, source="outer")), pytest.MonkeyPatch.context() as patch:
        patch.setenv("EXPECTED_POLICY", str(policy_file))
        lora_pytester.runpytest(f"--lora-policy={policy_file}").assert_outcomes(passed=1)
        assert active_policy().source == "outer"
        patch.setenv("EXPECTED_POLICY", "<defaults>")
        lora_pytester.runpytest().assert_outcomes(passed=1)
        assert active_policy().source == "outer"


def test_marker_selects_lora_tests_under_strict_markers(lora_pytester: pytest.Pytester) -> None:
    lora_pytester.makepyfile(
        """
        import pytest

        @pytest.mark.lora
        def test_marked():
            pass

        def test_uses_fixture(lora_policy):
            assert lora_policy.alpha_ratio == 2.0

        def test_plain():
            pass
        """
    )
    result = lora_pytester.runpytest("--strict-markers", "-m", "lora", "-v")
    result.assert_outcomes(passed=2, deselected=1)
    result.stdout.fnmatch_lines(["*test_marked PASSED*", "*test_uses_fixture PASSED*"])


def test_only_pytest_loras_own_fixtures_mark_a_test_lora(lora_pytester: pytest.Pytester) -> None:
    """A user's fixture named lora_* is not a LoRA test; one of pytest-lora's, directly or underneath, is."""
    lora_pytester.makeconftest(
        """
        import pytest

        @pytest.fixture
        def lora_mine():
            return 1

        @pytest.fixture
        def lora_dataset(lora_policy):
            return lora_policy
        """
    )
    lora_pytester.makepyfile(
        """
        def test_user_fixture(lora_mine):
            pass

        def test_own_fixture(lora_model):
            pass

        def test_through_a_user_fixture(lora_dataset):
            pass
        """
    )
    result = lora_pytester.runpytest("--strict-markers", "-m", "lora", "--collect-only", "-q")
    assert [line for line in result.stdout.lines if "::" in line] == [
        "test_only_pytest_loras_own_fixtures_mark_a_test_lora.py::test_own_fixture",
        "test_only_pytest_loras_own_fixtures_mark_a_test_lora.py::test_through_a_user_fixture",
    ]
    result.stdout.fnmatch_lines(["*2/3 tests collected (1 deselected)*"])


def test_disabling_the_plugin(lora_pytester: pytest.Pytester) -> None:
    lora_pytester.makepyfile("def test_it(lora_model):\n    pass\n")
    result = lora_pytester.runpytest("-p", "no:lora")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'lora_model' not found*"])
    assert "lora: model=" not in result.stdout.str()


def test_header_says_model_device_quantization(lora_pytester: pytest.Pytester) -> None:
    lora_pytester.makepyfile("def test_it():\n    pass\n")
    result = lora_pytester.runpytest("--lora-compute-dtype", "float32")
    result.stdout.fnmatch_lines(
        [
            "lora: model=builtin:tiny-llama, device=auto (CUDA if available, else CPU*), "
            "4-bit nf4, compute float32, double quant",
            "lora: policy=<defaults>",
        ]
    )


SEED_TEST = """
import pytest

def test_seed(lora_settings):
    assert lora_settings.seed == {expected}, lora_settings.sources
"""


@pytest.mark.parametrize(
    ("pyproject", "args", "expected"),
    [
        ("", [], 0),
        ("[tool.pytest_lora]\nseed = 3\n", [], 3),
        ("[tool.pytest_lora]\nseed = 3\n", ["--lora-seed", "5"], 5),
    ],
)
def test_settings_precedence(lora_pytester: pytest.Pytester, pyproject: str, args: list[str], expected: int) -> None:
    ini = lora_pytester.path / "tox.ini"
    ini.write_text(ini.read_text().replace("[pytest]", "[pytest]\nlora_seed = 1"))  # ranks below [tool.pytest_lora]
    if pyproject:
        lora_pytester.makepyprojecttoml(pyproject)
    lora_pytester.makepyfile(SEED_TEST.format(expected=expected if pyproject or args else 1))
    lora_pytester.runpytest(*args).assert_outcomes(passed=1)


def test_marker_keywords_override_per_test_class_module(lora_pytester: pytest.Pytester) -> None:
    lora_pytester.makepyfile(
        """
        import pytest

        pytestmark = pytest.mark.lora(seed=1)

        def test_module_level(lora_settings):
            assert lora_settings.seed == 1

        @pytest.mark.lora(seed=2)
        class TestClass:
            def test_class_level(self, lora_settings):
                assert lora_settings.seed == 2

            @pytest.mark.lora(seed=3)
            def test_closest_wins(self, lora_settings):
                assert lora_settings.seed == 3
                assert lora_settings.sources["seed"].startswith("marker on")
        """
    )
    lora_pytester.runpytest().assert_outcomes(passed=3)


def test_marker_keyword_typo_is_an_error_not_ignored(lora_pytester: pytest.Pytester) -> None:
    lora_pytester.makepyfile(
        """
        import pytest

        @pytest.mark.lora(sed=3)
        def test_it(lora_settings):
            pass
        """
    )
    result = lora_pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*SettingsError*unknown keyword 'sed'*Did you mean 'seed'?*"])


@pytest.mark.parametrize(
    ("pyproject", "args", "expected"),
    [
        ("", ["--lora-policy", "bad.toml"], "policy file bad.toml is not valid TOML: Unclosed array*"),
        ("[tool.pytest_lora.policy]\nalpha_ration = 2.0\n", [], "*unknown key 'alpha_ration'*'alpha_ratio'*"),
        ("[tool.pytest_lora.policy]\nranks = []\n", [], "*ranks = [] is empty*"),
        (
            "[tool.pytest_lora.policy]\nmin_trainable_pct = 2.0\nmax_trainable_pct = 1.0\n",
            [],
            "*min_trainable_pct = 2.0 is larger than max_trainable_pct = 1.0*",
        ),
        ("", ["--lora-policy", "missing.toml"], "*missing.toml*"),
        ("[tool.pytest_lora]\ndevise = 'cpu'\n", [], "*unknown key 'devise'*'device'*"),
    ],
)
def test_bad_policy_or_settings_is_a_usage_error(
    lora_pytester: pytest.Pytester, pyproject: str, args: list[str], expected: str
) -> None:
    if pyproject:
        lora_pytester.makepyprojecttoml(pyproject)
    (lora_pytester.path / "bad.toml").write_text("alpha_ratio = 2.0\nranks = [4, 8\n")
    lora_pytester.makepyfile("def test_never_runs():\n    raise AssertionError('must not run')\n")
    result = lora_pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: pytest-lora: {expected}"])
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


def test_unknown_device_value_is_a_usage_error(lora_pytester: pytest.Pytester) -> None:
    result = lora_pytester.runpytest("--lora-device", "tpu")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--lora-device*tpu*"])


def test_require_gpu_without_cuda_stops_the_session(lora_pytester: pytest.Pytester) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    lora_pytester.makepyfile("def test_never_runs():\n    raise AssertionError('must not run')\n")
    result = lora_pytester.runpytest("--lora-require-gpu")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--lora-require-gpu is set, but no CUDA device is available*"])


def test_failure_output_is_a_diagnosis_without_library_frames(lora_pytester: pytest.Pytester) -> None:
    lora_pytester.makepyfile(
        CONFIG
        + """
from pytest_lora import assert_param_budget

def test_budget(lora_model):
    assert_param_budget(lora_model(CFG), min_pct=5.0, max_pct=10.0)

def test_typo(lora_model):
    lora_model(LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_prj"]))
"""
    )
    result = lora_pytester.runpytest()
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "E*LoraAssertionError: LoRA parameter budget not met: 3.023% < 5% (min)",
            "E*trainable*7,168*(r=8 on q_proj, v_proj*",
            "E*total*237,120*(4-bit weights counted unpacked*",
            "E*fix: r >= 14 on these targets (now r=8); the smallest policy rank that fits is r=16*",
            "E*AdapterConfigError: LoraConfig.target_modules entry 'v_prj' matches no module*'v_proj'?",
        ]
    )
    out = result.stdout.str()
    assert "site-packages/peft" not in out and "pytest_lora/adapters.py" not in out


def test_one_load_per_session_and_isolation_after_a_failure(lora_pytester: pytest.Pytester) -> None:
    lora_pytester.makepyfile(
        CONFIG
        + """
import pytest
from pytest_lora.model.base_state import BaseState

CLEAN = {}

def test_0_record_clean_base(lora_session, lora_base_model):
    CLEAN["state"] = BaseState.take(lora_base_model)

@pytest.mark.parametrize("i", range(4))
def test_1_fails_midway(lora_train, i):
    result = lora_train(CFG, steps=2)
    raise RuntimeError(f"boom {i} after {len(result.losses)} steps")

def test_2_base_is_clean_again(lora_base_model):
    assert CLEAN["state"].changes(lora_base_model) == []
    assert not any("lora" in name for name, _ in lora_base_model.named_modules())
    assert not hasattr(lora_base_model, "peft_config")
"""
    )
    result = lora_pytester.runpytest()
    result.assert_outcomes(passed=2, failed=4)
    result.stdout.fnmatch_lines(["*base model builtin:tiny-llama on cpu (4-bit nf4*): loaded 1x in *s"])


def test_stray_get_peft_model_on_the_shared_base_is_caught_and_repaired(lora_pytester: pytest.Pytester) -> None:
    lora_pytester.makepyfile(
        CONFIG
        + """
from peft import get_peft_model

def test_a_stray_wrap(lora_base_model):
    get_peft_model(lora_base_model, CFG)

def test_b_next_test_gets_a_clean_base(lora_base_model, lora_model):
    assert not hasattr(lora_base_model, "peft_config")
    model = lora_model(CFG)
    assert model.get_nb_trainable_parameters()[0] == 7168
"""
    )
    result = lora_pytester.runpytest()
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*BaseModelModifiedError: the shared base model was left changed (after *test_a_stray_wrap):",
            "*PEFT adapter layers were left on the base: `get_peft_model(lora_base_model, ...)`*",
            "*pytest-lora restored the base exactly, so the next test gets it as loaded",
        ]
    )


def test_xfail_diagnosis_is_shown_in_the_lora_summary(lora_pytester: pytest.Pytester) -> None:
    lora_pytester.makepyfile(
        """
        import pytest
        from peft import LoraConfig
        from pytest_lora import assert_alpha_ratio

        @pytest.mark.xfail(strict=True, reason="alpha gotcha")
        def test_gotcha():
            assert_alpha_ratio(LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj"]))
        """
    )
    result = lora_pytester.runpytest()
    result.assert_outcomes(xfailed=1)
    result.stdout.fnmatch_lines(
        [
            "*= lora =*",
            "xfail *test_gotcha (expected), its diagnosis:",
            "    LoRA alpha ratio off policy: lora_alpha / r = 8 / 8 = 1, policy wants 2",
            "*fix: lora_alpha = 16 for r=8",
        ]
    )


def test_model_by_local_path_and_per_test_marker(lora_pytester: pytest.Pytester, lora_session) -> None:
    import shutil

    from pytest_lora.model.loading import builtin_model_dir

    local = lora_pytester.path / "models" / "tiny"
    shutil.copytree(builtin_model_dir(lora_session.settings.cache_dir), local)
    lora_pytester.makepyfile(
        CONFIG
        + """
import pytest

def test_default(lora_model):
    assert lora_model(CFG).get_nb_trainable_parameters()[0] == 7168

@pytest.mark.lora(model="models/tiny")
def test_local(lora_model, lora_settings):
    assert lora_settings.model.endswith("models/tiny")
    assert lora_model(CFG).get_nb_trainable_parameters()[0] == 7168

@pytest.mark.lora(model="models/tiny")
def test_local_again(lora_model):
    lora_model(CFG)
"""
    )
    result = lora_pytester.runpytest()
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*base model builtin:tiny-llama *loaded 1x*", "*base model */models/tiny *loaded 1x*"])


@pytest.mark.parametrize(
    ("model", "env", "expected"),
    [
        (
            "some-org/some-model",
            {"HF_HUB_OFFLINE": "1"},
            "*ModelLoadError: --lora-model some-org/some-model: a hub id, but HF_HUB_OFFLINE*",
        ),
    ],
)
def test_bad_model_fails_the_tests_with_a_clear_message(
    lora_pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, model: str, env: dict, expected: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    (lora_pytester.path / "emptydir").mkdir()
    lora_pytester.makepyfile("def test_it(lora_base_model):\n    pass\n")
    result = lora_pytester.runpytest("--lora-model", model)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([expected])
    assert "Traceback" not in result.stdout.str()


def test_verify_base_fails_a_session_that_changed_the_weights(lora_pytester: pytest.Pytester) -> None:
    lora_pytester.makepyfile(
        """
        import torch

        def test_clean(lora_base_model):
            pass

        def test_scribbles_on_the_base(lora_base_model):
            lora_base_model.model.norm.weight.data.add_(1.0)  # `.data` writes bump no version counter

        def test_after(lora_base_model):
            assert float(lora_base_model.model.norm.weight.float().mean()) < 1.5
        """
    )
    result = lora_pytester.runpytest("--lora-verify-base")
    result.assert_outcomes(passed=3, errors=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_scribbles_on_the_base*",
            "*weights: their hash changed with no version-counter bump (a write through `param.data`)*",
            "*the base was reloaded from its checkpoint*",
            "*--lora-verify-base: base weights identical at start and end*",
        ]
    )


def test_verify_base_passes_a_clean_session(lora_pytester: pytest.Pytester) -> None:
    lora_pytester.makepyfile(
        CONFIG + "def test_train(lora_train):\n    lora_train(CFG, steps=2)\n"
        "def test_fails(lora_train):\n    lora_train(CFG, steps=2)\n    raise RuntimeError('midway')\n"
    )
    result = lora_pytester.runpytest("--lora-verify-base")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*--lora-verify-base: base weights identical at start and end*"])


def test_failures_inside_a_benchmark_and_a_given_leave_the_base_as_loaded(lora_pytester: pytest.Pytester) -> None:
    lora_pytester.makepyfile(
        CONFIG
        + """
from hypothesis import given, settings, strategies as st

def test_benchmark_raises_midway(lora_benchmark, lora_base_model):
    def boom(*args):
        raise RuntimeError("fails inside a timed step")

    handle = lora_base_model.lm_head.register_forward_pre_hook(boom)
    try:
        lora_benchmark(CFG, rounds=1, warmup_rounds=0, steps_per_round=1)
    finally:
        handle.remove()

@settings(max_examples=3, database=None)
@given(r=st.sampled_from([4, 8]))
def test_given_raises_inside_an_example(lora_adapters, r):
    from peft import LoraConfig
    with lora_adapters.attached(LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj"])):
        raise RuntimeError("fails inside the example")

def test_train_raises_midway(lora_train):
    lora_train(CFG, steps=2)
    raise RuntimeError("after training")

def test_z_base_is_as_loaded(lora_base_model, lora_model):
    assert not any("lora" in name for name, _ in lora_base_model.named_modules())
    assert lora_model(CFG).get_nb_trainable_parameters()[0] == 7168
"""
    )
    result = lora_pytester.runpytest("--lora-verify-base", "-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=3)
    result.stdout.fnmatch_lines(["*--lora-verify-base: base weights identical at start and end*"])


def test_fixture_types_are_exported_for_annotations(lora_session, lora_adapters, lora_policy, lora_settings) -> None:
    """`from pytest_lora import LoraTrain, ...`: the fixtures' values are of the exported types."""
    import pytest_lora

    assert isinstance(lora_session, pytest_lora.BaseModelPool)
    assert isinstance(lora_adapters, pytest_lora.AdapterManager)
    assert isinstance(lora_policy, pytest_lora.Policy) and isinstance(lora_settings, pytest_lora.Settings)
    from pytest_lora.plugin import fixture_types, sweep

    assert pytest_lora.SweepRun is sweep.SweepRun and pytest_lora.LoraTrain is fixture_types.LoraTrain
    assert {"LoraModelFactory", "LoraTrain", "LoraBenchmark", "SweepRun"} <= set(pytest_lora.__all__)


def test_library_deprecations_from_pytest_loras_calls_are_silenced_the_users_own_warnings_show(
    pytester: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A user project without the repository's filterwarnings: torch's `script_method` and transformers'
    `is_gradient_checkpointing` deprecations come from pytest-lora's own calls and are not shown; the user's
    own DeprecationWarning is. A subprocess: the torch one fires when a process first imports peft, here from the
    test module, as the README's snippets do (`from peft import LoraConfig`) while it is collected."""
    cache = tmp_path_factory.getbasetemp() / "lora-model-cache"
    pytester.makeini(f"[pytest]\naddopts = -p no:randomly\nlora_cache_dir = {cache}\n")
    pytester.makepyfile(
        """
        import warnings

        from peft import LoraConfig

        warnings.warn("the user's import-time warning", UserWarning)

        def test_train(lora_train):
            assert lora_train({"r": 4, "target_modules": ["q_proj"]}, steps=1, batch_size=2, seq_len=16).steps == 1

        def test_own_warning():
            warnings.warn("the user's own deprecation", DeprecationWarning)
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, warnings=2)
    result.stdout.fnmatch_lines(["*UserWarning: the user's import-time warning*"])
    result.stdout.fnmatch_lines(["*DeprecationWarning: the user's own deprecation*"])
    output = result.stdout.str()
    assert "script_method" not in output and "is_gradient_checkpointing" not in output


def test_bitsandbytes_hub_kernel_notice_is_dropped(pytester: pytest.Pytester) -> None:
    """On an AVX512-BF16 CPU, bitsandbytes >= 0.49 asks the `kernels` package (a transformers 5.25 dependency)
    for a hub kernel when it loads, and logs "Failed to load CPU gemm_4bit_forward from kernels-community ...
    trust_remote_code" when it cannot. Simulated here on any CPU by loading its CPU ops again with the check
    forced on; nothing of it reaches the user."""
    pytester.makepyfile(
        """
        import importlib
        import warnings

        def test_reload_cpu_ops_as_on_an_avx512_bf16_cpu(caplog):
            import bitsandbytes.functional as functional
            import bitsandbytes.backends.cpu.ops as ops

            functional.has_avx512bf16 = lambda: True
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch: the ops are registered a second time
                importlib.reload(ops)
            assert not [r.getMessage() for r in caplog.records if "gemm_4bit_forward" in r.getMessage()]
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=1)
    off = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly", "-p", "no:lora")
    off.assert_outcomes(failed=1)  # the control: without pytest-lora the notice is logged


PROGRESS = """
import pytest
import torch
from peft import LoraConfig

def test_bench(lora_benchmark):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    lora_benchmark(config, batch_size=2, seq_len=16, steps_per_round=1, rounds=2, warmup_rounds=1)

@pytest.mark.lora(sweep=[2, 4])
def test_sweep(lora_sweep):
    config = LoraConfig(r=lora_sweep.rank, lora_alpha=2 * lora_sweep.rank, target_modules=["q_proj"])
    ids = torch.randint(0, 256, (64, 16), generator=torch.Generator().manual_seed(0))
    lora_sweep.run(config, steps=1, batch_size=4, seq_len=16, dataset=ids)
"""


@pytest.mark.parametrize("quiet", [False, True], ids=["default", "-q"])
def test_long_steps_print_a_line_each_in_the_terminal_and_q_silences_them(
    lora_pytester: pytest.Pytester, quiet: bool
) -> None:
    """Loading a base, each benchmark round and each sweep rank: one line each, outside the output capture."""
    lora_pytester.makepyfile(PROGRESS)
    result = lora_pytester.runpytest(*(["-q"] if quiet else []), f"--lora-sweep-dir={lora_pytester.path / 'sweeps'}")
    result.assert_outcomes(passed=3)
    lines = [line for line in result.outlines if line.startswith("lora: ") and not line.startswith("lora: model=")]
    lines = [line for line in lines if not line.startswith("lora: policy=")]
    if quiet:
        assert lines == []
        return
    result.stdout.fnmatch_lines(
        [
            "lora: loading base model builtin:tiny-llama (4-bit nf4*",
            "lora: benchmark r=4 alpha=8 q_proj: round 1 of 3 (*s)",
            "lora: benchmark r=4 alpha=8 q_proj: round 2 of 3 (*s)",
            "lora: benchmark r=4 alpha=8 q_proj: round 3 of 3 (*s)",
            "lora: sweep test_*.py::test_sweep: training r=2 (1 steps on *)",
            "lora: sweep test_*.py::test_sweep: training r=4 (1 steps on *)",
        ]
    )
    assert len(lines) == 6, lines
