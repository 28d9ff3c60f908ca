"""Memory as a check: will this LoRA step fit, and what to say when a step ran out of memory.

`assert_fits_memory` compares the shape-based estimate (`memory.estimate_memory`) with the policy's
budget or the GPU's free memory before anything is trained. `run_oom_checked` wraps the work of a
fixture: an out-of-memory error becomes a failed test that gives the measured and the estimated
memory and the guide's fix, after the memory is given back so the next tests can run.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable
from typing import Any, TypeVar

from pytest_lora.assertions import active_policy
from pytest_lora.errors import LoraAssertionError, PolicyError, TrainingError
from pytest_lora.memory import (
    DEFAULT_QUANT,
    GIB,
    MemoryEstimate,
    cpu_peak_bytes,
    format_bytes,
    memory_breakdown,
    shape_for_estimate,
)
from pytest_lora.shapes import ModelShape, QuantLayout
from pytest_lora.training import device_of

T = TypeVar("T")

GUIDE_FIX = (
    "the guide: an out-of-memory error although the 4-bit base fits means the rank is too high or too many "
    "modules are adapted; lower r (e.g. 8 -> 4), adapt fewer modules (only q_proj, v_proj), re-test with a "
    "smaller batch first, or turn on gradient checkpointing"
)


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


# --- out of memory inside a fixture ---------------------------------------------------------------


def _measured_peak(device: str) -> tuple[int, str]:
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    return cpu_peak_bytes(), "process peak RSS"


def release_memory(device: str) -> None:
    """Give freed tensors back: collect reference cycles, then empty the CUDA cache."""
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def run_oom_checked(
    work: Callable[[], T],
    *,
    what: str,
    device: str,
    estimate: Callable[[], MemoryEstimate | None] | None = None,
    release: Callable[[], None] | None = None,
) -> T:
    """`work()`, with an out-of-memory error turned into a failed test (TrainingError) that explains it.

    The message gives the failed allocation, the measured peak, the estimate (`estimate()`, computed
    after the failure, before `release`) and the guide's fix. Then `release()` (e.g. detaching the
    adapter) runs and the memory is collected and the CUDA cache emptied: the error is raised outside
    the `except` block, so no traceback keeps the failed step's activations alive.
    """
    import torch

    try:
        return work()
    except torch.OutOfMemoryError as exc:
        failure = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        peak, peak_source = _measured_peak(device)
    estimated = estimate() if estimate is not None else None  # from shapes, before `release` detaches
    if release is not None:
        release()
    release_memory(device)
    lines = [
        f"out of memory in {what} on {device}: {failure}",
        f"  measured peak before the failure: {format_bytes(peak)} ({peak_source})",
    ]
    if estimated is not None:
        lines += [f"  estimated peak of this step: {format_bytes(estimated.total)}", *estimated.lines()]
    lines += [
        f"  {GUIDE_FIX}",
        "  the memory was freed (gc, CUDA cache emptied) and the adapter removed: later tests run",
    ]
    raise TrainingError("\n".join(lines))
