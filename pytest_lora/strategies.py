"""Hypothesis strategies for LoRA configs, where users import them: `from pytest_lora.strategies import lora_configs`.

The code lives in `pytest_lora.integrations.strategies`; this module is the public path, so users' imports stay
put when the package's inside moves (`tests/test_public_api.py`).
"""

from pytest_lora.integrations.strategies import (
    LLAMA_TARGETS,
    InvalidLoraValue,
    config_repr,
    invalid_lora_values,
    lora_configs,
    policy_configs,
)

__all__ = ["LLAMA_TARGETS", "InvalidLoraValue", "config_repr", "invalid_lora_values", "lora_configs", "policy_configs"]
