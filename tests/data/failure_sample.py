"""The failing tests whose output the README shows (tests/test_readme.py re-runs them)."""

from peft import LoraConfig

from pytest_lora import assert_no_plateau, assert_param_budget


def test_budget_at_r2(lora_model):
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    assert_param_budget(lora_model(config))


def test_muted_adapter_learns(lora_train):
    config = LoraConfig(r=8, lora_alpha=0.001, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    assert_no_plateau(lora_train(config, steps=40))
