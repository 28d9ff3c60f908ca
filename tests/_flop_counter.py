"""Helpers for checking FLOPs formulas against torch's FlopCounterMode (tests and benchmarks)."""

from __future__ import annotations

import torch

from pytest_lora.model.loading import TINY_LLAMA_CONFIG

SEQ = 64
BATCH = 2


def tiny_unquantized(config):
    """The built-in architecture in fp32, eager attention (so FlopCounterMode sees QK^T and AV), LoRA on."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {key: value for key, value in TINY_LLAMA_CONFIG.items() if key != "architectures"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(**fields, attn_implementation="eager"))
    base.requires_grad_(False)
    return get_peft_model(base, config)


def counted_flops_per_token(model, seq_len: int = SEQ) -> float:
    """What FlopCounterMode counts for one forward + backward, per token (bitsandbytes would count 0)."""
    from torch.utils.flop_counter import FlopCounterMode

    tokens = torch.randint(0, TINY_LLAMA_CONFIG["vocab_size"], (BATCH, seq_len))
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=tokens, labels=tokens).loss.backward()
    return counter.get_total_flops() / (BATCH * seq_len)
