"""PEFT's own published "trainable params" lines, reproduced from config.json values alone.

Each base is written here with its model's config.json values (only what changes the shapes) and each
LoraConfig as its source wrote it; `estimate_lora_parameters` builds the model on the meta device and
must print PEFT's numbers exactly, trainable and total.
"""

from __future__ import annotations

import pytest

from pytest_lora.model.counting import ParamCount
from pytest_lora.model.estimate import estimate_lora_parameters

# facebook/opt-350m config.json
OPT_350M = {
    "architectures": ["OPTForCausalLM"],
    "model_type": "opt",
    "activation_function": "relu",
    "do_layer_norm_before": False,
    "ffn_dim": 4096,
    "hidden_size": 1024,
    "max_position_embeddings": 2048,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "vocab_size": 50272,
    "word_embed_proj_dim": 512,
    "bos_token_id": 2,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
# facebook/opt-6.7b config.json
OPT_6_7B = {
    **OPT_350M,
    "do_layer_norm_before": True,
    "ffn_dim": 16384,
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "word_embed_proj_dim": 4096,
}
# Qwen/Qwen2.5-3B-Instruct config.json
QWEN_2_5_3B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
}
# meta-llama/Llama-3.2-1B config.json
LLAMA_3_2_1B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": True,
}
# openai/whisper-large-v2 config.json
WHISPER_LARGE_V2 = {
    "architectures": ["WhisperForConditionalGeneration"],
    "model_type": "whisper",
    "d_model": 1280,
    "encoder_layers": 32,
    "decoder_layers": 32,
    "encoder_attention_heads": 20,
    "decoder_attention_heads": 20,
    "encoder_ffn_dim": 5120,
    "decoder_ffn_dim": 5120,
    "vocab_size": 51865,
    "num_mel_bins": 80,
    "max_source_positions": 1500,
    "max_target_positions": 448,
}

PUBLISHED = {
    # PEFT docs, tutorial "PEFT configurations and models" (peft_model_config.md)
    "opt-350m": (
        OPT_350M,
        {
            "r": 16,
            "target_modules": ["q_proj", "v_proj"],
            "task_type": "CAUSAL_LM",
            "lora_alpha": 32,
            "lora_dropout": 0.05,
        },
        ParamCount(1_572_864, 332_769_280),
    ),
    # PEFT examples, int8_training/Finetune_opt_bnb_peft.ipynb ("trainable params: 8388608 || all params: 6666862592")
    "opt-6.7b": (
        OPT_6_7B,
        {
            "r": 16,
            "lora_alpha": 32,
            "target_modules": ["q_proj", "v_proj"],
            "lora_dropout": 0.05,
            "bias": "none",
            "task_type": "CAUSAL_LM",
        },
        ParamCount(8_388_608, 6_666_862_592),
    ),
    # PEFT README, quickstart: no target_modules, so PEFT's default targets for qwen2 (q_proj, v_proj)
    "Qwen2.5-3B": (
        QWEN_2_5_3B,
        {"r": 16, "lora_alpha": 32, "task_type": "CAUSAL_LM"},
        ParamCount(3_686_400, 3_089_625_088),
    ),
    # PEFT docs, quicktour
    "Llama-3.2-1B": (
        LLAMA_3_2_1B,
        {
            "target_modules": ["q_proj"],
            "task_type": "CAUSAL_LM",
            "inference_mode": False,
            "r": 8,
            "lora_alpha": 32,
            "lora_dropout": 0.1,
        },
        ParamCount(524_288, 1_236_338_688),
    ),
    # PEFT docs, task guide "int8 training for automatic speech recognition" (int8-asr.md, PEFT 0.6),
    # from examples/int8_training/peft_bnb_whisper_large_v2_training.ipynb
    "whisper-large-v2": (
        WHISPER_LARGE_V2,
        {"r": 32, "lora_alpha": 64, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.05, "bias": "none"},
        ParamCount(15_728_640, 1_559_033_600),
    ),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_peft_count_from_config_alone(name: str) -> None:
    """The sources' printed lines: same trainable count, same "all params" (base + adapters)."""
    base, lora, published = PUBLISHED[name]
    assert estimate_lora_parameters(base, lora) == published
