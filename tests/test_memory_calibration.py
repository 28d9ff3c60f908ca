"""The memory estimate against published QLoRA figures: each recipe written out here, its source cited.

Published figures are whole "GB" of GPU memory as a user sees it (nvidia-smi style), so they are
compared with `device_total`: the allocated peak plus the caching allocator's reserve and the CUDA
context. "GB" is read as 10**9 bytes, the unit as printed; read as GiB (2**30) every figure would be
7.4% larger. The sources say neither how they measured nor which unit they meant.
"""

from __future__ import annotations

import pytest
from peft import LoraConfig
from test_memory import LLAMA_2_7B  # Llama-2-7b's config.json fields

from pytest_lora.model.memory import estimate_memory

GB = 10**9

# LLaMA-65B (Touvron et al. 2023, Table 2: dimension 8192, 64 heads, 80 layers; the HF config.json
# adds intermediate_size 22016 and the 32,000-token vocabulary). bf16 weights, as qlora.py loads them.
LLAMA_65B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 8192,
    "intermediate_size": 22016,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 64,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "dtype": "bfloat16",
}


def test_guanaco_65b_recipe_fits_a_48_gb_gpu():
    """QLoRA (Dettmers et al. 2023, arXiv:2305.14314): "finetune a 65B parameter model on a single 48GB
    GPU"; "paged optimizers are critical to do 33B/65B QLoRA tuning on a single 24/48GB GPU".

    The recipe of Guanaco-65B, from artidoro/qlora `scripts/finetune_guanaco_65b.sh` and `qlora.py`:
    nf4 with double quant, `--bf16` (compute in bf16, HF Trainer autocast), LoRA r=64 alpha=16
    dropout 0.05 on all linear layers, the LoRA modules cast to bf16 by qlora.py, gradient
    checkpointing, qlora.py's default optimizer `paged_adamw_32bit`, per-device batch 4, at most
    16 source + 512 target tokens (the longest batch: 4 x 528), and the eager attention of the
    transformers of May 2023. The 48 GB budget is read as 48 * 10**9 bytes (44.7 GiB), the smaller of
    its two readings. Priced with PEFT's defaults instead (fp32 adapters, unpaged fp32 AdamW, as the
    estimate did before it took recipes: 49.0 GiB), the same step does not fit.
    """
    config = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear")
    step = {"batch_size": 4, "seq_len": 528, "gradient_checkpointing": True, "attention": "eager", "device": "cuda"}
    guanaco = estimate_memory(
        LLAMA_65B, config, adapter_dtype="bfloat16", autocast="bfloat16", optimizer="paged_adamw_32bit", **step
    )
    assert guanaco.device_total <= 48 * GB, "\n".join(guanaco.lines())
    # every LoRA matrix of the 65B holds >= 1e5 values, so bitsandbytes pages all of its fp32 moments
    assert guanaco.optimizer_paged == guanaco.optimizer_state == 8 * guanaco.lora_params
    defaults = estimate_memory(LLAMA_65B, config, **step)
    assert defaults.device_total > 48 * GB, "\n".join(defaults.lines())


# LLaMA-Factory wiki, "Performance comparison" (edited 2024-04-15; linked from the README's 24/04/16
# changelog entry), FlashAttention2 row of the long-sequence table: VRAM by max length.
LLAMA_FACTORY_QLORA_7B = [(1024, 6), (2048, 7), (4096, 9), (8192, 12), (16384, 19), (32768, 32)]


@pytest.mark.parametrize(("seq_len", "published_gb"), LLAMA_FACTORY_QLORA_7B)
def test_llama_factory_qlora_7b_by_sequence_length(seq_len, published_gb):
    """LLaMA-Factory's published QLoRA memory for a 7B model, within 10% of each row.

    Stated settings: one A100 40GB, LLaMA2-7B, batch size 1, gradient accumulation 4, LoRA rank 8 on
    all modules, quantization bit 4, FlashAttention-2. The rest is LLaMA-Factory's defaults of the
    time: nf4 with double quant, bf16 (HF Trainer: autocast), trainable parameters upcast to fp32,
    lora_dropout 0, gradient checkpointing on, adamw_torch. The README's hardware table gives the same
    6 GB for 4-bit QLoRA of a 7B, marked "estimated" and without a sequence length: the 1,024 row.

    Rounding: each figure is a whole GB, so it may be off by up to 0.5 GB (8% of the 6 GB row, 4% of
    the 12 GB row); the 10% band is not widened for that. The estimate runs 4-9% under the rows up to
    8k: a constant the shapes cannot account for (blocks the allocator cached while the model was
    quantized on loading, a context above its bare 400 MB); at 16k and 32k the slope, ~0.8 GB per
    1k tokens, matches. Read as GiB, the ratios would be 0.84-0.93.
    """
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    estimate = estimate_memory(
        LLAMA_2_7B,
        config,
        batch_size=1,
        seq_len=seq_len,
        gradient_checkpointing=True,
        autocast="bfloat16",
        attention="flash_attention_2",
        device="cuda",
    )
    ratio = estimate.device_total / (published_gb * GB)
    assert abs(ratio - 1) <= 0.10, f"{ratio:.3f} of the published {published_gb} GB\n" + "\n".join(estimate.lines())
