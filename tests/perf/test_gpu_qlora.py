"""On a GPU: MFU of a QLoRA step on a 7B-shaped Llama, and the memory estimate against the allocator.

The model is Llama-2-7b's shape with random weights, built on the GPU in bf16, saved, and loaded back
in 4 bits (nf4, double quant) through the same `from_pretrained` + `BitsAndBytesConfig` path as the
session base; no download. Skipped without CUDA; on a GPU runner, `tox -e perf` records per rank the
tokens/s, the MFU (model FLOPs, `pytest_lora.core.flops`) and the estimate's error in `extra_info`.
"""

from __future__ import annotations

import time

import pytest
import torch
from conftest import load_4bit_on_cuda, lora_config

from pytest_lora.core.flops import mfu, peak_flops, step_flops
from pytest_lora.core.memory import format_bytes, memory_breakdown
from pytest_lora.model.adapters import AdapterManager
from pytest_lora.model.shapes import model_shape

pytestmark = [
    pytest.mark.lora,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (about 30 GiB free)"),
]

SEQ, BATCH, STEPS = 2048, 1, 6
LLAMA_2_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
)


@pytest.fixture(scope="module")
def qlora_7b(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    directory = tmp_path_factory.mktemp("llama-7b-shape")
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_2_7B), dtype=torch.bfloat16)
    model.save_pretrained(directory)
    del model
    torch.cuda.empty_cache()
    return AdapterManager(load_4bit_on_cuda(directory))


@pytest.mark.parametrize("r", [8, 64])
def test_qlora_7b_mfu_and_memory(benchmark, qlora_7b, r):
    model = qlora_7b.attach(lora_config(r))
    try:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        tokens = torch.randint(0, LLAMA_2_7B["vocab_size"], (BATCH, SEQ), device="cuda:0")
        model.train()

        def step() -> None:
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del loss

        step()  # warm-up: kernels, optimizer state
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / STEPS
        measured = torch.cuda.max_memory_allocated()
        benchmark.group = "gpu: QLoRA 7B-shape step"
        benchmark.pedantic(lambda: (step(), torch.cuda.synchronize()), rounds=3)

        shape = model_shape(model)
        flops = step_flops(shape, SEQ)
        estimate = memory_breakdown(shape, batch_size=BATCH, seq_len=SEQ)
        tokens_per_second = BATCH * SEQ / seconds
        peak = peak_flops(torch.cuda.get_device_name())
        utilisation = mfu(flops.model, tokens_per_second, peak)
        error = estimate.total / measured - 1
        benchmark.extra_info.update(
            r=r,
            tokens_per_second=tokens_per_second,
            flops_per_token=flops.model,
            mfu=utilisation,
            peak=peak.source,
            measured_bytes=measured,
            estimated_bytes=estimate.total,
            estimate_error=error,
        )
        shown = f"{utilisation:.1%}" if utilisation is not None else f"n/a ({peak.source})"
        print(
            f"\nr={r}: {tokens_per_second:,.0f} tokens/s, MFU {shown}; memory measured {format_bytes(measured)}, "
            f"estimated {format_bytes(estimate.total)} ({error:+.1%})"
        )
    finally:
        qlora_7b.detach()
