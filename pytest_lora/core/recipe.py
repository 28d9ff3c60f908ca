"""How a training step is run, as far as its memory goes: the recipe `estimate_memory` prices.

A `MemoryRecipe` names the choices that move a LoRA step's peak memory: the optimizer and where its
state lives, the adapters' dtype, autocast, gradient checkpointing, the attention implementation and
the device. It is the `[tool.pytest_lora.policy.memory]` table of a team's policy. Pure (stdlib only),
so a bad recipe stops the session with the policy's other errors, before any model is loaded.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from pytest_lora.core.settings import show

ADAPTER_DTYPES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")
DEVICES = ("auto", "cuda", "cpu")


@dataclass(frozen=True)
class OptimizerState:
    """What an optimizer keeps per trainable tensor (see `memory.optimizer_state_bytes`).

    kind: "adam" (two moments), "sgd" (none: plain SGD, no momentum) or "adafactor" (the second
    moment factored into row and column means of each matrix, no first moment; HF's default).
    bits: 32, or 8 for bitsandbytes' block-wise 8-bit moments. param_dtype: the moments take the
    parameter's dtype (torch.optim.AdamW) instead of fp32 (bitsandbytes, HF Adafactor).
    paged: bitsandbytes paged optimizer, state in CUDA unified memory.
    """

    kind: str
    bits: int = 32
    param_dtype: bool = False
    paged: bool = False


# HF TrainingArguments `optim` names where they exist, plus the short names pytest-lora always took.
OPTIMIZERS: dict[str, OptimizerState] = {
    "adamw": OptimizerState("adam", param_dtype=True),
    "adam": OptimizerState("adam", param_dtype=True),
    "adamw_torch": OptimizerState("adam", param_dtype=True),
    "adamw_torch_fused": OptimizerState("adam", param_dtype=True),  # transformers' default with torch >= 2.8
    "paged_adamw": OptimizerState("adam", paged=True),
    "adamw_8bit": OptimizerState("adam", bits=8),
    "adamw_bnb_8bit": OptimizerState("adam", bits=8),
    "paged_adamw_32bit": OptimizerState("adam", paged=True),
    "paged_adamw_8bit": OptimizerState("adam", bits=8, paged=True),
    "sgd": OptimizerState("sgd"),
    "adafactor": OptimizerState("adafactor"),
}


def _one_of(name: str, value: object, choices: Collection[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={show(value)} is not one of {', '.join(choices)}; use one of those")


@dataclass(frozen=True)
class MemoryRecipe:
    """The recipe of a training step, as `estimate_memory` and `assert_fits_memory` take it.

    Attributes:
        optimizer: one of `OPTIMIZERS`, default "adamw" (torch AdamW: two moments at the
            parameters' dtype). "paged_*": bitsandbytes keeps the state of tensors of 100,000
            elements or more in CUDA unified memory, which the driver evicts to CPU RAM when the GPU
            runs out: it is reported, not counted in the peak.
        adapter_dtype: dtype of the LoRA weights, gradients and (torch) optimizer state: "float32",
            "bfloat16", "float16"; None (default): a loaded adapter's own, else PEFT's float32
            (PEFT upcasts 16-bit adapters unless told not to).
        master_weights: an fp32 copy of 16-bit adapters that the optimizer updates (4 B/param),
            default False. Only with 16-bit adapters (given, or as loaded).
        autocast: "bfloat16" or "float16" when the step runs under torch.autocast (HF Trainer's
            bf16=True / fp16=True): adapters then compute, and keep their inputs, in that dtype
            whatever their weights' dtype. None (default): no autocast; adapters compute in their dtype.
        gradient_checkpointing: True / False; None (default): the loaded model's own setting, else False.
        attention: "eager" (keeps the T x T probabilities), "sdpa", "flash_attention_2",
            "flash_attention_3"; None (default): the model config's own.
        device: where the step runs: "cuda" adds the CUDA context and the allocator's reserve to
            the peak, "cpu" does not, "auto" (default): as the loaded model (a config is planned
            without them).
    """

    optimizer: str = "adamw"
    adapter_dtype: str | None = None
    master_weights: bool = False
    autocast: str | None = None
    gradient_checkpointing: bool | None = None
    attention: str | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        """Reject unknown names at construction; messages start with the field name."""
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        if self.adapter_dtype is not None:
            _one_of("adapter_dtype", self.adapter_dtype, ADAPTER_DTYPES)
        if self.autocast is not None:
            _one_of("autocast", self.autocast, ("bfloat16", "float16"))
        if self.attention is not None:
            _one_of("attention", self.attention, ATTENTION)
        _one_of("device", self.device, DEVICES)
        if self.master_weights and self.adapter_dtype == "float32":
            raise master_weights_error()


def master_weights_error() -> ValueError:
    """An fp32 master copy only exists beside 16-bit adapters (checked again once "as loaded" is known)."""
    return ValueError(
        "master_weights=true needs 16-bit adapters: an fp32 master copy only exists beside "
        'adapter_dtype="bfloat16" or "float16"; set adapter_dtype or drop master_weights'
    )
