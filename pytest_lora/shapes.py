"""The shapes the FLOPs and memory estimates need, read from a model without touching its weights.

A `ModelShape` is plain numbers: every linear layer (logical in/out features, 4-bit or not, decoder
layer index, LoRA rank), the attention and MLP widths, the vocabulary and the bytes of everything
kept unquantized. It is read from a loaded model (4-bit or not), a `PeftModel`, or a skeleton built
on the meta device from a config, so a 7B estimate costs no weights and no GPU. torch, transformers
and PEFT are imported inside the functions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pytest_lora.adapters import as_lora_config, base_layer, linear_module_names, matched_modules
from pytest_lora.counting import lora_module_shapes
from pytest_lora.errors import AdapterConfigError
from pytest_lora.estimate import module_features, rank_setting
from pytest_lora.target_parameters import as_peft_sees_it, parameter_targets

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


def _config_value(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _ranks(model: Any, config: Any) -> tuple[dict[str, int], float]:
    """Rank per adapted module name and the dropout, from a PeftModel or a LoraConfig on a plain base."""
    if hasattr(model, "peft_config"):
        if config is not None:
            raise AdapterConfigError(
                f"{type(model).__name__} already carries a LoRA adapter, so a second config would not apply.\n"
                "  fix: pass the PeftModel alone, or its base model with the config"
            )
        peft_config = model.peft_config.get("default") or next(iter(model.peft_config.values()))
        prefix = "base_model.model."
        ranks = {shape.name.removeprefix(prefix): shape.r for shape in lora_module_shapes(model)}
        return ranks, float(peft_config.lora_dropout)
    if config is None:
        return {}, 0.0
    config = as_lora_config(config)
    names = matched_modules(model, config)
    ranks = {name: int(rank_setting(config, name)[1]) for name in names}
    ranks.update({shape.name: shape.r for shape in parameter_targets(model, as_peft_sees_it(model, config), names)})
    return ranks, float(config.lora_dropout)


def _fused_weights(base: Any, ranks: dict[str, int]) -> list[LinearShape]:
    """The weights PEFT can only adapt as parameters (fused MoE experts, routers), adapted or not.

    Taken from what "all-linear" would adapt through `target_parameters`, so that the experts' base FLOPs
    count even when no adapter is on them. Each token runs through `num_experts_per_tok` experts.
    """
    from peft import LoraConfig

    all_linear = as_peft_sees_it(base, LoraConfig(target_modules="all-linear"))
    top_k = _config_value(base.config, "num_experts_per_tok", "moe_topk", default=None)
    return [
        LinearShape(
            shape.name,
            shape.in_features,
            shape.out_features,
            layer_index(shape.name),
            quantized=False,  # bitsandbytes quantizes nn.Linear layers only: fused experts stay 16-bit
            r=ranks.get(shape.name, 0),
            experts=shape.experts,
            active=int(top_k or shape.experts) if shape.experts > 1 else 1,
            folded=True,
        )
        for shape in parameter_targets(base, all_linear)
    ]


def _quant_layout(model: Any) -> QuantLayout | None:
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            nested = bool(state.nested)
            return QuantLayout(
                quant_type=str(state.quant_type),
                blocksize=int(state.blocksize),
                double_quant=nested,
                nested_blocksize=int(state.state2.blocksize) if nested else 256,
                compute_bytes=dtype_bytes(getattr(module, "compute_dtype", None)),
            )
    return None


def dtype_bytes(dtype: Any, default: int = 2) -> int:
    """Element size of a dtype given as a torch dtype or its name (`torch.bfloat16`, "float32")."""
    return _DTYPE_BYTES.get(str(dtype).removeprefix("torch."), default)


def model_shape(
    model: Any, config: Any = None, *, quant: QuantLayout | None = None, element_bytes: int | None = None
) -> ModelShape:
    """The shape of `model` (plain, 4-bit, meta or a `PeftModel`) with `config`'s adapters (if given).

    For a skeleton on the meta device: `quant` says how its linears would be stored (given, every linear
    but the output head counts as 4-bit, as transformers' bitsandbytes integration leaves the head
    unquantized) and `element_bytes` the element size its other weights and activations would have.
    A loaded model answers both from its own weights.
    """
    ranks, dropout = _ranks(model, config)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    adapter = next((param for name, param in model.named_parameters() if "lora_" in name), None)
    layout = _quant_layout(base)
    skeleton_quant = quant if layout is None else None
    layout = layout or quant
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    head_name = next((name for name, module in base.named_modules() if module is head), None)
    linears = []
    quantized_weights: set[int] = set()
    for names in linear_module_names(base).values():
        for name in names:
            module = base_layer(base.get_submodule(name))
            features = module_features(module)
            if features is None:
                continue
            in_features, out_features = features
            is_4bit = type(module).__name__ == "Linear4bit"
            if skeleton_quant is not None and name != head_name:
                is_4bit = True
            if is_4bit:
                quantized_weights.add(id(module.weight))
            layer = layer_index(name) if name != head_name else None
            linears.append(LinearShape(name, in_features, out_features, layer, is_4bit, ranks.get(name, 0)))
    linears += _fused_weights(base, ranks)
    unquantized_params = unquantized_bytes = 0
    for name, param in base.named_parameters():
        if id(param) in quantized_weights or "lora_" in name:
            continue
        unquantized_params += int(param.numel())
        unquantized_bytes += int(param.numel()) * (element_bytes or param.element_size())
    unquantized_bytes += sum(int(b.numel()) * b.element_size() for b in base.buffers())
    adapter_dtype = str(adapter.dtype).removeprefix("torch.") if adapter is not None else None
    return _assemble(
        base, tuple(linears), layout, unquantized_params, unquantized_bytes, dropout, element_bytes, adapter_dtype
    )


def _assemble(
    base: Any,
    linears: tuple[LinearShape, ...],
    layout: QuantLayout | None,
    unquantized_params: int,
    unquantized_bytes: int,
    dropout: float,
    element_bytes: int | None,
    adapter_dtype: str | None,
) -> ModelShape:
    config = base.config
    hidden = int(_config_value(config, "hidden_size", "n_embd", "d_model"))
    n_heads = int(_config_value(config, "num_attention_heads", "n_head"))
    head_dim = int(_config_value(config, "head_dim", default=hidden // n_heads))
    n_kv = int(_config_value(config, "num_key_value_heads", default=n_heads))
    layers = [linear.layer for linear in linears if linear.layer is not None]
    n_layers = int(_config_value(config, "num_hidden_layers", "n_layer", default=max(layers, default=-1) + 1))
    names = {linear.name.rsplit(".", 1)[-1] for linear in linears}
    intermediate = _config_value(config, "intermediate_size", "n_inner", "ffn_dim", default=None) or 4 * hidden
    embeddings = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    activation_bytes = element_bytes or (embeddings.weight.element_size() if embeddings is not None else 2)
    device = next((param.device.type for param in base.parameters()), "meta")
    checkpointing = any(getattr(module, "gradient_checkpointing", False) is True for module in base.modules())
    return ModelShape(
        linears=linears,
        n_layers=n_layers,
        hidden_size=hidden,
        n_heads=n_heads,
        attention_width=n_heads * head_dim,
        kv_width=n_kv * head_dim,
        intermediate_size=int(intermediate),
        vocab_size=int(config.vocab_size),
        gated_mlp=any("gate" in name for name in names),
        eager_attention=getattr(config, "_attn_implementation", None) == "eager",
        activation_bytes=int(activation_bytes),
        unquantized_params=unquantized_params,
        unquantized_bytes=unquantized_bytes,
        quant=layout,
        lora_dropout=dropout,
        device=device,
        adapter_dtype=adapter_dtype,
        gradient_checkpointing=checkpointing,
    )
