"""The whole policy space, not three hand-picked configs: run with `pytest -m lora examples/`.

Hypothesis draws configs from the team policy in pyproject.toml (`lora_policy`) and attaches each to the
session's 4-bit base through the session-scoped `lora_adapters` fixture, which detaches after every example.
A failure is reported as the smallest config that breaks the rule, as code: `Draw 1: LoraConfig(r=3, ...)`.
In CI: `pytest -m lora examples/ --hypothesis-profile=lora-ci` (derandomized, 25 examples per test).
"""

import pytest
from hypothesis import given, note
from hypothesis import strategies as st

from pytest_lora import (
    AdapterConfigError,
    LoraAssertionError,
    assert_adapter_shapes,
    assert_alpha_ratio,
    assert_param_budget,
    assert_policy,
)
from pytest_lora.strategies import invalid_lora_values, policy_configs

pytestmark = pytest.mark.lora

# The modules this team adapts. The policy's budget (1% .. 10% of this tiny model) holds for every allowed
# rank on the attention projections q, k, v; adding o_proj at r=16 would make it 11%.
TARGETS = ["q_proj", "k_proj", "v_proj"]
CHECKS = {
    "assert_param_budget": assert_param_budget,
    "assert_alpha_ratio": assert_alpha_ratio,
    "assert_adapter_shapes": assert_adapter_shapes,
    "assert_policy": assert_policy,
}


@given(data=st.data())
def test_every_compliant_config_passes(lora_adapters, lora_policy, data):
    """(1) Inside the policy: right rank, alpha = 2r, q_proj and v_proj targeted, dropout <= 0.2."""
    config = data.draw(policy_configs(lora_policy, target_modules=TARGETS))
    with lora_adapters.attached(config) as model:
        assert_param_budget(model)
        assert_alpha_ratio(model)
        assert_adapter_shapes(model)
        assert_policy(model)
    lora_adapters.assert_clean("after the example")


@given(data=st.data())
def test_every_config_just_outside_is_caught(lora_adapters, lora_policy, data):
    """(2) One rule broken by a small step (r=3, alpha off by 1%, lm_head targeted, ...): some check fails."""
    config = data.draw(policy_configs(lora_policy, compliant=False, target_modules=TARGETS))
    caught = []
    with lora_adapters.attached(config) as model:
        for name, check in CHECKS.items():
            try:
                check(model)
            except LoraAssertionError:
                caught.append(name)
    note(f"caught by: {caught}")
    assert caught, "a config outside the policy passed every check"
    lora_adapters.assert_clean("after the example")


@given(bad=invalid_lora_values(target_modules=TARGETS))
def test_wrong_values_are_refused_with_a_clear_message(lora_adapters, bad):
    """(3) r=0, dropout=1.5, a misspelled target, ...: pytest-lora refuses them before PEFT sees them."""
    with pytest.raises(AdapterConfigError, match=bad.field) as info:
        lora_adapters.attach(bad.config)
    assert repr(bad.value) in str(info.value)
    lora_adapters.assert_clean("after the refused config")
