"""Unit tests of pytest_lora.integrations.strategies and the Hypothesis entry point (no model needed)."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from peft import LoraConfig

from pytest_lora import LoraAssertionError, Policy, assert_policy
from pytest_lora.core.policy import RSLORA_MODES
from pytest_lora.integrations.hypothesis import AfterImport, call_after_import
from pytest_lora.integrations.hypothesis_profile import CI_MAX_EXAMPLES, CI_PROFILE
from pytest_lora.integrations.strategies import (
    LLAMA_TARGETS,
    config_repr,
    invalid_lora_values,
    lora_configs,
    policy_configs,
    typos,
)

TEAM = Policy(ranks=(4, 8, 16), required_targets=("q_proj", "v_proj"), forbidden_targets=("lm_head",))


def _targets(config: LoraConfig) -> set[str]:
    return {config.target_modules} if isinstance(config.target_modules, str) else set(config.target_modules)


def _assert_peft_accepts(config: LoraConfig) -> None:
    """The value rules pytest-lora checks before attaching, and PEFT's cross-field rules."""
    ranks = [config.r, *config.rank_pattern.values()]
    assert all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks)
    assert 0 < config.lora_alpha < math.inf and all(0 < a < math.inf for a in config.alpha_pattern.values())
    assert 0 <= config.lora_dropout < 1
    assert config.bias in ("none", "all", "lora_only")
    assert config.target_modules
    if isinstance(config.target_modules, str):
        assert config.layers_to_transform is None and not config.rank_pattern
    else:
        assert set(config.rank_pattern) <= config.target_modules
    if config.init_lora_weights == "orthogonal":
        assert all(r % 2 == 0 for r in ranks)


# --- lora_configs --------------------------------------------------------------------------------------------


@given(lora_configs())
def test_default_configs_are_accepted_and_paste_back(config):
    _assert_peft_accepts(config)
    assert config.init_lora_weights in (True, False, "gaussian")
    assert config.task_type == "CAUSAL_LM"
    assert eval(config_repr(config), {"LoraConfig": LoraConfig}) == config


@pytest.mark.parametrize(
    ("kwargs", "holds"),
    [
        ({"ranks": 8}, lambda c: c.r == 8 and set(c.rank_pattern.values()) <= {8}),
        ({"ranks": [4, 16]}, lambda c: c.r in (4, 16)),
        ({"ranks": (2, 3)}, lambda c: c.r in (2, 3)),
        ({"ranks": st.just(2)}, lambda c: c.r == 2),
        ({"alpha": 16}, lambda c: c.lora_alpha == 16 and not c.alpha_pattern),
        ({"alpha": [8, 0.5]}, lambda c: c.lora_alpha in (8, 0.5)),
        (
            {"alpha_ratio": 2},
            lambda c: c.lora_alpha == 2 * c.r and all(c.alpha_pattern[k] == 2 * r for k, r in c.rank_pattern.items()),
        ),
        ({"alpha_ratio": [1, 0.5]}, lambda c: c.lora_alpha / c.r in (1, 0.5)),
        ({"target_modules": ["q_proj", "v_proj"]}, lambda c: c.target_modules == {"q_proj", "v_proj"}),
        ({"target_modules": ("k_proj",)}, lambda c: c.target_modules == {"k_proj"}),
        ({"target_modules": [["q_proj"], "all-linear"]}, lambda c: c.target_modules in ({"q_proj"}, "all-linear")),
        ({"target_modules": "all-linear"}, lambda c: c.target_modules == "all-linear" and not c.rank_pattern),
        ({"dropout": 0.1}, lambda c: c.lora_dropout == 0.1),
        ({"bias": "all"}, lambda c: c.bias == "all"),
        ({"use_rslora": True}, lambda c: c.use_rslora),
        ({"rank_pattern": {}}, lambda c: not c.rank_pattern),
        (
            {"rank_pattern": {"q_proj": 4}, "target_modules": ["q_proj", "v_proj"], "alpha_ratio": 2},
            lambda c: c.rank_pattern == {"q_proj": 4} and c.alpha_pattern == {"q_proj": 8},
        ),
        ({"init_lora_weights": "orthogonal"}, lambda c: c.init_lora_weights == "orthogonal"),
        ({"task_type": None}, lambda c: c.task_type is None),
        ({"task_type": "SEQ_CLS"}, lambda c: c.task_type == "SEQ_CLS"),
        ({"layers_to_transform": [0, 1], "target_modules": ["q_proj"]}, lambda c: c.layers_to_transform == [0, 1]),
        # PEFT refuses layers_to_transform with a str target: the strategy drops it there.
        (
            {"layers_to_transform": 1, "target_modules": [["q_proj"], "all-linear"]},
            lambda c: c.layers_to_transform == (None if c.target_modules == "all-linear" else 1),
        ),
    ],
)
@given(data=st.data())
def test_each_argument_takes_a_value_a_list_or_a_strategy(kwargs, holds, data):
    config = data.draw(lora_configs(**kwargs))
    _assert_peft_accepts(config)
    assert holds(config), config_repr(config)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ranks": 0}, "ranks=0: a LoRA rank is an int >= 1"),
        ({"ranks": 2.5}, "ranks=2.5"),
        ({"ranks": True}, "ranks=True"),
        ({"ranks": []}, r"ranks=\[\]: an empty list"),
        ({"ranks": [4, 0]}, "ranks=0"),
        ({"alpha": 0}, "alpha=0: must be a finite number > 0"),
        ({"alpha": math.nan}, "alpha=nan"),
        ({"alpha_ratio": math.inf}, "alpha_ratio=inf"),
        ({"alpha": 16, "alpha_ratio": 2}, "pass one of them"),
        ({"target_modules": []}, r"target_modules=\[\]"),
        ({"target_modules": ""}, 'target_modules="": name modules'),
        ({"target_modules": ["q_proj", ""]}, "target_modules="),
        ({"target_modules": [1, 2]}, "target_modules=1"),
        ({"dropout": 1.0}, r"dropout=1.0: lora_dropout must be a number in \[0, 1\)"),
        ({"dropout": -0.1}, "dropout=-0.1"),
        ({"bias": "some"}, "bias='some': must be one of 'none', 'all', 'lora_only'"),
        ({"use_rslora": "yes"}, "use_rslora='yes': must be True or False"),
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\]=0"),
        ({"init_lora_weights": "pissa"}, "rewrite the base weights"),
        ({"init_lora_weights": "orthogonal", "ranks": [3, 5]}, "needs an even rank"),
        ({"task_type": "CAUSAL"}, "task_type='CAUSAL': must be None or one of PEFT's task types"),
        ({"layers_to_transform": -1}, "layers_to_transform=-1"),
        ({"layers_to_transform": []}, r"layers_to_transform=\[\]"),
    ],
)
def test_bad_arguments_are_refused_when_the_strategy_is_built(kwargs, message):
    with pytest.raises(InvalidArgument, match=message):
        lora_configs(**kwargs)


def test_arguments_are_keyword_only():
    with pytest.raises(TypeError):
        lora_configs(8)  # type: ignore[misc]


def test_values_drawn_from_a_user_strategy_are_checked():
    with pytest.raises(InvalidArgument, match="a value drawn for ranks=0"):
        find(lora_configs(ranks=st.just(0)), lambda c: True)


def test_config_repr_lists_what_differs_from_peft_defaults():
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["v_proj", "q_proj"], task_type="CAUSAL_LM")
    assert (
        config_repr(config)
        == "LoraConfig(r=8, lora_alpha=16, target_modules=['q_proj', 'v_proj'], task_type='CAUSAL_LM')"
    )
    assert config_repr(LoraConfig()) == "LoraConfig(r=8, lora_alpha=8)"


# --- policy_configs ------------------------------------------------------------------------------------------


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    """Policies over the Llama target names, with every rsLoRA mode and tolerances up to 'anything goes'."""
    required = draw(st.lists(st.sampled_from(LLAMA_TARGETS), unique=True, max_size=3))
    rest = [t for t in (*LLAMA_TARGETS, "lm_head") if t not in required]
    low, high = sorted(draw(st.lists(st.floats(0, 0.9), min_size=2, max_size=2)))
    return Policy(
        ranks=tuple(draw(st.lists(st.integers(1, 64), min_size=1, max_size=4, unique=True))),
        alpha_ratio=draw(st.sampled_from([2.0, 1.0]) | st.floats(0.1, 16)),
        alpha_tolerance=draw(st.sampled_from([0.0, 0.01, 0.1, 0.5, 0.99, 1.0, 3.0])),
        rslora=draw(st.sampled_from(RSLORA_MODES)),
        required_targets=tuple(required),
        forbidden_targets=tuple(draw(st.lists(st.sampled_from(rest), unique=True, max_size=2))),
        min_dropout=low,
        max_dropout=high,
    )


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(policy=policies(), data=st.data())
def test_compliant_configs_obey_the_policy(policy, data):
    config = data.draw(policy_configs(policy))
    _assert_peft_accepts(config)
    assert_policy(config, policy)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(policy=policies(), data=st.data())
def test_configs_just_outside_break_the_policy(policy, data):
    config = data.draw(policy_configs(policy, compliant=False))
    _assert_peft_accepts(config)
    with pytest.raises(LoraAssertionError):
        assert_policy(config, policy)


def test_shrinking_lands_on_the_smallest_counterexample():
    outside = find(policy_configs(TEAM, compliant=False), lambda c: True)
    assert config_repr(outside) == (
        "LoraConfig(r=3, lora_alpha=6, target_modules=['q_proj', 'v_proj'], task_type='CAUSAL_LM')"
    )
    # A property that fails only for forbidden targets: the counterexample is the policy's simplest config + lm_head.
    forbidden = find(policy_configs(TEAM, compliant=False), lambda c: "lm_head" in c.target_modules)
    assert config_repr(forbidden) == (
        "LoraConfig(r=4, lora_alpha=8, target_modules=['lm_head', 'q_proj', 'v_proj'], task_type='CAUSAL_LM')"
    )
    inside = find(policy_configs(TEAM), lambda c: c.r >= 8 and c.use_rslora)
    assert config_repr(inside) == (
        "LoraConfig(r=8, lora_alpha=5.656854249492381, target_modules=['q_proj', 'v_proj'], "
        "task_type='CAUSAL_LM', use_rslora=True)"
    )


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (({"ranks": [8]},), {}, "pass a pytest_lora.Policy"),
        ((TEAM,), {"compliant": "no"}, "compliant='no'"),
        ((TEAM,), {"target_modules": "q_proj"}, "pass the module names to draw from"),
        ((TEAM,), {"target_modules": []}, r"target_modules=\[\]"),
        ((Policy(forbidden_targets=("q_proj",)),), {"target_modules": ["q_proj"]}, "every name is forbidden"),
    ],
)
def test_policy_configs_validates_its_arguments(args, kwargs, message):
    with pytest.raises(InvalidArgument, match=message):
        policy_configs(*args, **kwargs)


# --- invalid_lora_values -------------------------------------------------------------------------------------


@given(invalid_lora_values())
def test_each_invalid_value_is_the_one_wrong_field(bad):
    config = bad.config
    if bad.field in ("r", "lora_alpha", "lora_dropout"):
        actual = getattr(config, bad.field)
        assert actual is bad.value or (actual != actual and bad.value != bad.value)  # NaN is not equal to itself
    elif bad.field == "target_modules":
        assert (bad.value == [] and not config.target_modules) or bad.value in config.target_modules
        assert bad.value not in LLAMA_TARGETS
    else:
        assert bad.field == "rank_pattern" and bad.value in config.rank_pattern
        assert bad.value not in config.target_modules


def test_a_misspelled_target_is_never_a_real_layer():
    """Drawn from a subset of a model's layers (["q_proj"]), o_proj is one edit away and a real layer."""
    found = typos("q_proj", ["q_proj"])
    assert {"q_pro", "q_prjo", "qq_proj", "w_proj"} <= set(found)
    assert not {"o_proj", "k_proj", "v_proj", "q_proj", ""} & set(found)
    assert typos("q", ["q"]) and not {"k", "v", "o", "q"} & set(typos("q", ["q"]))


def test_invalid_values_validate_their_argument():
    with pytest.raises(InvalidArgument, match="pass the module names"):
        invalid_lora_values(target_modules="q_proj")


# --- the entry point: from_type, the profile, no import side effects -----------------------------------------


def test_from_type_draws_from_lora_configs():
    config = find(st.from_type(LoraConfig), lambda c: True)
    _assert_peft_accepts(config)
    assert _targets(config) <= {*LLAMA_TARGETS, "all-linear"}


def test_lora_ci_profile():
    profile = settings.get_profile(CI_PROFILE)
    assert (profile.derandomize, profile.database, profile.deadline) == (True, None, None)
    assert profile.max_examples == CI_MAX_EXAMPLES
    assert HealthCheck.too_slow in profile.suppress_health_check
    assert HealthCheck.function_scoped_fixture not in profile.suppress_health_check


def test_lora_ci_profile_loads_from_the_command_line(pytester):
    pytester.makepyfile(
        """
        from hypothesis import settings

        def test_profile():
            assert settings.default.max_examples == 25 and settings.default.derandomize
        """
    )
    # A subprocess: loading a profile in-process would change the outer session's settings.
    pytester.runpytest_subprocess("--hypothesis-profile=lora-ci", "-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_after_import_calls_back_once_the_module_ran(tmp_path, monkeypatch):
    package = tmp_path / "pytest_lora_probe_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    seen = []
    call_after_import("pytest_lora_probe_pkg", lambda module: seen.append(module.VALUE))
    call_after_import("pytest_lora_probe_pkg", lambda module: seen.append("twice"))  # one hook per name
    assert seen == []
    try:
        import pytest_lora_probe_pkg

        assert seen == [42]
        assert not any(isinstance(f, AfterImport) for f in sys.meta_path)
        assert type(pytest_lora_probe_pkg.__loader__).__name__ == "SourceFileLoader"
        call_after_import("pytest_lora_probe_pkg", lambda module: seen.append("now"))
        assert seen == [42, "now"]
    finally:
        sys.modules.pop("pytest_lora_probe_pkg", None)


def test_importing_hypothesis_imports_no_torch_and_from_type_works_after_peft():
    """The entry point runs at `import hypothesis`: peft must load only when the user imports it."""
    code = textwrap.dedent(
        """
        import sys
        import hypothesis
        import pytest_lora
        from hypothesis import settings, strategies as st
        heavy = sorted({"torch", "peft", "transformers", "pytest_lora.integrations.strategies"} & set(sys.modules))
        assert not heavy, heavy
        assert settings.get_profile("lora-ci").max_examples == 25
        from peft import LoraConfig
        config = st.from_type(LoraConfig).example()
        assert isinstance(config, LoraConfig) and config.task_type == "CAUSAL_LM", config
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
