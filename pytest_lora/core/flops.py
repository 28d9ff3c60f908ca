"""FLOPs of a LoRA training step from the model's shapes, peak FLOP/s by device, and MFU.

Pure arithmetic on a `ModelShape` (no torch). Per token of sequence length T, a matmul with an
`in x out` weight costs 2*in*out FLOPs forward. With the base frozen its backward only computes the
input gradient (another 2*in*out, no weight gradient), while an adapter pays forward, input and weight
gradients (2 + 2 + 2 per parameter). Attention (QK^T and AV) costs 4*T*w forward and twice that
backward, w = heads * head_dim. Hence, for L layers:

    model FLOPs / token = 4*N_base + 6*N_lora + 12*L*w*T        (Kaplan et al. 2020; PaLM appendix B)

refined where autograd provably does less: no gradient flows into layers below the first adapted one,
so they count forward work only (2*N + 4*w*T); and in the first adapted layer the attention input
projections (q/k/v_proj, qkv_proj, query_key_value, c_attn, Wqkv, recognised by name) read a tensor
that needs no gradient, so neither their base weights nor their lora_A compute an input gradient, and
attention skips the gradient of each Q/K/V operand without an adapter. Gradient checkpointing re-runs
each backward layer's forward: 2*N_layer + 2*N_lora_layer + 4*w*T more per layer, reported as
*hardware* FLOPs. MFU uses model FLOPs (recompute excluded), as PaLM defines it.

Mixture-of-experts layers (transformers 5's fused expert stacks): each token runs through
`num_experts_per_tok` of the experts, so an expert stack counts that share of its weights in N_base. An
adapter PEFT puts on such a weight (`target_parameters`) is folded into it once per step (B @ A for every
expert) instead of running on each token, so its cost per token depends on the tokens per step
(`batch_size` x `seq_len`), and the folded weight then needs its own gradient on each token (see
`LinearShape.lora_flops_per_token`). On a tiny Mixtral with eager experts this too equals FlopCounterMode.

Left out, on purpose: elementwise work (norms, activations, rotary, softmax, the loss), embedding
lookups, the optimizer step, and, when the first adapted layer adapts no attention projection (MLP-only
targets, an MoE layer's experts or router alone included), the gradients its attention block and the MLP's
input projections skip there (then the count reads high: 10% on the 4-layer tiny model, about 1.3% on a
32-layer 7B at T = 2048, 14-31% on the 2-layer tiny Mixtral). With those exceptions it
equals `torch.utils.flop_counter.FlopCounterMode` exactly on the unquantized tiny model (see the
tests). The attention term is counted in full although a causal FlashAttention kernel skips about half
of it (the PaLM convention).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pytest_lora.core.shapes import ModelShape

# Attention input projections by name, and the operands (Q, K, V) each one produces.
_ATTENTION_INPUTS: dict[str, str] = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "query": "q",
    "key": "k",
    "value": "v",
    "qkv_proj": "qkv",
    "query_key_value": "qkv",
    "c_attn": "qkv",
    "Wqkv": "qkv",
}


@dataclass(frozen=True)
class StepFlops:
    """FLOPs per token of one training step, split so each term can be checked."""

    base: float  # frozen matmuls: forward everywhere, input gradients from the first adapted layer on
    lora: float  # adapters: forward, input and weight gradients
    attention: float  # QK^T and AV, forward and backward
    recompute: float  # gradient checkpointing's second forward (hardware only)
    seq_len: int

    @property
    def model(self) -> float:
        """Model FLOPs per token: the MFU numerator."""
        return self.base + self.lora + self.attention

    @property
    def hardware(self) -> float:
        """FLOPs the device actually runs per token, recompute included."""
        return self.model + self.recompute


def step_flops(
    shape: ModelShape, seq_len: int, *, gradient_checkpointing: bool = False, batch_size: int = 1
) -> StepFlops:
    """FLOPs per token of a LoRA training step (forward, backward) of `shape` at sequence length `seq_len`.

    Without any adapter nothing is trained, so only the forward pass is counted. `batch_size` only matters
    for adapters PEFT folds into a fused MoE weight, whose update costs the same for the whole step.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len}: must be >= 1")
    tokens = seq_len * batch_size
    base, lora, attention = _skipped_in_first_layer(shape, seq_len)
    recompute = 0.0
    for linear in shape.linears:
        backward = shape.in_backward(linear.layer)
        base += (4 if backward else 2) * linear.params
        lora += linear.lora_flops_per_token(tokens)
    attention_forward = 4.0 * shape.attention_width * seq_len
    for layer in range(shape.n_layers):
        backward = shape.in_backward(layer)
        attention += 3 * attention_forward if backward else attention_forward
        if gradient_checkpointing and backward:
            recompute += shape.layer_forward_flops(layer, tokens) + attention_forward
    return StepFlops(base=base, lora=lora, attention=attention, recompute=recompute, seq_len=seq_len)


def _skipped_in_first_layer(shape: ModelShape, seq_len: int) -> tuple[float, float, float]:
    """Minus the (base, lora, attention) FLOPs per token autograd skips in the first adapted layer.

    Its attention input projections read the layer's input, which has nothing trainable upstream: no
    input gradient for their base weights nor their lora_A; and attention computes no gradient for an
    operand (Q, K or V) without an adapter, nor for the probabilities when neither Q nor K has one.
    """
    first = shape.first_adapted_layer
    readers = [
        linear
        for linear in shape.linears
        if linear.layer is not None and linear.layer == first and linear.name.rsplit(".", 1)[-1] in _ATTENTION_INPUTS
    ]
    with_grad = set("".join(_ATTENTION_INPUTS[linear.name.rsplit(".", 1)[-1]] for linear in readers if linear.r))
    if not with_grad:
        return 0.0, 0.0, 0.0
    operand = 2.0 * seq_len * shape.attention_width
    skipped_operands = len(set("qkv") - with_grad) + (0 if with_grad & {"q", "k"} else 1)
    return (
        -sum(2.0 * linear.params for linear in readers),
        -sum(2.0 * linear.r * linear.in_features for linear in readers),
        -operand * skipped_operands,
    )


# --- peak FLOP/s --------------------------------------------------------------------------------------

# Dense bf16 tensor-core peaks in TFLOP/s, from NVIDIA's datasheets (which print the 2:4 sparsity figure
# first: the dense one is half of it). Matched against torch.cuda.get_device_name(), most specific first.
# RTX 4090: the Ada whitepaper (appendix A) lists bf16 with fp32 accumulate at 165.2 dense / 330.4 sparse;
# 330 is fp16 with fp16 accumulate, 82.6 the non-tensor fp32 rate (Lightning's table uses that one).
# The A10G (AWS) is absent on purpose: NVIDIA publishes no figure for it (the A10's is 125), so an
# A10G gets no MFU rather than a guess; pass --lora-peak-tflops.
PEAK_BF16_TFLOPS: tuple[tuple[str, str, float], ...] = (
    (r"\bgh200\b", "GH200 (H100 SXM)", 989.4),
    (r"\bh200 nvl\b", "H200 NVL", 835.5),
    (r"\bh200\b", "H200 SXM", 989.4),
    (r"\bh100 nvl\b", "H100 NVL", 835.5),
    (r"\bh100\b.*\bpcie\b", "H100 PCIe", 756.5),
    (r"\bh100\b", "H100 SXM", 989.4),
    (r"\ba100\b", "A100", 312.0),
    (r"\bl40s\b", "L40S", 362.1),
    (r"\bl4\b", "L4", 121.0),
    (r"\ba10\b", "A10", 125.0),
    (r"\ba40\b", "A40", 149.7),
    (r"\brtx 4090\b", "RTX 4090", 165.2),
)


@dataclass(frozen=True)
class PeakFlops:
    """A device's peak FLOP/s, where it came from, and why it is missing when it is."""

    flops: float | None
    source: str

    @property
    def known(self) -> bool:
        return self.flops is not None


def peak_flops(device_name: str | None, override_tflops: float | None = None) -> PeakFlops:
    """The dense bf16 peak of a device by name; `override_tflops` (--lora-peak-tflops) wins.

    An unknown device (the CPU included) has no peak: MFU is then None, never a guess.
    """
    if override_tflops is not None:
        return PeakFlops(override_tflops * 1e12, f"--lora-peak-tflops {override_tflops:g}")
    if not device_name:
        return PeakFlops(None, "no accelerator: MFU needs a GPU peak; pass --lora-peak-tflops to set one")
    lowered = device_name.lower()
    for pattern, label, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, lowered):
            return PeakFlops(tflops * 1e12, f"{label} dense bf16 {tflops:g} TFLOP/s (datasheet)")
    return PeakFlops(None, f"no peak FLOP/s known for {device_name!r}; pass --lora-peak-tflops to set one")


def mfu(model_flops_per_token: float, tokens_per_second: float, peak: PeakFlops) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak; None when the peak is unknown."""
    if peak.flops is None or not tokens_per_second > 0:
        return None
    return model_flops_per_token * tokens_per_second / peak.flops
