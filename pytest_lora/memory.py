"""Measuring peak memory of a piece of work, on CUDA and on the CPU.

On CUDA the allocator's own peak is exact. On a CPU the process peak (VmHWM) only ever grows;
Linux lets a process reset it (`/proc/self/clear_refs` with "5"), which turns it into a
per-run peak. Where that is not possible the number is the process' lifetime peak, and says so.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pytest_lora.shapes import ModelShape, QuantLayout, dtype_bytes, model_shape


@dataclass
class PeakMemory:
    """Filled in when the `measure_peak` block ends."""

    device: str
    bytes: int = 0
    scope: str = "run"  # "run" when reset before the block, "process" when it is the lifetime peak


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def cpu_peak_bytes() -> int:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@contextmanager
def measure_peak(device: str) -> Iterator[PeakMemory]:
    """Peak memory of the block: `torch.cuda.max_memory_allocated` on CUDA, peak RSS on the CPU."""
    result = PeakMemory(device)
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result.bytes = int(torch.cuda.max_memory_allocated(device))
        return
    result.scope = "run" if _reset_cpu_peak() else "process"
    yield result
    result.bytes = cpu_peak_bytes()


# --- estimate from shapes ---------------------------------------------------------------------------

GIB = 2**30
OPTIMIZER_STATE_BYTES: dict[str, int] = {"adamw": 8, "adam": 8, "adamw_8bit": 2, "sgd": 0}
_CODE_BYTES = 16 * 4  # the 4-bit code book (nf4 / fp4: 16 fp32 values), one per layer
_NESTED_CODE_BYTES = 256 * 4 + 4  # double quant: its 8-bit code book (256 fp32) and the fp32 offset


def format_bytes(count: float) -> str:
    """`1.23 GiB`, `456.7 MiB`, `12.0 KiB`: binary units, as nvidia-smi and torch report memory."""
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= size:
            return f"{count / size:.2f} {unit}"
    return f"{int(count)} B"


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of a LoRA training step, part by part, in bytes (see `estimate_memory`)."""

    base_4bit: int
    quant_constants: int
    base_unquantized: int
    lora_weights: int
    lora_grads: int
    optimizer_state: int
    activations: int
    logits: int
    workspace: int
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    optimizer: str
    lora_params: int

    @property
    def resident(self) -> int:
        """The base model's own memory: there before any adapter is attached."""
        return self.base_4bit + self.quant_constants + self.base_unquantized

    @property
    def total(self) -> int:
        return (
            self.resident
            + self.lora_weights
            + self.lora_grads
            + self.optimizer_state
            + self.activations
            + self.logits
            + self.workspace
        )

    def lines(self) -> list[str]:
        """The breakdown, one part a line, for failure messages and reports."""
        checkpointing = "with" if self.gradient_checkpointing else "without"
        parts = (
            ("base 4-bit weights", self.base_4bit, "0.5 B/param"),
            ("quantization constants", self.quant_constants, "absmax per 64-value block (+ double quant)"),
            ("unquantized layers", self.base_unquantized, "embeddings, lm_head, norms at their dtype"),
            ("LoRA weights", self.lora_weights, f"{self.lora_params:,} params x 4 B (fp32)"),
            ("LoRA gradients", self.lora_grads, "4 B/param"),
            ("optimizer state", self.optimizer_state, f"{self.optimizer}"),
            (
                "activations",
                self.activations,
                f"batch {self.batch_size} x seq {self.seq_len}, {checkpointing} gradient checkpointing",
            ),
            ("logits", self.logits, "batch x seq x vocab, fp32 for the loss"),
            ("workspace", self.workspace, "largest 4-bit weight dequantized"),
        )
        lines = [f"  {name:<24}{format_bytes(size):>12}   ({how})" for name, size, how in parts]
        lines.append(f"  {'estimated peak':<24}{format_bytes(self.total):>12}")
        return lines


def activation_bytes_per_token(shape: ModelShape, *, gradient_checkpointing: bool) -> float:
    """Bytes kept for backward per token: every layer from the first adapted one on, the final norm.

    Per layer (c = activation element size; a frozen linear keeps nothing, it needs no weight gradient):
    the two RMSNorms keep their fp32 input (2 x 4h); each adapter keeps its input upcast to fp32 (4 d_in,
    PEFT runs adapters in fp32), the rank-r middle (4r), and its dropout mask when dropout > 0 (1 B on
    CUDA, 4 B on the CPU); attention keeps q, k, v, its output (c (2w + 2w_kv)) and the log-sum-exp,
    eager attention also the T x T probabilities; a gated MLP keeps the gate, its activation and up
    (3c i), a plain one its pre-activation (c i). This is Korthikanti et al. 2022 (34 s b h per layer
    for full training) without the inputs kept only for weight gradients. Checkpointing keeps each
    layer's input (c h) and one layer's set while it is recomputed. An adapter PEFT folds into a fused
    MoE weight keeps the inputs of that weight instead (c d_in per active expert), for its gradient.
    """
    c = shape.activation_bytes
    norms = 2 * 4 * shape.hidden_size
    attention = c * (2 * shape.attention_width + 2 * shape.kv_width) + 4 * shape.n_heads
    mlp = (3 if shape.gated_mlp else 1) * c * shape.intermediate_size
    dropout_mask = shape.dropout_mask_bytes if shape.lora_dropout > 0 else 0
    per_layer: list[float] = []
    for layer in range(shape.n_layers):
        if not shape.in_backward(layer):
            continue
        adapters = sum(
            c * linear.active * linear.in_features
            if linear.folded
            else (4 + dropout_mask) * linear.in_features + 4 * linear.r
            for linear in shape.adapted
            if linear.layer == layer
        )
        per_layer.append(norms + attention + mlp + adapters)
    if not per_layer:
        return 0.0
    final_norm = 4 * shape.hidden_size
    if gradient_checkpointing:
        return len(per_layer) * c * shape.hidden_size + max(per_layer) + final_norm
    return sum(per_layer) + final_norm


def folded_weight_bytes(shape: ModelShape, *, gradient_checkpointing: bool) -> int:
    """The weights PEFT's ParamWrapper builds for an adapted fused MoE parameter (W + B @ A, all experts).

    Each forward pass materialises the folded weight at the parameter's dtype, and the expert matmuls keep
    it for backward: every adapted layer's copy at once, or one layer's with checkpointing.
    """
    per_layer: dict[int | None, int] = {}
    for linear in shape.adapted:
        if linear.folded:
            size = linear.experts * linear.in_features * linear.out_features * shape.activation_bytes
            per_layer[linear.layer] = per_layer.get(linear.layer, 0) + size
    if not per_layer:
        return 0
    return max(per_layer.values()) if gradient_checkpointing else sum(per_layer.values())


def eager_attention_bytes(shape: ModelShape, seq_len: int) -> float:
    """Per token, per backward layer: the T x T probabilities eager attention keeps (softmax and its input)."""
    return 2 * shape.activation_bytes * shape.n_heads * seq_len if shape.eager_attention else 0.0


def memory_breakdown(
    shape: ModelShape,
    *,
    batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool = False,
    optimizer: str = "adamw",
) -> MemoryEstimate:
    """`estimate_memory` on an already read `ModelShape`: pure arithmetic."""
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise ValueError(f"optimizer={optimizer!r}: use one of {', '.join(OPTIMIZER_STATE_BYTES)}")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be an int >= 1")
    packed = constants = 0
    quant = shape.quant
    for linear in shape.linears:
        if not linear.quantized or quant is None:
            continue
        packed += -(-linear.params // 2)
        blocks = -(-linear.params // quant.blocksize)
        if quant.double_quant:
            constants += blocks + 4 * -(-blocks // quant.nested_blocksize) + _CODE_BYTES + _NESTED_CODE_BYTES
        else:
            constants += 4 * blocks + _CODE_BYTES
    lora = shape.lora_params
    tokens = batch_size * seq_len
    backward_layers = sum(1 for layer in range(shape.n_layers) if shape.in_backward(layer))
    eager = eager_attention_bytes(shape, seq_len) * (1 if gradient_checkpointing else backward_layers)
    activations = tokens * (activation_bytes_per_token(shape, gradient_checkpointing=gradient_checkpointing) + eager)
    activations += folded_weight_bytes(shape, gradient_checkpointing=gradient_checkpointing)
    largest = max((linear.params for linear in shape.linears if linear.quantized), default=0) if quant else 0
    return MemoryEstimate(
        base_4bit=packed,
        quant_constants=constants,
        base_unquantized=shape.unquantized_bytes,
        lora_weights=4 * lora,
        lora_grads=4 * lora,
        optimizer_state=OPTIMIZER_STATE_BYTES[optimizer] * lora,
        activations=int(activations),
        logits=12 * tokens * shape.vocab_size if lora else 0,
        workspace=largest * quant.compute_bytes if quant else 0,
        batch_size=batch_size,
        seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing,
        optimizer=optimizer,
        lora_params=lora,
    )


DEFAULT_QUANT = QuantLayout()


def shape_for_estimate(base: Any, config: Any = None, quant: QuantLayout | None = DEFAULT_QUANT) -> ModelShape:
    """The `ModelShape` `estimate_memory` works on: a loaded model as it is, anything else as a meta skeleton.

    A skeleton's unquantized weights count at the config's dtype (what `from_pretrained` keeps them in),
    bfloat16 when the config names none.
    """
    from pytest_lora.estimate import meta_model

    if hasattr(base, "named_modules") and hasattr(base, "parameters"):
        if not next((param.is_meta for param in base.parameters()), False):
            return model_shape(base, config)
        model = base
    else:
        model = meta_model(base)
    own = getattr(model.config, "dtype", None)
    return model_shape(model, config, quant=quant, element_bytes=dtype_bytes(own) if own is not None else 2)


def estimate_memory(
    base: Any,
    config: Any = None,
    *,
    batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool = False,
    optimizer: str = "adamw",
    quant: QuantLayout | None = DEFAULT_QUANT,
) -> MemoryEstimate:
    """Peak memory of one LoRA training step of `base` with adapter `config`, from shapes alone.

    `base`: a loaded model (4-bit or not), a `PeftModel` (its own adapter; `config` then stays None),
    a model on the meta device, a transformers config, a dict of config fields, or a local directory /
    hub id with a config.json: anything but a loaded model is built on the meta device, no weights.
    `quant` says how such a skeleton is stored (default: nf4, double quant, bf16 compute; None: 16-bit);
    a loaded model's own layout is read from its weights.

    The parts (QLoRA, Dettmers et al. 2023): nf4 weights at 0.5 B/param; their fp32 absmax per
    64-value block (0.5 bit/param) or, with double quant, 8-bit absmax plus one fp32 constant per 256
    blocks (~0.127 bit/param), and each layer's code books; unquantized layers (embeddings, lm_head,
    norms) at their dtype; LoRA weights and gradients in fp32 (PEFT upcasts adapters), optimizer state
    (AdamW: two fp32 moments, 8 B/param); activations (see `activation_bytes_per_token`); logits at
    12 B per batch x seq x vocab value (the fp32 log-probabilities kept for backward, and their gradient
    twice during the backward of the loss); one dequantized weight as workspace. Left out: the CUDA
    context and allocator fragmentation (outside `max_memory_allocated`), the optimizer's temporaries.
    """
    return memory_breakdown(
        shape_for_estimate(base, config, quant),
        batch_size=batch_size,
        seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing,
        optimizer=optimizer,
    )
