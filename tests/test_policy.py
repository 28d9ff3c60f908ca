"""Unit tests of pytest_lora.core.policy: loading, defaults, and one clear PolicyError for every bad policy."""

from __future__ import annotations

import math
import textwrap
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_lora.core.curves import OverfitRule, PlateauRule
from pytest_lora.core.errors import PolicyError
from pytest_lora.core.policy import (
    Policy,
    SweepRule,
    load_policy,
    policy_from_mapping,
    policy_from_pyproject,
)
from pytest_lora.core.recipe import MemoryRecipe

SOURCE = "pyproject.toml [tool.pytest_lora.policy]"


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def error_of(data: object) -> str:
    with pytest.raises(PolicyError) as info:
        policy_from_mapping(data, SOURCE)  # type: ignore[arg-type]
    return str(info.value)


def test_defaults():
    policy = Policy()
    assert policy.ranks == (4, 8, 16)
    assert (policy.min_trainable_pct, policy.max_trainable_pct) == (0.05, 1.0)
    assert (policy.alpha_ratio, policy.alpha_tolerance, policy.rslora) == (2.0, 0.0, "scaling")
    assert policy.required_targets == policy.forbidden_targets == ()
    assert (policy.min_dropout, policy.max_dropout) == (0.0, 0.5)
    assert policy.memory_budget_gb is policy.base_model is policy.resume_rank is None
    assert (policy.plateau, policy.overfit, policy.sweep) == (PlateauRule(), OverfitRule(), SweepRule())
    assert policy.sweep == SweepRule((4, 8, 16), 0.95, 0.70, 30, 0.1, "val_loss", False)
    assert policy.source == "<defaults>"
    assert policy_from_mapping({}, "x.toml") == Policy(source="x.toml")


def test_standalone_file_full(tmp_path):
    path = write(
        tmp_path / "team.toml",
        """
        ranks = [8, 16]
        min_trainable_pct = 0          # a TOML int is a fine float
        max_trainable_pct = 2.5
        alpha_ratio = 1
        alpha_tolerance = 0.1
        rslora = "forbid"
        required_targets = ["q_proj", "v_proj"]
        forbidden_targets = ["lm_head"]
        min_dropout = 0.05
        max_dropout = 0.1
        memory_budget_gb = 12
        base_model = "org/model"
        resume_rank = 8

        [plateau]
        window = 7
        mode = "abs"

        [overfit]
        tolerance = 0.1

        [sweep]
        ranks = [2, 4]
        steps = 10
        higher_is_better = true
        """,
    )
    policy = load_policy(path)
    assert policy.ranks == (8, 16)
    assert policy.min_trainable_pct == 0.0 and isinstance(policy.min_trainable_pct, float)
    assert policy.alpha_ratio == 1.0 and isinstance(policy.alpha_ratio, float)
    assert policy.memory_budget_gb == 12.0
    assert policy.required_targets == ("q_proj", "v_proj")
    assert policy.plateau == PlateauRule(window=7, mode="abs")
    assert policy.overfit == OverfitRule(tolerance=0.1)
    assert policy.sweep == SweepRule(ranks=(2, 4), steps=10, higher_is_better=True)
    assert policy.source == str(path)
    hash(policy)  # frozen and made of tuples: usable as a cache key


def test_pyproject_given_directly_uses_its_policy_table(tmp_path):
    path = write(
        tmp_path / "pyproject.toml",
        """
        [project]
        name = "x"

        [tool.pytest_lora]
        device = "cpu"

        [tool.pytest_lora.policy]
        ranks = [32]
        """,
    )
    policy = load_policy(path)
    assert policy.ranks == (32,)
    assert policy.source == f"{path} [tool.pytest_lora.policy]"
    assert policy_from_pyproject(path) == policy


def test_pyproject_without_policy_table(tmp_path):
    path = write(tmp_path / "pyproject.toml", '[tool.pytest_lora]\ndevice = "cpu"\n')
    assert policy_from_pyproject(path) is None
    with pytest.raises(PolicyError, match=r"no \[tool\.pytest_lora\.policy\] table"):
        load_policy(path)
    path = write(tmp_path / "other.toml", '[project]\nname = "x"\n')
    assert policy_from_pyproject(path) is None


def test_pyproject_policy_path_string_is_not_a_table(tmp_path):
    path = write(tmp_path / "pyproject.toml", '[tool.pytest_lora]\npolicy = "team.toml"\n')
    assert policy_from_pyproject(path) is None  # a path: the settings resolve it, load_policy reads it


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(PolicyError) as info:
        load_policy(missing)
    message = str(info.value)
    assert str(missing) in message and "does not exist" in message and "--lora-policy" in message


def test_malformed_toml_names_file_line_and_column(tmp_path):
    path = write(tmp_path / "team.toml", "ranks = [4, 8\nalpha_ratio = 2\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    message = str(info.value)
    assert str(path) in message and "not valid TOML" in message
    assert "line 2, column" in message


def test_malformed_pyproject(tmp_path):
    path = write(tmp_path / "pyproject.toml", "[tool.pytest_lora.policy\n")
    with pytest.raises(PolicyError, match=r"pyproject\.toml is not valid TOML: .*line 1"):
        policy_from_pyproject(path)


def test_unknown_key_did_you_mean_and_valid_keys():
    message = error_of({"alpha_ration": 2.0})
    assert message.startswith(f"{SOURCE} unknown key 'alpha_ration' = 2.0. Did you mean 'alpha_ratio'? ")
    assert "Valid keys: alpha_ratio, alpha_tolerance, base_model," in message
    assert "source" not in message.split("Valid keys:")[1]  # not a TOML key


def test_source_is_not_a_toml_key():
    assert "unknown key 'source'" in error_of({"source": "x"})


def test_unknown_key_without_close_match():
    message = error_of({"zzz": 1})
    assert "unknown key 'zzz' = 1." in message and "Did you mean" not in message


def test_unknown_nested_key_is_dotted():
    message = error_of({"plateau": {"windw": 3}})
    assert "unknown key 'plateau.windw' = 3. Did you mean 'plateau.window'?" in message
    assert "Valid keys: plateau.min_delta," in message


def test_nested_tables_follow_the_curves_fields():
    for name, rule in (("plateau", PlateauRule), ("overfit", OverfitRule)):
        message = error_of({name: {"nope": 1}})
        for f in fields(rule):
            assert f"{name}.{f.name}" in message


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"ranks": "4,8"}, "ranks = '4,8' is a string; expected a list of integers, e.g. [4, 8, 16]."),
        ({"ranks": 8}, "ranks = 8 is an integer; expected a list of integers"),
        (
            {"ranks": [4, True]},
            "ranks = [4, true] has item 1 = true that is a boolean; expected a list of integers",
        ),
        ({"ranks": [4, 8.0]}, "has item 1 = 8.0 that is a number"),
        ({"alpha_ratio": True}, "alpha_ratio = true is a boolean; expected a number, e.g. 0.5."),
        ({"alpha_ratio": "2"}, "alpha_ratio = '2' is a string; expected a number"),
        ({"resume_rank": 8.0}, "resume_rank = 8.0 is a number; expected an integer, e.g. 8."),
        ({"resume_rank": False}, "resume_rank = false is a boolean; expected an integer"),
        ({"rslora": True}, "rslora = true is a boolean; expected a string"),
        (
            {"required_targets": "q_proj"},
            "required_targets = 'q_proj' is a string; expected a list of strings",
        ),
        (
            {"sweep": {"higher_is_better": 1}},
            "sweep.higher_is_better = 1 is an integer; expected true or false",
        ),
        ({"plateau": {"window": 2.5}}, "plateau.window = 2.5 is a number; expected an integer"),
    ],
)
def test_type_errors(data, expected):
    message = error_of(data)
    assert message.startswith(SOURCE)
    assert expected in message


def test_int_is_a_float_but_bool_is_not_an_int():
    policy = policy_from_mapping({"alpha_ratio": 3, "plateau": {"min_delta": 1}}, SOURCE)
    assert policy.alpha_ratio == 3.0 and type(policy.alpha_ratio) is float
    assert type(policy.plateau.min_delta) is float


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"min_trainable_pct": -1}, "min_trainable_pct = -1.0 is out of range; use a value in [0, 100]"),
        ({"max_trainable_pct": 101}, "max_trainable_pct = 101.0 is out of range"),
        ({"alpha_ratio": 0}, "alpha_ratio = 0.0 is out of range; use a value > 0"),
        ({"alpha_tolerance": -0.1}, "alpha_tolerance = -0.1 is out of range; use a value >= 0"),
        ({"max_dropout": 1.0}, "max_dropout = 1.0 is out of range; use a value in [0, 1)"),
        ({"min_dropout": -0.1}, "min_dropout = -0.1 is out of range"),
        ({"memory_budget_gb": 0}, "memory_budget_gb = 0.0 is out of range; use a value in (0, 1048576]"),
        ({"resume_rank": 0}, "resume_rank = 0 is out of range; use a value >= 1"),
        ({"rslora": "sometimes"}, "rslora = 'sometimes' is not one of scaling, alpha, forbid"),
        ({"base_model": ""}, 'base_model = "" is empty'),
        ({"required_targets": ["q_proj", ""]}, "required_targets = ['q_proj', ''] has an empty name"),
        ({"alpha_ratio": math.nan}, "alpha_ratio = nan is out of range: NaN and infinity are not allowed"),
        ({"max_dropout": math.inf}, "max_dropout = inf is out of range"),
        ({"plateau": {"oscillation": -math.inf}}, "plateau.oscillation = -inf is out of range"),
        ({"memory_budget_gb": 10**400}, "is out of range: too large for a float"),
        ({"memory_budget_gb": 1e308}, "memory_budget_gb = 1e+308 is out of range; use a value in (0, 1048576]"),
        ({"resume_rank": 2**63}, "is out of range: TOML integers are 64-bit"),
        ({"sweep": {"steps": 0}}, "sweep: steps = 0 is out of range; use a value >= 1."),
        ({"sweep": {"dataset": "builtin:planted-rank-0"}}, "sweep: dataset = 'builtin:planted-rank-0' is no built-in"),
        ({"sweep": {"dataset": "builtin:nope"}}, "sweep: dataset = 'builtin:nope' is no built-in dataset; use 'bu"),
        (
            {"sweep": {"metric_fraction": 0}},
            "sweep: metric_fraction = 0.0 is out of range; use a value in (0, 1]",
        ),
        ({"sweep": {"time_fraction": 1.5}}, "sweep: time_fraction = 1.5 is out of range"),
        ({"sweep": {"data_fraction": 0}}, "sweep: data_fraction = 0.0 is out of range"),
        ({"sweep": {"metric": ""}}, 'sweep: metric = "" is empty'),
    ],
)
def test_out_of_range(data, expected):
    message = error_of(data)
    assert message.startswith(SOURCE)
    assert expected in message


def test_min_larger_than_max():
    assert error_of({"min_trainable_pct": 2.0}) == (
        f"{SOURCE} min_trainable_pct = 2.0 is larger than max_trainable_pct = 1.0; "
        "lower min_trainable_pct or raise max_trainable_pct."
    )
    assert "min_dropout = 0.4 is larger than max_dropout = 0.3" in error_of({"min_dropout": 0.4, "max_dropout": 0.3})


@pytest.mark.parametrize(
    ("ranks", "expected"),
    [
        ([], "ranks = [] is empty; list at least one rank"),
        ([4, 0], "ranks = [4, 0] has rank 0; LoRA ranks are integers >= 1"),
        ([-8], "has rank -8"),
        ([4, 8, 4], "ranks = [4, 8, 4] lists rank 4 twice; list each rank once"),
    ],
)
def test_bad_ranks(ranks, expected):
    assert expected in error_of({"ranks": ranks})
    assert expected.replace("ranks =", "sweep: ranks =") in error_of({"sweep": {"ranks": ranks}})


def test_overlapping_targets():
    message = error_of({"required_targets": ["q_proj", "v_proj"], "forbidden_targets": ["v_proj"]})
    assert message == (
        f"{SOURCE} required_targets and forbidden_targets both list 'v_proj'; remove it from one of them."
    )


@pytest.mark.parametrize("name", ["plateau", "overfit", "sweep", "memory"])
def test_subtable_that_is_not_a_table(name):
    message = error_of({name: 3})
    assert message.startswith(f"{SOURCE} {name} = 3 is not a table; it must be a table of keys: ")


def test_not_a_table_at_all():
    assert "the policy = [1] is not a table" in error_of([1])


def test_curves_value_error_becomes_policy_error_naming_the_table():
    message = error_of({"plateau": {"window": 0}})
    assert message.startswith(f"{SOURCE} plateau: ")
    assert "window" in message and "0" in message
    message = error_of({"overfit": {"mode": "relative"}})
    assert message.startswith(f"{SOURCE} overfit: ") and "'relative'" in message


def test_non_string_key():
    assert error_of({1: 2}).startswith(f"{SOURCE} key 1 is not a string. Valid keys: alpha_ratio,")


def test_huge_values_print_safely():
    message = error_of({"ranks": [10**5000]})
    assert "-bit integer>" in message and "out of range" in message


def test_long_values_are_elided():
    assert len(error_of({"base_model": ["x" * 10_000]})) < 400


@pytest.mark.parametrize(
    ("rslora", "use_rslora", "expected"),
    [
        ("scaling", False, 32.0),
        ("scaling", True, 8.0),  # alpha / sqrt(16) == 2.0
        ("alpha", True, 32.0),
        ("forbid", False, 32.0),
        ("forbid", True, None),
    ],
)
def test_expected_alpha(rslora, use_rslora, expected):
    assert Policy(rslora=rslora).expected_alpha(16, use_rslora) == expected


def test_describe():
    policy = Policy(
        ranks=(8, 16),
        alpha_tolerance=0.05,
        rslora="forbid",
        required_targets=("q_proj",),
        forbidden_targets=("lm_head",),
        memory_budget_gb=12.0,
        resume_rank=8,
        source="team.toml",
    )
    text = "\n".join(policy.describe())
    for part in (
        "policy: team.toml",
        "ranks: 8, 16",
        "0.05% to 1.0% of all parameters",
        "lora_alpha / r = 2.0 (± 5.0%)",
        "rsLoRA (use_rslora=True) is forbidden",
        "required target modules: q_proj",
        "forbidden target modules: lm_head",
        "memory budget: 12.0 GB",
        "resume rank: 8",
        "plateau: window=5",
        "overfit: tolerance=0.02",
        "sweep: ranks=(4, 8, 16)",
    ):
        assert part in text
    assert "(exact)" in "\n".join(Policy().describe())
    assert "the session model" in "\n".join(Policy().describe())


def test_memory_recipe_table(tmp_path):
    path = write(
        tmp_path / "pyproject.toml",
        """
        [tool.pytest_lora.policy]
        memory_budget_gb = 24

        [tool.pytest_lora.policy.memory]
        optimizer = "paged_adamw_8bit"
        adapter_dtype = "bfloat16"
        autocast = "bfloat16"
        gradient_checkpointing = true
        attention = "sdpa"
        device = "cuda"
        """,
    )
    policy = policy_from_pyproject(path)
    assert policy.memory == MemoryRecipe(
        optimizer="paged_adamw_8bit",
        adapter_dtype="bfloat16",
        autocast="bfloat16",
        gradient_checkpointing=True,
        attention="sdpa",
        device="cuda",
    )
    assert "memory: optimizer='paged_adamw_8bit', adapter_dtype='bfloat16'" in "\n".join(policy.describe())
    assert Policy().memory == MemoryRecipe()


@pytest.mark.parametrize(
    ("memory", "expected"),
    [
        ({"optimizer": "lion"}, "memory: optimizer='lion' is not one of adamw, adam, adamw_torch, "),
        ({"adapter_dtype": "fp8"}, "memory: adapter_dtype='fp8' is not one of float32, bfloat16, float16; use one"),
        ({"master_weights": True, "adapter_dtype": "float32"}, "memory: master_weights=true needs 16-bit adapters"),
        ({"device": "gpu"}, "memory: device='gpu' is not one of auto, cuda, cpu; use one of those."),
        ({"gradient_checkpointing": "yes"}, "memory.gradient_checkpointing = 'yes' is a string; expected true or"),
        ({"optimiser": "sgd"}, "unknown key 'memory.optimiser' = 'sgd'. Did you mean 'memory.optimizer'?"),
    ],
)
def test_memory_recipe_errors(memory, expected):
    message = error_of({"memory": memory})
    assert message.startswith(SOURCE) and expected in message, message


def test_direct_construction_validates():
    with pytest.raises(ValueError, match="ranks = \\[\\] is empty"):
        Policy(ranks=())
    with pytest.raises(ValueError, match="steps = 0"):
        SweepRule(steps=0)


# --- the robustness contract: any mapping gives a Policy or a PolicyError --------------------------------

_TOP_KEYS = [f.name for f in fields(Policy)]  # "source" included: it must be rejected too
_KEYS = sorted(
    {f.name for cls in (PlateauRule, OverfitRule, SweepRule, MemoryRecipe) for f in fields(cls)} | {*_TOP_KEYS}
)
_ODD_KEYS = st.one_of(st.text(max_size=6), st.integers(), st.none(), st.sampled_from(["alpha_ration", "tool"]))


def _mostly(valid: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    """`valid` nine times in ten, else an odd key: deep enough to reach the value checks, odd enough to
    hit the key checks."""
    return st.integers(0, 9).flatmap(lambda i: _ODD_KEYS if i == 0 else valid)


_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, 1, 8, -1, 2**63, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(0, 1),  # plausible fractions and percents, so valid policies come out too
    st.text(max_size=8),
    st.sampled_from(["scaling", "alpha", "forbid", "rel", "abs", "q_proj", "", "bfloat16", "paged_adamw_8bit", "cuda"]),
    st.datetimes(),
    st.dates(),
    st.times(),
)
_VALUES = st.recursive(
    _SCALARS | st.lists(st.integers(1, 64), min_size=1, max_size=3, unique=True),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(_mostly(st.sampled_from(_KEYS)), children, max_size=4)
    ),
    max_leaves=12,
)
_POLICY_TABLES = st.dictionaries(_mostly(st.sampled_from(_TOP_KEYS)), _VALUES, max_size=5)


@settings(max_examples=200, deadline=None)
@given(_POLICY_TABLES)
def test_any_mapping_gives_a_policy_or_a_policy_error(data):
    try:
        policy = policy_from_mapping(data, SOURCE)
    except PolicyError as exc:
        assert str(exc).startswith(SOURCE)
    else:
        assert all(isinstance(line, str) for line in policy.describe())
