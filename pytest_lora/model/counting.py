"""Parameter counting that is right for 4-bit models.

A bitsandbytes `Params4bit` stores two 4-bit values per uint8 element, so a naive
`sum(p.numel())` halves every quantized layer: a 4-bit Llama-2-7b reports 3.27B parameters
instead of 6.74B, and every LoRA percentage computed on it is doubled. Here a 4-bit weight
counts at its logical size, exactly as PEFT's `get_nb_trainable_parameters()` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ParamCount:
    """Trainable and total parameters (4-bit weights unpacked), and the trainable share in percent."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"{self.trainable:,} trainable / {self.total:,} total ({self.percent:.4g}%)"


@dataclass(frozen=True)
class LoraModuleShape:
    """One adapted module (or parameter): its logical in/out features and the rank of its adapter.

    A fused MoE parameter (PEFT's `target_parameters`) holds one adapter pair per expert.
    """

    name: str
    in_features: int
    out_features: int
    r: int
    experts: int = 1

    @property
    def per_rank(self) -> int:
        """Adapter parameters per unit of rank."""
        return self.experts * (self.in_features + self.out_features)

    @property
    def parameters(self) -> int:
        return self.r * self.per_rank


def logical_numel(param: Any) -> int:
    """Number of values a parameter stands for: packed 4-bit storage counts twice per byte."""
    numel = int(param.numel())
    if type(param).__name__ == "Params4bit":
        storage = getattr(param, "quant_storage", None)
        itemsize = param.element_size() if hasattr(param, "element_size") else getattr(storage, "itemsize", 1)
        return numel * 2 * itemsize
    return numel


def count_parameters(model: Any) -> ParamCount:
    """Count like PEFT's `get_nb_trainable_parameters()`, for any `nn.Module` (PEFT or not)."""
    trainable = total = 0
    for _, param in model.named_parameters():
        n = logical_numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return ParamCount(trainable=trainable, total=total)


def lora_layers(model: Any, adapter_name: str = "default") -> Iterator[tuple[str, Any]]:
    """(name, LoRA layer) for each adapter of `adapter_name` in a PEFT model.

    A parameter adapted through `target_parameters` is named by that parameter (PEFT nests one
    ParamWrapper per parameter of a module: `experts` and `experts.base_layer`).
    """
    for name, module in model.named_modules():
        ranks = getattr(module, "r", None)
        if isinstance(ranks, dict) and adapter_name in ranks:
            parameter = getattr(module, "parameter_name", None)
            yield (f"{name.replace('.base_layer', '')}.{parameter}" if parameter else name), module


def adapter_weights(layer: Any, adapter_name: str = "default") -> tuple[Any, Any]:
    """The (A, B) weight tensors of one LoRA layer: lora_A / lora_B, or an embedding's lora_embedding_A / _B."""
    if adapter_name in getattr(layer, "lora_embedding_A", {}):
        return layer.lora_embedding_A[adapter_name], layer.lora_embedding_B[adapter_name]
    return layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight


def lora_module_shapes(model: Any, adapter_name: str = "default") -> list[LoraModuleShape]:
    """The adapted modules of a PEFT model with their logical shapes and real ranks.

    The shapes are the LoRA layer's own `in_features` / `out_features`, which PEFT reads from the layer it
    wraps (a Linear4bit's logical shape, a GPT-2 Conv1D's transposed weight, an embedding's vocabulary and
    width, a fused MoE parameter's per-expert shape).
    """
    return [
        LoraModuleShape(
            name=name,
            in_features=int(layer.in_features),
            out_features=int(layer.out_features),
            r=int(layer.r[adapter_name]),
            experts=int(getattr(layer, "num_experts", 1)),
        )
        for name, layer in lora_layers(model, adapter_name)
    ]


def describe_targets(shapes: Iterable[LoraModuleShape]) -> str:
    """`q_proj, v_proj` from the adapted module names, in first-seen order."""
    seen: dict[str, None] = {}
    for shape in shapes:
        parts = shape.name.split(".")
        seen[".".join(parts[-2:]) if parts[-1] == "weight" else parts[-1]] = None  # a router's `gate.weight`
    return ", ".join(seen) or "(none)"
