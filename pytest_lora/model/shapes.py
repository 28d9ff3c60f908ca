"""Reading a `ModelShape` from a model without touching its weights.

From a loaded model (4-bit or not), a `PeftModel`, or a skeleton built on the meta device from a
config, so a 7B estimate costs no weights and no GPU. torch, transformers and PEFT are imported
inside the functions.
"""

from __future__ import annotations

from typing import Any

from pytest_lora.core.errors import AdapterConfigError
from pytest_lora.core.shapes import LinearShape, ModelShape, QuantLayout, dtype_bytes, layer_index
from pytest_lora.model.adapters import as_lora_config, base_layer, linear_module_names, matched_modules
from pytest_lora.model.counting import lora_module_shapes
from pytest_lora.model.estimate import module_features, rank_setting
from pytest_lora.model.target_parameters import as_peft_sees_it, parameter_targets


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
