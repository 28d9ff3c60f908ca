"""The rank guide's validation steps, as tests: run with `pytest -m lora examples/`."""

import pytest
from peft import LoraConfig

from pytest_lora import (
    LoraModelFactory,
    LoraTrain,
    assert_adapter_shapes,
    assert_alpha_ratio,
    assert_no_plateau,
    assert_param_budget,
)

pytestmark = pytest.mark.lora
RANKS = [4, 8, 16]


def lora_config(r: int, alpha: float | None = None) -> LoraConfig:
    """The team's config at rank r: alpha = 2r unless overridden."""
    return LoraConfig(
        r=r,
        lora_alpha=2 * r if alpha is None else alpha,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.05,
        bias="none",
        task_type="CAUSAL_LM",
    )


@pytest.mark.parametrize("r", RANKS)
def test_param_budget(lora_model: LoraModelFactory, r: int) -> None:
    """Step 1: the LoRA parameters are within the policy's share of the model."""
    assert_param_budget(lora_model(lora_config(r)))


@pytest.mark.parametrize("r", RANKS)
def test_alpha_ratio(r):
    """Step 2: alpha = 2r, so the effective learning rate is the same at every rank."""
    assert_alpha_ratio(lora_config(r))


@pytest.mark.parametrize("r", RANKS)
def test_adapter_shapes_after_two_steps(lora_train: LoraTrain, r: int) -> None:
    """Step 3: after two steps, q_proj and v_proj carry (r, in) and (out, r) adapters, and only they train."""
    result = lora_train(lora_config(r), steps=2)
    assert_adapter_shapes(result.model)
    assert result.base_unchanged


def test_no_plateau_on_a_short_run(lora_train: LoraTrain) -> None:
    """A sound config learns: the smoothed loss falls clearly within 40 steps."""
    result = lora_train(lora_config(8), steps=40)
    assert_no_plateau(result)


@pytest.mark.xfail(reason="the alpha gotcha: r=8 with lora_alpha=8 left over from an r=4 config", strict=True)
def test_alpha_gotcha():
    """A deliberately bad config: the rank was raised to 8, alpha stayed at the r=4 value."""
    assert_alpha_ratio(lora_config(8, alpha=8))
