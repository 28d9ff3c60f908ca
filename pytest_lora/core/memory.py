"""Peak memory of a LoRA training step from its `ModelShape` and recipe: pure arithmetic (stdlib only).

`pytest_lora.model.memory` reads the shape from a model or a config and checks the result against a
budget; `pytest_lora.model.measure` measures what a real step used.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pytest_lora.core.recipe import ADAPTER_DTYPES, OPTIMIZERS, MemoryRecipe, master_weights_error
from pytest_lora.core.shapes import ModelShape, QuantLayout
from pytest_lora.core.values import is_int

# --- estimate from shapes ---------------------------------------------------------------------------

GIB = 2**30
# The CUDA context: the driver's state and the kernels it loaded, outside PyTorch's allocator (so
# never in `torch.cuda.max_memory_allocated`, always in nvidia-smi). About 400 MB with CUDA >= 11.7's
# lazy module loading (ptrblck, pytorch/pytorch#109888; 426 MiB measured on an RTX 6000 Ada in
# unslothai/unsloth-zoo#1053); 287 MB bare and 667 MB with every kernel loaded (pytorch/pytorch#86509).
CUDA_CONTEXT_BYTES = 400 * 2**20
_CODE_BYTES = 16 * 4  # the 4-bit code book (nf4 / fp4: 16 fp32 values), one per layer
_NESTED_CODE_BYTES = 256 * 4 + 4  # double quant: its 8-bit code book (256 fp32) and the fp32 offset
_BNB_MIN_8BIT = 4096  # bitsandbytes `min_8bit_size`: smaller tensors keep 32-bit optimizer state
_BNB_STATE_BLOCK = 256  # bitsandbytes 8-bit optimizer state: one fp32 absmax per 256 values
_BNB_MIN_PAGED = 100_000  # bitsandbytes pages only state buffers of at least 1e5 elements
# LoRA inputs that are one tensor (Llama-family module names): without a cast or dropout each adapter
# keeps that same tensor, counted once. o_proj's input is the attention kernel's own saved output.
_INPUT_SITE = {
    "q_proj": "attention input",
    "k_proj": "attention input",
    "v_proj": "attention input",
    "gate_proj": "mlp input",
    "up_proj": "mlp input",
    "o_proj": "attention output",
}


def format_bytes(count: float) -> str:
    """`1.23 GiB`, `456.7 MiB`, `12.0 KiB`: binary units, as nvidia-smi and torch report memory."""
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= size:
            return f"{count / size:.2f} {unit}"
    return f"{int(count)} B"


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of a LoRA training step, part by part, in bytes (see `estimate_memory`).

    `total` is the allocated peak (what `torch.cuda.max_memory_allocated` reports); `device_total`
    adds what a GPU holds beyond it (the allocator's reserve, the CUDA context) and is what must fit.
    `recipe` is the recipe as priced, every "as the model is" choice resolved.
    """

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
    lora_params: int
    recipe: MemoryRecipe
    master_weights: int = 0
    optimizer_paged: int = 0  # the part of optimizer_state in paged (unified) memory: evictable, not in the peak
    not_at_once: int = 0  # with checkpointing: the smaller of the recomputed layer and the logits
    allocator_reserve: int = 0
    cuda_context: int = 0

    @property
    def gradient_checkpointing(self) -> bool:
        return bool(self.recipe.gradient_checkpointing)

    @property
    def optimizer(self) -> str:
        return self.recipe.optimizer

    @property
    def resident(self) -> int:
        """The base model's own memory: there before any adapter is attached."""
        return self.base_4bit + self.quant_constants + self.base_unquantized

    @property
    def total(self) -> int:
        """The allocated peak: every tensor alive at the step's peak (paged optimizer state excluded)."""
        return (
            self.resident
            + self.lora_weights
            + self.master_weights
            + self.lora_grads
            + self.optimizer_state
            - self.optimizer_paged
            + self.activations
            + self.logits
            + self.workspace
            - self.not_at_once
        )

    @property
    def device_total(self) -> int:
        """What the device must hold: the allocated peak, the allocator's reserve and the CUDA context."""
        return self.total + self.allocator_reserve + self.cuda_context

    def lines(self) -> list[str]:
        """The breakdown, one part a line, for failure messages and reports."""
        recipe = self.recipe
        adapter = ADAPTER_DTYPES[str(recipe.adapter_dtype)]
        copies = (
            f" + autocast's {recipe.autocast} copy"
            if recipe.autocast and recipe.autocast != recipe.adapter_dtype
            else ""
        )
        checkpointing = (
            "with gradient checkpointing: layer inputs + one layer recomputed"
            if recipe.gradient_checkpointing
            else "without gradient checkpointing"
        )
        attention = (
            "eager attention keeps the T x T probabilities" if recipe.attention == "eager" else "fused attention"
        )
        parts = [
            ("base 4-bit weights", self.base_4bit, "0.5 B/param"),
            ("quantization constants", self.quant_constants, "absmax per 64-value block (+ double quant)"),
            ("unquantized layers", self.base_unquantized, "embeddings, lm_head, norms at their dtype"),
            (
                "LoRA weights",
                self.lora_weights,
                f"{self.lora_params:,} params x {adapter} B ({recipe.adapter_dtype}){copies}",
            ),
        ]
        if self.master_weights:
            parts.append(("fp32 master weights", self.master_weights, "4 B/param, updated by the optimizer"))
        parts += [
            ("LoRA gradients", self.lora_grads, f"{adapter} B/param"),
            ("optimizer state", self.optimizer_state, _optimizer_text(recipe.optimizer, self.optimizer_paged)),
            (
                "activations",
                self.activations,
                f"batch {self.batch_size} x seq {self.seq_len}, {checkpointing}; {attention}",
            ),
            ("logits", self.logits, "batch x seq x vocab, fp32 for the loss"),
            ("workspace", self.workspace, "largest 4-bit weight dequantized"),
        ]
        if self.not_at_once:
            parts.append(
                (
                    "not at once",
                    -self.not_at_once,
                    "checkpointing frees the logits before any layer is recomputed: the larger counts",
                )
            )
        lines = [f"  {name:<24}{format_bytes(size):>12}   ({how})" for name, size, how in parts]
        if self.device_total != self.total:
            lines.append(f"  {'allocated peak':<24}{format_bytes(self.total):>12}   (torch.cuda.max_memory_allocated)")
            device = (
                (
                    "allocator reserve",
                    self.allocator_reserve,
                    "blocks of the other phase, kept by the caching allocator",
                ),
                ("CUDA context", self.cuda_context, "driver and kernels, outside the allocator"),
            )
            lines += [f"  {name:<24}{format_bytes(size):>12}   ({how})" for name, size, how in device if size]
        lines.append(f"  {'estimated peak':<24}{format_bytes(self.device_total):>12}")
        return lines


def _optimizer_text(name: str, paged: int) -> str:
    state = OPTIMIZERS[name]
    what = {
        "adam": "two moments, "
        + ("8-bit block-wise" if state.bits == 8 else "at the weights' dtype" if state.param_dtype else "fp32"),
        "sgd": "no state",
        "adafactor": "factored second moment: row + column means, fp32",
    }[state.kind]
    if paged:
        what += f"; {format_bytes(paged)} paged, evicted to CPU RAM under pressure: not in the peak"
    return f"{name}: {what}"


def _resolve_recipe(shape: ModelShape, recipe: MemoryRecipe) -> MemoryRecipe:
    """`recipe` with its "as the model is" choices read from `shape` (the device stays as given).

    adapter_dtype: the attached adapter's, else float32 (PEFT upcasts); gradient_checkpointing: the
    model's; attention: "eager" when the config says so, else "sdpa".
    """
    adapter_dtype = recipe.adapter_dtype or shape.adapter_dtype or "float32"
    if recipe.master_weights and adapter_dtype == "float32":
        raise master_weights_error()
    return dataclasses.replace(
        recipe,
        adapter_dtype=adapter_dtype,
        gradient_checkpointing=(
            shape.gradient_checkpointing if recipe.gradient_checkpointing is None else recipe.gradient_checkpointing
        ),
        attention=recipe.attention or ("eager" if shape.eager_attention else "sdpa"),
    )


def _step_device(shape: ModelShape, recipe: MemoryRecipe) -> str:
    """Where the step runs: the recipe's device, else the loaded model's.

    "meta" is a skeleton planned for an accelerator: 1-byte dropout masks and paged optimizer state
    as on CUDA, but not the context and allocator reserve that only `device="cuda"` adds.
    """
    return shape.device if recipe.device == "auto" else recipe.device


def optimizer_state_bytes(shape: ModelShape, recipe: MemoryRecipe, device: str) -> tuple[int, int]:
    """(optimizer state bytes, the part of it in paged memory) for the adapters' A and B matrices.

    torch AdamW: two moments at the weights' dtype (the fp32 master's with master weights);
    bitsandbytes: fp32 moments, or 8-bit ones (1 B each plus an fp32 absmax per 256 values) for
    tensors of 4,096 elements or more; paged variants put buffers of 1e5+ elements in unified memory
    (not on the CPU, where bitsandbytes falls back to plain buffers). SGD without momentum keeps
    nothing; Adafactor (HF) one fp32 row and one column vector per matrix.
    """
    state = OPTIMIZERS[str(recipe.optimizer)]
    weight = 4 if recipe.master_weights else ADAPTER_DTYPES[str(recipe.adapter_dtype)]
    total = paged = 0
    for linear in shape.adapted:
        for rows, cols in ((linear.r, linear.in_features), (linear.out_features, linear.r)):
            n = rows * cols
            if state.kind == "adafactor":
                total += 4 * (rows + cols)
                continue
            if state.kind == "sgd":
                continue
            if state.bits == 8 and n >= _BNB_MIN_8BIT:
                moments, extra = 2 * n, 2 * 4 * -(-n // _BNB_STATE_BLOCK)
            else:
                moments, extra = 2 * n * (weight if state.param_dtype else 4), 0
            total += moments + extra
            if state.paged and device != "cpu" and n >= _BNB_MIN_PAGED:
                paged += moments
    return total, paged


def _layer_bytes(shape: ModelShape, layer: int, recipe: MemoryRecipe, device: str, seq_len: int, first: bool) -> float:
    """Bytes per token that decoder layer `layer` keeps for backward (see `activation_bytes_per_token`)."""
    c = shape.activation_bytes
    k = ADAPTER_DTYPES[str(recipe.autocast or recipe.adapter_dtype)]  # what the adapters compute in
    mask = k if device == "cpu" else 1
    eager = recipe.attention == "eager"
    norm = 4 * shape.hidden_size + 4
    total: float = norm if first else 2 * norm
    if eager:
        probabilities = (4 + (c if c != 4 else 0)) * shape.n_heads * seq_len
        total += 3 * c * shape.attention_width + probabilities
    else:
        total += c * (2 * shape.attention_width + 2 * shape.kv_width) + 4 * shape.n_heads
    total += (3 if shape.gated_mlp else 1) * c * shape.intermediate_size
    sites: set[str] = set()
    for linear in shape.adapted:
        if linear.layer != layer:
            continue
        if linear.folded:  # PEFT folds it into the fused MoE weight: the weight's inputs are kept instead
            total += c * linear.active * linear.in_features
            continue
        site = _INPUT_SITE.get(linear.name.rsplit(".", 1)[-1])
        total += k * linear.r
        if shape.lora_dropout > 0:
            # dropout keeps its mask only for an input that needs a gradient: not the first layer's q/k/v
            needs_grad = not (first and site == "attention input")
            total += (k + (mask if needs_grad else 0)) * linear.in_features
            continue
        if k != c:
            total += k * linear.in_features
            continue
        if site in sites or (site == "attention output" and not eager):
            continue
        if site is not None:
            sites.add(site)
        total += c * linear.in_features
    return total


def activation_bytes_per_token(
    shape: ModelShape, recipe: MemoryRecipe, device: str, seq_len: int
) -> tuple[float, float]:
    """(bytes kept for backward per token, the largest single layer's share of them), `recipe` resolved.

    This is Korthikanti et al. 2022 (34 s b h per layer for full training) without the inputs kept
    only for weight gradients, checked tensor by tensor against what autograd saves (tests). Per layer
    from the first adapted one on (c = activation element size, k = the adapters' compute element
    size, r the rank; a frozen linear keeps nothing, it needs no weight gradient): each RMSNorm its
    fp32 input and a per-token fp32 rsqrt (4h + 4; the first backward layer's input norm sees no
    gradient and keeps nothing); fused attention (SDPA, flash) q, k, v, its output and the log-sum-exp
    (c (2w + 2w_kv) + 4 heads), eager attention q and the GQA-repeated k, v (3 c w) and the T x T
    probabilities (fp32 softmax output, and its cast to c when c is 16-bit); a gated MLP the gate, its
    activation and up (3 c i), a plain one its pre-activation (c i). Each adapter keeps its rank-r
    middle (k r) and its input: its own dropout output (k in) and mask (1 B on CUDA, k on the CPU)
    with dropout; its own cast (k in) when it computes in another dtype than the activations; else the
    module's input itself, one tensor for q/k/v and one for gate/up, and nothing for o_proj beside a
    fused attention, whose saved output it is. In the first backward layer the q/k/v inputs need no
    gradient, so their dropout keeps no mask. Checkpointing keeps each backward layer's input (c h)
    and one layer's set while it is recomputed; then the final norm (4h + 4). Not modelled: a first
    layer adapted only in its MLP or o_proj keeps less than counted (its attention block needs no
    gradient): a few % on a 4-layer model, a fraction of that on a real one.
    """
    first = shape.first_adapted_layer
    per_layer = [
        _layer_bytes(shape, layer, recipe, device, seq_len, layer == first)
        for layer in range(shape.n_layers)
        if shape.in_backward(layer)
    ]
    if not per_layer:
        return 0.0, 0.0
    final_norm = 4 * shape.hidden_size + 4
    if recipe.gradient_checkpointing:
        return len(per_layer) * shape.activation_bytes * shape.hidden_size + max(per_layer) + final_norm, max(per_layer)
    return sum(per_layer) + final_norm, max(per_layer)


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


def memory_breakdown(
    shape: ModelShape, *, batch_size: int, seq_len: int, recipe: MemoryRecipe | None = None
) -> MemoryEstimate:
    """`estimate_memory` on an already read `ModelShape`: pure arithmetic."""
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name}={value!r}: must be an int >= 1")
    recipe = _resolve_recipe(shape, recipe or MemoryRecipe())
    device = _step_device(shape, recipe)
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
    adapter = ADAPTER_DTYPES[str(recipe.adapter_dtype)]
    autocast_copy = (
        ADAPTER_DTYPES[recipe.autocast] if recipe.autocast and recipe.autocast != recipe.adapter_dtype else 0
    )
    tokens = batch_size * seq_len
    kept, layer = activation_bytes_per_token(shape, recipe, device, seq_len)
    logits = 12 * tokens * shape.vocab_size if lora else 0
    not_at_once = min(int(tokens * layer), logits) if recipe.gradient_checkpointing else 0
    state, paged = optimizer_state_bytes(shape, recipe, device)
    largest = max((linear.params for linear in shape.linears if linear.quantized), default=0) if quant else 0
    on_cuda = device == "cuda"
    return MemoryEstimate(
        base_4bit=packed,
        quant_constants=constants,
        base_unquantized=shape.unquantized_bytes,
        lora_weights=(adapter + autocast_copy) * lora,
        lora_grads=adapter * lora,
        optimizer_state=state,
        activations=int(tokens * kept)
        + folded_weight_bytes(shape, gradient_checkpointing=bool(recipe.gradient_checkpointing)),
        logits=logits,
        workspace=largest * quant.compute_bytes if quant else 0,
        batch_size=batch_size,
        seq_len=seq_len,
        lora_params=lora,
        recipe=recipe,
        master_weights=4 * lora if recipe.master_weights else 0,
        optimizer_paged=paged,
        not_at_once=not_at_once,
        allocator_reserve=not_at_once if on_cuda else 0,
        cuda_context=CUDA_CONTEXT_BYTES if on_cuda else 0,
    )


DEFAULT_QUANT = QuantLayout()
