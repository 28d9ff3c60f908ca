"""On a GPU: a real CUDA out-of-memory error inside `lora_train`, then the next test on the same base passes.

The session base (`--lora-model`, default the built-in tiny Llama) is loaded once. The first test fills
the GPU with a ballast tensor to within `HEADROOM` of its memory and trains a batch whose estimated step
needs several times that headroom, so the caching allocator raises `torch.OutOfMemoryError` in the
forward or backward pass: the fixture turns it into a TrainingError that explains it, detaches nothing
the test still needs and gives the step's memory back. The second test trains on the same base object
and passes, its memory back where it was.

Skipped without CUDA. `PYTEST_LORA_GPU_TESTS_DEVICE=cpu` (`scripts/gpu_check.sh --cpu`) runs it on
the CPU, where a real out-of-memory error cannot be provoked safely: a forward pre-hook on a decoder
layer raises `torch.OutOfMemoryError` once instead, as tests/test_bench.py does, and the test records
that the error was simulated. Each test records its figures in the JUnit XML (the `oom` property).
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from peft import LoraConfig

from pytest_lora.core.errors import TrainingError
from pytest_lora.core.memory import format_bytes
from pytest_lora.model.memory import estimate_memory
from pytest_lora.model.training import device_of

DEVICE = os.environ.get("PYTEST_LORA_GPU_TESTS_DEVICE", "cuda")

pytestmark = [
    pytest.mark.lora,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CONFIG = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
HEADROOM = 1 << 30  # what the ballast leaves free on the GPU
OVERSHOOT = 4  # the failing step's estimated growth over the headroom
NEXT_STEP = dict(steps=2, batch_size=2, seq_len=16)
_first_base: list[object] = []


def _allocated(device: str) -> int | None:
    return int(torch.cuda.memory_allocated(device)) if device.startswith("cuda") else None


def _step_growth(base, seq_len: int, batch_size: int) -> int:
    """The estimated peak of a training step above the base model's own memory."""
    config = LoraConfig(**CONFIG)
    return estimate_memory(base, config, batch_size=batch_size, seq_len=seq_len, device="cuda").total - (
        estimate_memory(base, config, batch_size=1, seq_len=2, device="cuda").resident
    )


def test_out_of_memory_inside_lora_train(lora_base_model, lora_train, record_property):
    base = lora_base_model
    _first_base.append(base)
    device = device_of(base)
    seq_len = min(256, int(base.config.max_position_embeddings))
    before = _allocated(device)
    ballast = None
    hook = None
    if device.startswith("cuda"):
        per_sequence = _step_growth(base, seq_len, 2) - _step_growth(base, seq_len, 1)
        batch_size = math.ceil(OVERSHOOT * HEADROOM / per_sequence)
        needed = _step_growth(base, seq_len, batch_size)
        free, total = torch.cuda.mem_get_info(device)
        ballast = torch.empty(max(0, free - HEADROOM), dtype=torch.uint8, device=device)
        how = (
            f"real: a ballast of {format_bytes(ballast.numel())} left {format_bytes(HEADROOM)} of "
            f"{format_bytes(total)} free; the step's estimate needs {format_bytes(needed)} more than the base"
        )
    else:
        batch_size = 4
        layer = base.model.layers[min(1, len(base.model.layers) - 1)]
        raised: list[bool] = []

        def out_of_memory(module, args):
            if not raised:
                raised.append(True)
                raise torch.OutOfMemoryError(
                    "CUDA out of memory. Tried to allocate 20.00 GiB (simulated on the CPU by a forward pre-hook)"
                )

        hook = layer.register_forward_pre_hook(out_of_memory)
        how = "simulated: torch.OutOfMemoryError raised once by a forward pre-hook on a decoder layer (CPU)"
    generator = torch.Generator().manual_seed(0)
    vocab = int(base.config.vocab_size)
    train = torch.randint(0, vocab, (batch_size, seq_len), generator=generator)
    val = torch.randint(0, vocab, (1, seq_len), generator=generator)
    try:
        with pytest.raises(TrainingError) as info:
            lora_train(CONFIG, steps=1, batch_size=batch_size, seq_len=seq_len, dataset=(train, val))
    finally:
        if hook is not None:
            hook.remove()
    message = str(info.value)
    del info
    after_failure = _allocated(device)
    if ballast is not None:
        held = ballast.numel()
        del ballast
        torch.cuda.empty_cache()
        after_failure -= held
    figures = dict(
        device=device,
        mode="real" if device.startswith("cuda") else "simulated",
        how=how,
        batch_size=batch_size,
        seq_len=seq_len,
        message=message.splitlines()[0],
        allocated_before=before,
        allocated_after_failure=after_failure,
    )
    record_property("oom", json.dumps(figures))
    print(f"\n{how}\n{message}")
    assert message.startswith(f"out of memory in lora_train (batch {batch_size} x seq {seq_len}) on {device}: ")
    assert "CUDA out of memory" in message.splitlines()[0]
    assert "measured peak before the failure" in message and "estimated peak of this step" in message
    assert "the memory was freed" in message
    if before is not None:
        # the failed step's activations and gradients are gone; what is left is the adapter (r=8 on q, v)
        assert after_failure - before < 64 << 20, f"{format_bytes(after_failure - before)} still allocated"


def test_the_next_test_on_the_same_base_passes(lora_base_model, lora_train, record_property):
    assert _first_base, "runs after test_out_of_memory_inside_lora_train, in file order"
    assert lora_base_model is _first_base[0], "the session base was replaced after the out-of-memory error"
    device = device_of(lora_base_model)
    before = _allocated(device)
    result = lora_train(CONFIG, **NEXT_STEP)
    after = _allocated(device)
    record_property(
        "oom",
        json.dumps(
            dict(
                device=device,
                same_base=True,
                losses=[round(loss, 4) for loss in result.losses],
                base_unchanged=result.base_unchanged,
                changed_lora=len(result.changed_lora),
                allocated_before=before,
                allocated_after=after,
            )
        ),
    )
    assert result.base_unchanged and result.changed_lora
    assert all(math.isfinite(loss) for loss in result.losses)
