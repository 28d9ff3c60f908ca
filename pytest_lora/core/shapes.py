"""The shapes the FLOPs and memory estimates need: plain numbers, no model.

A `ModelShape` is every linear layer (logical in/out features, 4-bit or not, decoder layer index,
LoRA rank), the attention and MLP widths, the vocabulary and the bytes of everything kept
unquantized. `pytest_lora.model.shapes` reads one from a loaded, 4-bit, meta or PEFT model; the
FLOPs and memory arithmetic (`core.flops`, `core.memory`) work on it alone. Pure (stdlib only).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_LAYER_INDEX = re.compile(r"\.(\d+)(\.|$)")
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class QuantLayout:
    """How bitsandbytes stores a 4-bit weight: the packed values and their block-wise constants."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    nested_blocksize: int = 256  # double quant: one fp32 constant per 256 8-bit absmax values
    compute_bytes: int = 2  # element size of the compute dtype (bf16 / fp16: 2, fp32: 4)


@dataclass(frozen=True)
class LinearShape:
    """One linear layer: logical shape, decoder layer (None outside the stack), 4-bit or not, LoRA rank.

    A fused MoE weight (a parameter PEFT adapts through `target_parameters`: a stack of `experts`
    matrices of which each token uses `active`, or a router's weight) is `folded`: PEFT's ParamWrapper
    adds its LoRA update into the weight once per step instead of running an adapter on each token.
    """

    name: str
    in_features: int
    out_features: int
    layer: int | None
    quantized: bool
    r: int = 0
    experts: int = 1
    active: int = 1
    folded: bool = False

    @property
    def params(self) -> int:
        """Weights one token is multiplied with (the active experts' share of a stack)."""
        return self.active * self.in_features * self.out_features

    @property
    def lora_params(self) -> int:
        return self.r * self.experts * (self.in_features + self.out_features)

    def lora_forward_flops(self, tokens_per_step: int) -> float:
        """Adapter FLOPs of one forward pass, per token.

        A folded weight costs its update once per step, not per token: B @ A for every expert (2 r in out
        each), which PEFT evaluates twice for an expert stack (`register_parametrization` checks the
        folded weight once before the forward uses it) and once for a 2-D weight (a router).
        """
        if not self.r:
            return 0.0
        if self.folded:
            evaluations = 2 if self.experts > 1 else 1
            return evaluations * self._update_flops() / tokens_per_step
        return 2.0 * self.lora_params

    def lora_flops_per_token(self, tokens_per_step: int) -> float:
        """Adapter FLOPs of a training step, per token: forward, input and weight gradients.

        A folded weight's backward is the two factor gradients of its update (2 x 2 r in out per expert,
        once per step) and, on each token, the gradient of the folded weight, which the frozen base alone
        would not compute (2 in out per active expert).
        """
        if not self.r:
            return 0.0
        if self.folded:
            backward = 2 * self._update_flops() / tokens_per_step + 2.0 * self.params
            return self.lora_forward_flops(tokens_per_step) + backward
        return 6.0 * self.lora_params

    def _update_flops(self) -> float:
        """B @ A for every expert: the update PEFT folds into the weight."""
        return 2.0 * self.r * self.experts * self.in_features * self.out_features


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer as the estimates see it (see the module docstring)."""

    linears: tuple[LinearShape, ...]
    n_layers: int
    hidden_size: int
    n_heads: int
    attention_width: int  # n_heads * head_dim: the width of Q (and of K, V after GQA repeat)
    kv_width: int  # n_kv_heads * head_dim
    intermediate_size: int
    vocab_size: int
    gated_mlp: bool  # SwiGLU-style MLP (gate_proj * up_proj): three activations of width intermediate_size
    eager_attention: bool  # attention probabilities materialised (the T^2 term) instead of SDPA / flash
    activation_bytes: int  # element size of the hidden states (the dtype of the embeddings)
    unquantized_params: int  # embeddings, lm_head, norms, biases: everything not stored in 4 bits
    unquantized_bytes: int  # their bytes, buffers included
    quant: QuantLayout | None  # None: the linears are not quantized
    lora_dropout: float = 0.0
    device: str = "meta"  # where the weights are: "cuda", "cpu", or "meta" for a skeleton
    adapter_dtype: str | None = None  # dtype of an attached adapter's weights ("float32", ...); None: none attached
    gradient_checkpointing: bool = False  # the loaded model's own setting

    @property
    def base_matmul_params(self) -> int:
        """N_base of the FLOPs formula: weights used in a matmul (embedding lookups are not)."""
        return sum(linear.params for linear in self.linears)

    @property
    def lora_params(self) -> int:
        return sum(linear.lora_params for linear in self.linears)

    @property
    def adapted(self) -> tuple[LinearShape, ...]:
        return tuple(linear for linear in self.linears if linear.r)

    @property
    def first_adapted_layer(self) -> int | None:
        """Backward work starts here: no gradient flows into layers below the first adapter.

        An adapter outside the layer stack (e.g. on lm_head) puts it past the last layer.
        """
        layers = [self.n_layers if linear.layer is None else linear.layer for linear in self.adapted]
        return min(layers) if layers else None

    def in_backward(self, layer: int | None) -> bool:
        """Whether a layer (None: outside the stack, i.e. the output head) does backward work."""
        first = self.first_adapted_layer
        if first is None:
            return False
        return (self.n_layers if layer is None else layer) >= first

    def layer_forward_flops(self, layer: int, tokens_per_step: int) -> float:
        """Matmul FLOPs per token of one decoder layer's forward pass, base and adapters."""
        linears = [linear for linear in self.linears if linear.layer == layer]
        return sum(2.0 * linear.params + linear.lora_forward_flops(tokens_per_step) for linear in linears)


def layer_index(name: str) -> int | None:
    """`model.layers.3.self_attn.q_proj` -> 3; None for modules outside the numbered stack."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def dtype_bytes(dtype: Any, default: int = 2) -> int:
    """Element size of a dtype given as a torch dtype or its name (`torch.bfloat16`, "float32")."""
    return _DTYPE_BYTES.get(str(dtype).removeprefix("torch."), default)
