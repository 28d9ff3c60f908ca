"""Property tests of pytest-lora itself, with its own strategies, on the real 4-bit tiny base.

Model tests use the session-scoped `lora_adapters` fixture (no function-scoped fixture under `@given`) and
check after every example that the shared base is exactly as loaded. Run with `--hypothesis-profile=lora-ci`
in CI: the example counts come from the profile, never from the tests.
"""

from __future__ import annotations

import math
import re
import string

import pytest
from hypothesis import example, given, note, settings
from hypothesis import strategies as st
from peft import LoraConfig

from pytest_lora import (
    AdapterConfigError,
    CurveError,
    LoraAssertionError,
    ParamCount,
    PlateauRule,
    Policy,
    PolicyError,
    assert_no_plateau,
    count_parameters,
    load_policy,
    use_policy,
)
from pytest_lora.integrations.strategies import config_repr, invalid_lora_values

# Attaching an adapter costs tens of milliseconds on a loaded CPU: no per-example deadline.
model_settings = settings(deadline=None)


# --- counting and refusing, on the model ------------------------------------------------------------------


@model_settings
@given(config=st.from_type(LoraConfig))
def test_count_equals_peft_for_any_config(lora_adapters, config):
    """`st.from_type(LoraConfig)` is pytest-lora's registered strategy: PEFT's whole option space."""
    note(config_repr(config))
    with lora_adapters.attached(config) as model:
        trainable, total = model.get_nb_trainable_parameters()
        assert count_parameters(model) == ParamCount(trainable, total)
    lora_adapters.assert_clean("after a Hypothesis example")


@model_settings
@given(bad=invalid_lora_values())
def test_invalid_values_are_refused_before_peft(lora_adapters, bad):
    with pytest.raises(AdapterConfigError) as info:
        lora_adapters.attach(bad.config)
    message = str(info.value)
    assert bad.field in message and repr(bad.value) in message, message
    assert lora_adapters.active is None
    lora_adapters.assert_clean("after a refused config")


# --- assert_no_plateau: verdicts through the public assertion -----------------------------------------------


def _outcome(losses: list[float]) -> str:
    """The verdict: "pass", the head of the LoraAssertionError (its kind), or "CurveError"."""
    try:
        assert_no_plateau(losses)
    except LoraAssertionError as exc:
        return str(exc).split(":", 1)[0]
    except CurveError:
        return "CurveError"
    return "pass"


@st.composite
def positive_curves(draw: st.DrawFn) -> list[float]:
    """Loss-like curves: a level, a drift anywhere from rising to falling fast, per-step noise."""
    n = draw(st.integers(2, 40))
    level = draw(st.floats(0.01, 100.0))
    drift = draw(st.floats(-0.5, 0.9))
    amplitude = draw(st.sampled_from([0.0, 0.001, 0.05, 0.3]))
    noise = draw(st.lists(st.floats(-1.0, 1.0), min_size=n, max_size=n))
    return [level * (1 - drift * i / n) * (1 + amplitude * e) for i, e in enumerate(noise)]


@st.composite
def clear_curves(draw: st.DrawFn) -> list[float]:
    """Curves far from every threshold: falling by >= 20%, or flat within 0.1% noise."""
    n = draw(st.integers(20, 40))
    drop = draw(st.sampled_from([0.0, 0.2, 0.5]))
    noise = draw(st.lists(st.floats(-0.001, 0.001), min_size=n, max_size=n))
    return [(1 - drop * i / n) * (1 + e) for i, e in enumerate(noise)]


@given(positive_curves(), st.integers(-40, 40))
def test_no_plateau_outcome_is_the_same_at_any_power_of_two_scale(losses, k):
    """Scaling by 2**k is exact in floating point, so even curves on a threshold keep their verdict."""
    with use_policy(Policy()):
        assert _outcome([math.ldexp(x, k) for x in losses]) == _outcome(losses)


@given(clear_curves(), st.floats(1e-6, 1e6))
def test_no_plateau_outcome_is_the_same_at_any_positive_scale(losses, factor):
    with use_policy(Policy()):
        outcome = _outcome(losses)
        assert outcome in ("pass", "LoRA training loss plateaued (flat)")
        assert _outcome([x * factor for x in losses]) == outcome


@given(
    st.floats(1e-6, 1e6),
    st.floats(0.05, 0.95),
    st.integers(PlateauRule().min_points + PlateauRule().window, 80),
)
def test_strictly_decreasing_geometric_curve_always_passes(start, q, n):
    with use_policy(Policy()):
        assert_no_plateau([start * q**i for i in range(n)])


@given(
    st.floats(1e-6, 1e6) | st.floats(-1e6, -1e-6),
    st.integers(PlateauRule().min_points + PlateauRule().window, 80),
)
def test_constant_curve_always_fails_as_flat(level, n):
    with use_policy(Policy()), pytest.raises(LoraAssertionError, match=r"plateaued \(flat\)"):
        assert_no_plateau([level] * n)


# --- load_policy fed arbitrary TOML documents ---------------------------------------------------------------

_POLICY_KEYS = [
    "ranks",
    "min_trainable_pct",
    "max_trainable_pct",
    "alpha_ratio",
    "alpha_tolerance",
    "rslora",
    "required_targets",
    "forbidden_targets",
    "min_dropout",
    "max_dropout",
    "memory_budget_gb",
    "base_model",
    "resume_rank",
    "plateau",
    "overfit",
    "sweep",
    "window",
    "mode",
    "metric",
]
_KEYS = st.sampled_from(_POLICY_KEYS) | st.text(string.ascii_letters + "_-. \"'", min_size=1, max_size=8)
_SCALARS = st.one_of(
    st.integers(-(2**64), 2**64),
    st.sampled_from([0, 1, 4, 8, 16, -1]),
    st.floats(),
    st.floats(0, 1),
    st.booleans(),
    st.text(max_size=10),
    st.sampled_from(["scaling", "alpha", "forbid", "rel", "abs", "q_proj", "val_loss"]),
    st.datetimes(),
    st.dates(),
    st.times(),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=3),
    max_leaves=10,
)
_TABLES = st.dictionaries(_KEYS, _VALUES, max_size=6)


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def _toml_string(text: str) -> str:
    escaped = "".join(
        {'"': '\\"', "\\": "\\\\"}.get(c, c) if c >= " " and c != "\x7f" else f"\\u{ord(c):04x}" for c in text
    )
    return f'"{escaped}"'


def _toml_value(value: object) -> str:
    """A TOML literal: floats as TOML spells them (inf, nan), tables inline, datetimes in ISO form."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml_value, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return value.isoformat()  # type: ignore[attr-defined]


def _toml_document(table: dict[str, object], header: str | None) -> str:
    """Top-level keys (under `[header]` when given), subtables as `[header.key]` sections."""
    plain = {k: v for k, v in table.items() if not isinstance(v, dict)}
    lines = [f"[{header}]"] if header else []
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in plain.items()]
    for key, sub in table.items():
        if isinstance(sub, dict):
            name = f"{header}.{_toml_key(key)}" if header else _toml_key(key)
            lines += [f"[{name}]", *(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in sub.items())]
    return "\n".join(lines) + "\n"


@st.composite
def toml_documents(draw: st.DrawFn) -> bytes:
    """Policy files as users write them, pyproject.toml-style ones, and broken ones (cut, spliced, random)."""
    header = draw(st.sampled_from([None, "tool.pytest_lora.policy", "tool.pytest_lora", "tool"]))
    text = _toml_document(draw(_TABLES), header)
    damage = draw(st.sampled_from(["none", "none", "cut", "splice", "text", "bytes"]))
    if damage == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    elif damage == "splice":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(max_size=5)) + text[at:]
    elif damage == "text":
        text = draw(st.text())
    elif damage == "bytes":
        return draw(st.binary())
    return text.encode("utf-8", "surrogatepass")


@pytest.fixture(scope="session")
def policy_file(tmp_path_factory):
    """One file, rewritten by every example (a session fixture: no function-scoped fixture under @given)."""
    return tmp_path_factory.mktemp("policy-documents") / "policy.toml"


@given(document=toml_documents())
@example(document=b"ranks = [4, 8, 16]\nalpha_ratio = 2\n[plateau]\nwindow = 3\n")
@example(document=b"[tool.pytest_lora.policy]\nranks = [0]\n")
@example(document=b"ranks = [4, 8\n")
@example(document=b"\xff\xfe")
def test_load_policy_raises_only_policy_error(policy_file, document):
    policy_file.write_bytes(document)
    try:
        policy = load_policy(policy_file)
    except PolicyError as exc:
        assert str(policy_file) in str(exc), exc
    else:
        assert policy.source.startswith(str(policy_file))


def test_deeply_nested_toml_is_a_policy_error(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text("ranks = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_policy(path)
