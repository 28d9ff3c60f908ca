"""Throughput per rank: the guide's rank table [4, 8, 16] as a benchmark, and the memory check.

    pytest -m lora examples/test_throughput.py --benchmark-json=out.json

writes one entry per rank, whose `extra_info` holds r, alpha, targets, trainable parameters and their
share, tokens/s, samples/s, step time, peak and estimated memory, FLOPs per token, achieved FLOP/s and
MFU (on a GPU whose peak is known, or with --lora-peak-tflops). The `lora` section of the terminal
summary lines the ranks up, with each one's time relative to the fastest: the guide's production rule
keeps the rank that reaches 95% of the best metric in under 70% of the longest training time.
Compare commits with `--benchmark-save` / `--benchmark-compare --benchmark-compare-fail=mean:10%`.
"""

import pytest
from peft import LoraConfig

from pytest_lora import assert_fits_memory

pytestmark = pytest.mark.lora
RANKS = [4, 8, 16]
GIB = 2**30

# Production shape (Llama-2-7b): the memory check runs on the meta device, no weights are loaded.
LLAMA_2_7B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "vocab_size": 32000,
    "dtype": "float16",
}


def lora_config(r: int) -> LoraConfig:
    return LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], lora_dropout=0.05, task_type="CAUSAL_LM"
    )


@pytest.mark.parametrize("r", RANKS)
def test_throughput(lora_benchmark, r):
    """Real training steps (forward, backward, AdamW) on the session's 4-bit base, timed per round."""
    run = lora_benchmark(lora_config(r), batch_size=4, seq_len=32, steps_per_round=2, rounds=3, warmup_rounds=1)
    assert run.trainable_params == 4 * r * (64 + 64 + 64 + 32)  # q_proj (64 -> 64), v_proj (64 -> 32), 4 layers


def test_largest_rank_fits_a_24_gib_card():
    """The production shape's estimate, before renting a GPU: r=16, batch 4 x 1024 tokens, on 24 GiB.

    With gradient checkpointing and the team's recipe, `[tool.pytest_lora.policy.memory]` in
    pyproject.toml (bf16 adapters, paged 8-bit AdamW, on CUDA): ~7.2 GiB. Without checkpointing it
    would be ~24.6 GiB, over the card, and the failure would list the parts and what each fix gives
    (lower r, fewer modules, smaller batch, checkpointing).
    """
    assert_fits_memory(
        LLAMA_2_7B,
        lora_config(max(RANKS)),
        batch_size=4,
        seq_len=1024,
        gradient_checkpointing=True,
        budget_bytes=24 * GIB,
    )
