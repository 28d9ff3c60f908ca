"""bitsandbytes' CPU inference repack must never make LoRA training silently dead.

On a CPU with AVX512-BF16, `Linear4bit.forward` in eval mode on an input without grad repacks
its weights for `gemv_4bit`, which has no autograd kernel; LoRA training on that base then
learns nothing and only a UserWarning says so. A shared session base plus a validation pass
is exactly this trap.
"""

from __future__ import annotations

import pytest
from conftest import lora_config

from pytest_lora import TrainingError, assert_no_plateau
from pytest_lora.model.loading import builtin_model_dir, repacked_4bit_layers

pytestmark = pytest.mark.lora


def _evaluate(model) -> None:
    import torch

    model.eval()
    with torch.no_grad():
        model(input_ids=torch.randint(0, 256, (2, 16)))


def test_evaluate_then_train_still_learns(lora_base_model, lora_train):
    _evaluate(lora_base_model)
    assert repacked_4bit_layers(lora_base_model) == []
    result = lora_train(lora_config(8), steps=40)  # its own validation passes run under no_grad too
    assert_no_plateau(result)
    assert repacked_4bit_layers(result.model) == []


def test_a_repacked_base_is_refused_not_trained(lora_session, tmp_path):
    from bitsandbytes.nn.modules import has_avx512bf16
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from pytest_lora.model.loading import quantization_config
    from pytest_lora.model.training import synthetic_data, train

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    settings = lora_session.settings
    raw = AutoModelForCausalLM.from_pretrained(
        builtin_model_dir(settings.cache_dir), quantization_config=quantization_config(settings), device_map="cpu"
    )
    _evaluate(raw)  # what a user's own validation pass does to a model loaded by hand
    assert repacked_4bit_layers(raw), "expected bitsandbytes to repack on this CPU"
    model = get_peft_model(raw, lora_config(8))
    with pytest.raises(TrainingError, match="repacked for CPU inference") as info:
        train(model, synthetic_data(256, 64), steps=5)
    assert "support_avx512bf16_for_cpu = False" in str(info.value)
