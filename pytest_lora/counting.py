"""Parameter counting that is right for 4-bit models.

A bitsandbytes `Params4bit` stores two 4-bit values per uint8 element, so a naive
`sum(p.numel())` halves every quantized layer: a 4-bit Llama-2-7b reports 3.27B parameters
instead of 6.74B, and every LoRA percentage computed on it is doubled. Here a 4-bit weight
counts at its logical size, exactly as PEFT's `get_nb_trainable_parameters()` does.
"""

from __future__ import annotations

from collections.abc import Iterable
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
    """One adapted module: its logical in/out features and the rank of its adapter."""

    name: str
    in_features: int
    out_features: int
    r: int

    @property
    def parameters(self) -> int:
        return self.r * (self.in_features + self.out_features)


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


def lora_module_shapes(model: Any, adapter_name: str = "default") -> list[LoraModuleShape]:
    """The adapted modules of a PEFT model with their logical shapes and real ranks."""
    shapes = []
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or adapter_name not in lora_a:
            continue
        base = module.get_base_layer()
        shapes.append(
            LoraModuleShape(
                name=name,
                in_features=int(base.in_features),
                out_features=int(base.out_features),
                r=int(module.r[adapter_name]),
            )
        )
    return shapes


def describe_targets(shapes: Iterable[LoraModuleShape]) -> str:
    """`q_proj, v_proj` from the adapted module names, in first-seen order."""
    seen: dict[str, None] = {}
    for shape in shapes:
        seen[shape.name.rsplit(".", 1)[-1]] = None
    return ", ".join(seen) or "(none)"
