"""On a GPU: MFU of a QLoRA step on a 7B-shaped Llama, and the memory estimate against the allocator.

The model is Llama-2-7b's shape with random weights, built in bf16, saved, and loaded back in 4 bits
(nf4, double quant) through pytest-lora's own loader (`load_base_model`: `from_pretrained` +
`BitsAndBytesConfig`, as the session base); no download. The step is QLoRA's: LoRA at r=8 and r=64 on
every linear layer, 2,048 tokens, gradient checkpointing (`qlora_recipe`, what `lora_train(...,
gradient_checkpointing=True)` runs). Skipped without CUDA; on a GPU runner, `tox -e perf` records per
rank the tokens/s, the FLOPs per token, the MFU (model FLOPs, `pytest_lora.core.flops`) and the
estimate's error in `extra_info`, and in the JUnit XML as the `qlora` property.

`scripts/gpu_check.sh` drives it through the environment:

- `PYTEST_LORA_GPU_TESTS_DEVICE`: `cuda` (default) or `cpu` (`gpu_check.sh --cpu`: runs without CUDA);
- `PYTEST_LORA_QLORA_SHAPE`: `llama-2-7b` (the default on CUDA) or `small-llama` (the default on the CPU:
  hidden 128, 2 layers, 128 tokens);
- `PYTEST_LORA_QLORA_MODEL_DIR`: where the random-weight model is written once and reused by later runs
  (default: a pytest temporary directory, written every session).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import lora_config

from pytest_lora.core.flops import mfu, peak_flops, step_flops
from pytest_lora.core.memory import format_bytes, memory_breakdown
from pytest_lora.core.settings import Settings
from pytest_lora.model.adapters import AdapterManager
from pytest_lora.model.counting import count_parameters
from pytest_lora.model.loading import load_base_model
from pytest_lora.model.measure import measure_peak
from pytest_lora.model.shapes import model_shape
from pytest_lora.model.training import device_name, qlora_recipe, sync

DEVICE = os.environ.get("PYTEST_LORA_GPU_TESTS_DEVICE", "cuda")
if DEVICE not in ("cuda", "cpu"):
    raise ValueError(f"PYTEST_LORA_GPU_TESTS_DEVICE={DEVICE!r}: must be 'cuda' or 'cpu'")

pytestmark = [
    pytest.mark.lora,
    pytest.mark.skipif(
        DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU (about 30 GiB free)"
    ),
]

LLAMA_2_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
)
# Llama's layers at a size a CPU steps through in a fraction of a second (a smaller vocabulary, whose head
# would dominate the step): what `gpu_check.sh --cpu` runs.
SMALL_LLAMA = dict(
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=4096,
    max_position_embeddings=512,
)
# shape name -> (config fields, tokens per sequence, timed steps, benchmark rounds)
SHAPES = {"llama-2-7b": (LLAMA_2_7B, 2048, 6, 3), "small-llama": (SMALL_LLAMA, 128, 2, 1)}
SHAPE = os.environ.get("PYTEST_LORA_QLORA_SHAPE") or ("llama-2-7b" if DEVICE == "cuda" else "small-llama")
if SHAPE not in SHAPES:
    raise ValueError(f"PYTEST_LORA_QLORA_SHAPE={SHAPE!r}: must be one of {', '.join(SHAPES)}")
CONFIG, SEQ, STEPS, ROUNDS = SHAPES[SHAPE]
BATCH = 1


def write_random_model(directory: Path) -> bool:
    """The shape with random weights in bf16, saved to `directory` unless a complete copy is there.

    Written to a sibling and renamed, so an interrupted run never leaves a half-written model to reuse.
    Returns whether it was written (False: reused).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**CONFIG)
    if (directory / "config.json").is_file():
        saved = AutoConfig.from_pretrained(directory)
        if all(getattr(saved, key) == value for key, value in CONFIG.items()):
            return False
        shutil.rmtree(directory)
    partial = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(partial)
    del model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    partial.rename(directory)
    return True


@pytest.fixture(scope="module")
def qlora_base(tmp_path_factory):
    """(adapter manager, how the base came to be): the random-weight model, loaded as the session base is."""
    root = os.environ.get("PYTEST_LORA_QLORA_MODEL_DIR")
    directory = Path(root) / SHAPE if root else tmp_path_factory.mktemp("qlora-model") / SHAPE
    directory.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    written = write_random_model(directory)
    write_seconds = time.perf_counter() - start
    loaded = load_base_model(Settings(model=str(directory), device=DEVICE))
    origin = {
        "model_dir": str(directory),
        "model_written": written,
        "write_seconds": write_seconds,
        "load_seconds": loaded.load_seconds,
        "quantization": loaded.quantization,
    }
    return AdapterManager(loaded.model), origin


@pytest.mark.parametrize("r", [8, 64])
def test_qlora_7b_mfu_and_memory(benchmark, qlora_base, r, record_property):
    manager, origin = qlora_base
    model = manager.attach(lora_config(r, target_modules="all-linear"))
    try:
        with qlora_recipe(model):  # gradient checkpointing, fp32 non-4-bit weights, use_cache off
            device = str(next(model.parameters()).device)
            trainable = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(trainable, lr=1e-4)
            tokens = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), device=device)
            model.train()

            def step() -> None:
                loss = model(input_ids=tokens, labels=tokens).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                del loss

            step()  # warm-up: kernels, optimizer state
            with measure_peak(device) as peak_memory:
                start = time.perf_counter()
                for _ in range(STEPS):
                    step()
                sync(device)
                seconds = (time.perf_counter() - start) / STEPS
            measured = peak_memory.bytes
            benchmark.group = f"QLoRA step, {SHAPE} shape, {device}"
            benchmark.pedantic(lambda: (step(), sync(device)), rounds=ROUNDS)

            shape = model_shape(model)  # inside the recipe: checkpointing on, the upcast weights
            flops = step_flops(shape, SEQ, gradient_checkpointing=True, batch_size=BATCH)
            estimate = memory_breakdown(shape, batch_size=BATCH, seq_len=SEQ)
            assert estimate.gradient_checkpointing, "the estimate did not see gradient checkpointing"
        tokens_per_second = BATCH * SEQ / seconds
        name = device_name(device)
        peak = peak_flops(name)
        utilisation = mfu(flops.model, tokens_per_second, peak)
        error = estimate.total / measured - 1
        on_cuda = device.startswith("cuda")
        figures = dict(
            shape=SHAPE,
            device=device,
            device_name=name or "cpu",
            r=r,
            targets="all-linear",
            adapted_modules=len(shape.adapted),
            trainable_params=count_parameters(model).trainable,
            batch_size=BATCH,
            seq_len=SEQ,
            gradient_checkpointing=True,
            timed_steps=STEPS,
            seconds_per_step=seconds,
            tokens_per_second=tokens_per_second,
            flops_per_token=flops.model,
            hardware_flops_per_token=flops.hardware,
            mfu=utilisation,
            peak=peak.source,
            measured_bytes=measured,
            measured_source=(
                "torch.cuda.max_memory_allocated"
                if on_cuda
                else f"process peak RSS ({peak_memory.scope} scope): the interpreter and libraries included"
            ),
            estimated_bytes=estimate.total,
            estimate_error=error,
            **origin,
        )
        benchmark.extra_info.update(figures)
        record_property("qlora", json.dumps(figures))
        shown = f"{utilisation:.1%}" if utilisation is not None else f"n/a ({peak.source})"
        print(
            f"\n{SHAPE} r={r} all-linear on {device}: {tokens_per_second:,.0f} tokens/s, "
            f"{flops.model / 1e9:,.2f} GFLOP/token, MFU {shown}; memory measured {format_bytes(measured)}, "
            f"estimated {format_bytes(estimate.total)} ({error:+.1%})"
        )
        assert tokens_per_second > 0 and measured > 0
    finally:
        manager.detach()
