"""Memory of a model's LoRA step, before it runs: the estimate from its shapes, and the check against a budget.

`estimate_memory` reads the `ModelShape` of a model, a config or a hub id (a meta skeleton, no weights)
and prices it with `pytest_lora.core.memory`. `assert_fits_memory` compares that estimate with the
policy's budget or the GPU's free memory before anything is trained.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pytest_lora.core.errors import LoraAssertionError, PolicyError
from pytest_lora.core.memory import DEFAULT_QUANT, GIB, MemoryEstimate, format_bytes, memory_breakdown
from pytest_lora.core.policy import active_policy
from pytest_lora.core.recipe import MemoryRecipe
from pytest_lora.core.shapes import ModelShape, QuantLayout, dtype_bytes
from pytest_lora.model.shapes import model_shape
from pytest_lora.model.training import device_of


def _halve_ranks(shape: ModelShape) -> ModelShape:
    linears = tuple(
        dataclasses.replace(linear, r=max(1, linear.r // 2)) if linear.r else linear for linear in shape.linears
    )
    return dataclasses.replace(shape, linears=linears)


def _only_qv(shape: ModelShape) -> ModelShape | None:
    keep = {"q_proj", "v_proj"}
    names = {linear.name.rsplit(".", 1)[-1] for linear in shape.adapted}
    if not names & keep or names <= keep:
        return None
    linears = tuple(
        linear if linear.name.rsplit(".", 1)[-1] in keep else dataclasses.replace(linear, r=0)
        for linear in shape.linears
    )
    return dataclasses.replace(shape, linears=linears)


def _targets(shape: ModelShape) -> str:
    names = dict.fromkeys(linear.name.rsplit(".", 1)[-1] for linear in shape.adapted)
    ranks = sorted({linear.r for linear in shape.adapted})
    rank = f"r={ranks[0]}" if len(ranks) == 1 else f"r in {ranks}"
    return f"{rank} on {', '.join(names) or '(no adapters)'}"


def fix_options(shape: ModelShape, estimate: MemoryEstimate, budget: int | None = None) -> list[str]:
    """The guide's fixes with the estimate each one gives (`device_total`), marked where it fits `budget`."""
    recipe = estimate.recipe
    batch, seq = estimate.batch_size, estimate.seq_len
    options: list[tuple[str, MemoryEstimate]] = []
    ranks = sorted({linear.r for linear in shape.adapted})
    if ranks and ranks[-1] > 1:
        label = f"lower r ({ranks[-1]} -> {max(1, ranks[-1] // 2)})"
        options.append((label, memory_breakdown(_halve_ranks(shape), batch_size=batch, seq_len=seq, recipe=recipe)))
    fewer = _only_qv(shape)
    if fewer is not None:
        options.append(
            ("adapt only q_proj, v_proj", memory_breakdown(fewer, batch_size=batch, seq_len=seq, recipe=recipe))
        )
    if batch > 1:
        smaller = memory_breakdown(shape, batch_size=batch // 2, seq_len=seq, recipe=recipe)
        options.append((f"batch {batch} -> {batch // 2}", smaller))
    if not recipe.gradient_checkpointing:
        checkpointed = dataclasses.replace(recipe, gradient_checkpointing=True)
        options.append(
            ("gradient checkpointing", memory_breakdown(shape, batch_size=batch, seq_len=seq, recipe=checkpointed))
        )
    lines = []
    for label, alternative in options:
        fits = "" if budget is None else ("  fits" if alternative.device_total <= budget else "  still over")
        lines.append(f"    {label:<28} ~{format_bytes(alternative.device_total)}{fits}")
    return lines


def _budget(model: Any, estimate: MemoryEstimate, budget_bytes: int | None) -> tuple[int, int, str]:
    """(budget, bytes of the estimate that count against it, where the budget comes from)."""
    if budget_bytes is not None:
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, float)) or not 0 < budget_bytes < 2**63:
            raise PolicyError(
                f"assert_fits_memory: budget_bytes = {budget_bytes!r} is not a number of bytes.\n"
                "  fix: pass a positive, finite byte count, e.g. budget_bytes=24 * 2**30 for 24 GiB"
            )
        return int(budget_bytes), estimate.device_total, "budget_bytes"
    policy = active_policy()
    if policy.memory_budget_gb is not None:
        budget = int(policy.memory_budget_gb * GIB)
        return budget, estimate.device_total, f"memory_budget_gb = {policy.memory_budget_gb:g} GiB ({policy.source})"
    device = device_of(model) if hasattr(model, "parameters") else "meta"
    if device.startswith("cuda"):
        import torch

        free, total = torch.cuda.mem_get_info(device)
        # the loaded base and the CUDA context already hold their share: the rest must fit the free memory
        held = estimate.resident + estimate.cuda_context
        return (
            int(free),
            estimate.device_total - held,
            (
                f"free memory on {device} ({format_bytes(free)} of {format_bytes(total)}; the loaded base's "
                f"{format_bytes(estimate.resident)} already in use)"
            ),
        )
    raise PolicyError(
        f"assert_fits_memory: no memory budget to check against on {device}: the policy has no "
        "memory_budget_gb and there is no GPU whose free memory could serve.\n"
        "  fix: set memory_budget_gb in [tool.pytest_lora.policy] (GiB), or pass budget_bytes="
    )


def assert_fits_memory(
    base_or_model: Any,
    config: Any = None,
    *,
    batch_size: int = 8,
    seq_len: int = 64,
    budget_bytes: int | None = None,
    gradient_checkpointing: bool | None = None,
    optimizer: str | None = None,
    quant: QuantLayout | None = DEFAULT_QUANT,
    adapter_dtype: str | None = None,
    master_weights: bool | None = None,
    autocast: str | None = None,
    attention: str | None = None,
    device: str | None = None,
) -> MemoryEstimate:
    """The estimated peak of a LoRA training step fits the budget; returns the estimate.

    The budget is `budget_bytes`, else the policy's `memory_budget_gb` (GiB, 2**30 bytes), else the
    free memory of the GPU the model is on. `base_or_model` and `config` are as for `estimate_memory`:
    a `PeftModel` alone, or a base (loaded, meta, a config, a path) with a LoraConfig. The recipe is the
    policy's `[tool.pytest_lora.policy.memory]` table, with each keyword given here in its place.
    """
    __tracebackhide__ = True
    given: dict[str, Any] = {
        "gradient_checkpointing": gradient_checkpointing,
        "optimizer": optimizer,
        "adapter_dtype": adapter_dtype,
        "master_weights": master_weights,
        "autocast": autocast,
        "attention": attention,
        "device": device,
    }
    recipe = dataclasses.replace(
        active_policy().memory, **{name: value for name, value in given.items() if value is not None}
    )
    shape = shape_for_estimate(base_or_model, config, quant)
    estimate = memory_breakdown(shape, batch_size=batch_size, seq_len=seq_len, recipe=recipe)
    budget, needed, source = _budget(base_or_model, estimate, budget_bytes)
    if needed <= budget:
        return estimate
    lines = [
        f"LoRA training step does not fit in memory: estimated {format_bytes(needed)} > {format_bytes(budget)} "
        f"({source})",
        f"  {_targets(shape)}: {shape.lora_params:,} LoRA params; batch {batch_size} x seq {seq_len}",
        *estimate.lines(),
        "  the guide: 4-bit quantization shrinks the base, but the adapters, their optimizer state and the "
        "activations grow with r, the number of adapted modules and the batch",
        "  fix, with the estimate each gives:",
        *fix_options(shape, estimate, budget + estimate.device_total - needed),
    ]
    raise LoraAssertionError("\n".join(lines))


def shape_for_estimate(base: Any, config: Any = None, quant: QuantLayout | None = DEFAULT_QUANT) -> ModelShape:
    """The `ModelShape` `estimate_memory` works on: a loaded model as it is, anything else as a meta skeleton.

    A skeleton's unquantized weights count at the config's dtype (what `from_pretrained` keeps them in),
    bfloat16 when the config names none.
    """
    from pytest_lora.model.estimate import meta_model

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
    gradient_checkpointing: bool | None = None,
    optimizer: str = "adamw",
    quant: QuantLayout | None = DEFAULT_QUANT,
    adapter_dtype: str | None = None,
    master_weights: bool = False,
    autocast: str | None = None,
    attention: str | None = None,
    device: str = "auto",
) -> MemoryEstimate:
    """Peak memory of one LoRA training step of `base` with adapter `config`, from shapes alone.

    `base`: a loaded model (4-bit or not), a `PeftModel` (its own adapter; `config` then stays None),
    a model on the meta device, a transformers config, a dict of config fields, or a local directory /
    hub id with a config.json: anything but a loaded model is built on the meta device, no weights.
    `quant` says how such a skeleton is stored (default: nf4, double quant, bf16 compute; None: 16-bit);
    a loaded model's own layout is read from its weights. The other keywords are the recipe (see
    `MemoryRecipe`; a bad name raises ValueError): what the step's memory depends on besides shapes.

    The parts (QLoRA, Dettmers et al. 2023): nf4 weights at 0.5 B/param; their fp32 absmax per
    64-value block (0.5 bit/param) or, with double quant, 8-bit absmax plus one fp32 constant per 256
    blocks (~0.127 bit/param), and each layer's code books; unquantized layers (embeddings, lm_head,
    norms) at their dtype; LoRA weights and gradients at the adapters' dtype (PEFT upcasts to fp32 by
    default), an fp32 master copy if asked, the optimizer state (`optimizer_state_bytes`; paged state is
    reported but evictable, so not in the peak); activations (`activation_bytes_per_token`); logits at
    12 B per batch x seq x vocab value (the fp32 log-probabilities kept for backward, and their gradient
    twice during the backward of the loss); one dequantized weight as workspace. With checkpointing the
    loss's logits are freed before any layer is recomputed, so only the larger of the two counts.

    On a CUDA device two terms outside the allocated peak are added (`device_total`): the CUDA context
    (`CUDA_CONTEXT_BYTES`) and the allocator's reserve: PyTorch's caching allocator keeps freed blocks
    for reuse, and with checkpointing the pool holds the blocks of both phases (loss and recompute),
    the case where none of one phase's blocks serves the other. Left out: the optimizer's temporaries
    in its step (the activations are gone by then) and block rounding.
    """
    recipe = MemoryRecipe(
        optimizer=optimizer,
        adapter_dtype=adapter_dtype,
        master_weights=master_weights,
        autocast=autocast,
        gradient_checkpointing=gradient_checkpointing,
        attention=attention,
        device=device,
    )
    return memory_breakdown(
        shape_for_estimate(base, config, quant), batch_size=batch_size, seq_len=seq_len, recipe=recipe
    )
