"""The memory estimate against what the model really holds, the budget check, out-of-memory handling."""

from __future__ import annotations

import re
import weakref

import pytest
import torch
from conftest import lora_config

from pytest_lora.core.errors import AdapterConfigError, LoraAssertionError, PolicyError, TrainingError
from pytest_lora.core.memory import CUDA_CONTEXT_BYTES, GIB, format_bytes
from pytest_lora.core.policy import Policy, use_policy
from pytest_lora.core.recipe import MemoryRecipe
from pytest_lora.core.shapes import QuantLayout
from pytest_lora.model.loading import builtin_model_dir
from pytest_lora.model.measure import run_oom_checked
from pytest_lora.model.memory import assert_fits_memory, estimate_memory, shape_for_estimate

# Llama-2-7b's shape (FACTS.md): 6,738,415,616 parameters; r=8 on q_proj, v_proj trains 4,194,304.
LLAMA_2_7B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "dtype": "float16",
}


def tensor_bytes(tensor) -> int:
    return int(tensor.numel()) * tensor.element_size()


def quantized_storage_bytes(model) -> tuple[int, int]:
    """(packed 4-bit weights, every quantization constant tensor) as bitsandbytes really stores them."""
    packed = constants = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is None:
            continue
        packed += tensor_bytes(weight)
        constants += tensor_bytes(state.absmax) + tensor_bytes(state.code)
        if state.nested:
            constants += (
                tensor_bytes(state.offset) + tensor_bytes(state.state2.absmax) + tensor_bytes(state.state2.code)
            )
    return packed, constants


def test_resident_parts_equal_what_bitsandbytes_stores(lora_base_model):
    estimate = estimate_memory(lora_base_model, lora_config(8), batch_size=1, seq_len=8)
    packed, constants = quantized_storage_bytes(lora_base_model)
    assert (estimate.base_4bit, estimate.quant_constants) == (packed, constants)
    quantized = {id(m.weight) for m in lora_base_model.modules() if hasattr(getattr(m, "weight", None), "quant_state")}
    others = sum(tensor_bytes(p) for p in lora_base_model.parameters() if id(p) not in quantized)
    assert estimate.base_unquantized == others + sum(tensor_bytes(b) for b in lora_base_model.buffers())


def test_a_config_on_disk_gives_the_loaded_models_estimate(lora_base_model, lora_settings):
    """From config.json alone (meta device, no weights): the same numbers as the loaded 4-bit model."""
    loaded = estimate_memory(lora_base_model, lora_config(8), batch_size=4, seq_len=32)
    directory = builtin_model_dir(lora_settings.cache_dir)
    from_config = estimate_memory(str(directory), lora_config(8), batch_size=4, seq_len=32)
    assert from_config == loaded


def test_peft_model_and_base_plus_config_agree(lora_base_model, lora_model):
    config = lora_config(16, target_modules="all-linear", lora_dropout=0.1)
    before = estimate_memory(lora_base_model, config, batch_size=2, seq_len=16)
    after = estimate_memory(lora_model(config), batch_size=2, seq_len=16)
    assert before == after
    n = 4 * 16 * (128 + 96 + 96 + 128 + 256 + 256 + 256)
    assert after.lora_params == n
    assert (after.lora_weights, after.lora_grads, after.optimizer_state) == (4 * n, 4 * n, 8 * n)
    with pytest.raises(AdapterConfigError, match="already carries a LoRA adapter"):
        estimate_memory(lora_model(config), config, batch_size=2, seq_len=16)


def test_llama_2_7b_skeleton_matches_the_known_counts():
    shape = shape_for_estimate(LLAMA_2_7B, lora_config(8))
    quantized = sum(linear.params for linear in shape.linears if linear.quantized)
    assert quantized + shape.unquantized_params == 6_738_415_616
    assert shape.lora_params == 4_194_304
    estimate = estimate_memory(LLAMA_2_7B, lora_config(8), batch_size=1, seq_len=512)
    assert estimate.base_4bit == quantized // 2
    assert estimate.quant_constants * 8 / quantized == pytest.approx(0.127, abs=0.002)  # QLoRA: ~0.127 bit
    rotary_buffers = 2 * 64 * 4  # inv_freq and original_inv_freq, fp32
    assert estimate.base_unquantized == 2 * shape.unquantized_params + rotary_buffers  # embeddings, lm_head, norms
    assert (estimate.lora_weights, estimate.lora_grads, estimate.optimizer_state) == (
        4 * 4_194_304,
        4 * 4_194_304,
        8 * 4_194_304,
    )
    plain_quant = estimate_memory(
        LLAMA_2_7B, lora_config(8), batch_size=1, seq_len=512, quant=QuantLayout(double_quant=False)
    )
    assert plain_quant.quant_constants * 8 / quantized == pytest.approx(0.5, abs=0.002)  # fp32 absmax / 64


def autograd_saved_bytes(model, skip: set[int], batch_size: int = 4, seq_len: int = 64) -> int:
    """Bytes autograd saves for backward in one training step of `model` (CPU, saved-tensor hooks),
    each storage once, storages in `skip` (the weights) left out."""
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens = torch.randint(0, 256, (batch_size, seq_len))
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    return sum(saved.values())


def storages(model) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}


def test_activations_match_the_tensors_autograd_keeps(lora_base_model, lora_model):
    """The activation term against the bytes autograd really saves for backward (CPU, saved-tensor hooks)."""
    params = storages(lora_base_model)
    for config in (lora_config(8), lora_config(16, target_modules="all-linear", lora_dropout=0.1)):
        model = lora_model(config)
        measured = autograd_saved_bytes(model, params)
        estimate = estimate_memory(model, batch_size=4, seq_len=64)
        kept_logits = 4 * 4 * 64 * 256  # the fp32 log-probabilities; the rest of `logits` is transient
        assert abs((estimate.activations + kept_logits) / measured - 1) < 0.10, (estimate.activations, measured)


def test_activations_scale_with_batch_and_shrink_with_checkpointing():
    one = estimate_memory(LLAMA_2_7B, lora_config(8), batch_size=1, seq_len=1024)
    four = estimate_memory(LLAMA_2_7B, lora_config(8), batch_size=4, seq_len=1024)
    checkpointed = estimate_memory(LLAMA_2_7B, lora_config(8), batch_size=4, seq_len=1024, gradient_checkpointing=True)
    assert four.activations == pytest.approx(4 * one.activations, rel=1e-6)
    assert four.logits == 4 * one.logits == 4 * 12 * 1024 * 32000
    assert checkpointed.activations < four.activations / 10
    assert four.resident == one.resident


def test_optimizer_state_by_optimizer():
    sizes = {
        name: estimate_memory(LLAMA_2_7B, lora_config(8), batch_size=1, seq_len=8, optimizer=name).optimizer_state
        for name in ("adamw", "adamw_torch_fused", "adamw_8bit", "sgd")
    }
    # bitsandbytes' 8-bit moments: 1 B per value each, plus one fp32 absmax per 256 values each
    eight_bit = 2 * 4_194_304 + 2 * 4 * (4_194_304 // 256)
    assert sizes == {"adamw": 8 * 4_194_304, "adamw_torch_fused": 8 * 4_194_304, "adamw_8bit": eight_bit, "sgd": 0}
    with pytest.raises(ValueError, match="optimizer='lion'"):
        estimate_memory(LLAMA_2_7B, lora_config(8), batch_size=1, seq_len=8, optimizer="lion")


def test_bad_batch_is_refused():
    with pytest.raises(ValueError, match="batch_size=0"):
        estimate_memory(LLAMA_2_7B, lora_config(8), batch_size=0, seq_len=8)


def test_breakdown_lines_name_every_part():
    text = "\n".join(estimate_memory(LLAMA_2_7B, lora_config(8), batch_size=1, seq_len=8).lines())
    for part in ("base 4-bit weights", "quantization constants", "LoRA weights", "optimizer state", "activations"):
        assert part in text
    assert "estimated peak" in text


@pytest.mark.parametrize(
    ("count", "text"), [(0, "0 B"), (1023, "1023 B"), (1536, "1.50 KiB"), (3 * 2**20, "3.00 MiB"), (GIB, "1.00 GiB")]
)
def test_format_bytes(count, text):
    assert format_bytes(count) == text


# --- the recipe: what the step's memory depends on besides shapes ---------------------------------------


@pytest.mark.parametrize(
    ("config", "adapter_dtype", "attention"),
    [
        pytest.param(lora_config(8, target_modules="all-linear"), None, "sdpa", id="fp32-inputs-shared"),
        pytest.param(lora_config(8, target_modules="all-linear"), None, "eager", id="fp32-eager"),
        pytest.param(lora_config(8, target_modules="all-linear"), torch.bfloat16, "eager", id="bf16-casts-eager"),
        pytest.param(
            lora_config(8, target_modules="all-linear", lora_dropout=0.1), torch.bfloat16, "sdpa", id="bf16-dropout"
        ),
    ],
)
def test_activations_follow_the_recipe_tensor_for_tensor(lora_base_model, lora_model, config, adapter_dtype, attention):
    """Adapter dtype, dropout and attention change what autograd keeps: the estimate follows within 1%.

    The tiny model computes in fp32 on the CPU: fp32 adapters keep the module's input itself (one tensor
    for q/k/v, one for gate/up, o_proj's is the fused attention's output), bf16 ones their own cast;
    dropout keeps its output and mask; eager attention its probabilities. Left out by the estimate:
    the labels and the rotary cos/sin tables (~5 KB here).
    """
    own = lora_base_model.config._attn_implementation
    lora_base_model.set_attn_implementation(attention)
    try:
        model = lora_model(config)
        if adapter_dtype is not None:
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.data = param.data.to(adapter_dtype)
        measured = autograd_saved_bytes(model, storages(model), batch_size=2, seq_len=32)
        estimate = estimate_memory(model, batch_size=2, seq_len=32)
    finally:
        lora_base_model.set_attn_implementation(own)
    assert estimate.recipe.attention == attention
    assert estimate.recipe.adapter_dtype == ("bfloat16" if adapter_dtype else "float32")
    kept_logits = 4 * 2 * 32 * 256
    assert abs((estimate.activations + kept_logits) / measured - 1) < 0.01, (estimate.activations, measured)


def test_the_attached_adapters_dtype_prices_weights_gradients_and_state(lora_model):
    model = lora_model(lora_config(8))
    n = 4 * 8 * (64 + 64 + 64 + 32)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(torch.bfloat16)
    bf16 = estimate_memory(model, batch_size=2, seq_len=16)
    assert (bf16.lora_weights, bf16.lora_grads, bf16.optimizer_state) == (2 * n, 2 * n, 4 * n)  # torch AdamW
    master = estimate_memory(model, batch_size=2, seq_len=16, master_weights=True)
    assert (master.master_weights, master.optimizer_state) == (4 * n, 8 * n)  # the optimizer runs on the master
    assert master.total - bf16.total == 8 * n
    fp32 = estimate_memory(model, batch_size=2, seq_len=16, adapter_dtype="float32")
    assert (fp32.lora_weights, fp32.optimizer_state) == (4 * n, 8 * n)


def test_optimizer_state_of_each_optimizer(lora_base_model):
    """bitsandbytes: 8-bit moments only for tensors of 4,096+ values, paged buffers only from 1e5 values;
    HF Adafactor: one fp32 row and one column vector per matrix."""
    r8 = 4_194_304  # r=8 on q_proj, v_proj of Llama-2-7b: 128 matrices of 32,768 values
    state = {
        name: estimate_memory(LLAMA_2_7B, lora_config(8), batch_size=1, seq_len=8, optimizer=name, device="cuda")
        for name in ("adafactor", "paged_adamw_32bit", "paged_adamw_8bit")
    }
    assert state["adafactor"].optimizer_state == 4 * 64 * ((8 + 4096) + (4096 + 8))
    assert state["paged_adamw_32bit"].optimizer_state == 8 * r8
    assert state["paged_adamw_32bit"].optimizer_paged == state["paged_adamw_8bit"].optimizer_paged == 0  # < 1e5
    r64 = estimate_memory(
        LLAMA_2_7B, lora_config(64), batch_size=1, seq_len=8, optimizer="paged_adamw_8bit", device="cuda"
    )
    assert r64.optimizer_paged == 2 * 8 * r8  # 262,144-value matrices: both 8-bit moments paged, absmax not
    assert r64.optimizer_state == r64.optimizer_paged + 2 * 4 * (8 * r8 // 256)
    unpaged = estimate_memory(
        LLAMA_2_7B, lora_config(64), batch_size=1, seq_len=8, optimizer="adamw_8bit", device="cuda"
    )
    assert unpaged.total - r64.total == r64.optimizer_paged
    assert "paged, evicted to CPU RAM under pressure: not in the peak" in "\n".join(r64.lines())
    tiny = estimate_memory(lora_base_model, lora_config(8), batch_size=1, seq_len=8, optimizer="adamw_8bit")
    assert tiny.optimizer_state == 8 * tiny.lora_params  # 512-value matrices keep fp32 moments


def test_checkpointing_frees_the_logits_before_the_recompute():
    """The allocated peak counts the larger of the loss's logits and a recomputed layer; on CUDA the
    allocator's pool keeps the other too, and the CUDA context comes on top."""
    step = {"batch_size": 1, "seq_len": 4096}
    plain = estimate_memory(LLAMA_2_7B, lora_config(8), **step, device="cuda")
    assert plain.not_at_once == plain.allocator_reserve == 0
    assert plain.device_total == plain.total + CUDA_CONTEXT_BYTES
    planned = estimate_memory(LLAMA_2_7B, lora_config(8), **step, gradient_checkpointing=True)
    on_cuda = estimate_memory(LLAMA_2_7B, lora_config(8), **step, gradient_checkpointing=True, device="cuda")
    parts = planned.resident + planned.lora_weights + planned.lora_grads + planned.optimizer_state
    parts += planned.activations + planned.logits + planned.workspace
    assert 0 < planned.not_at_once <= planned.logits
    assert planned.total == parts - planned.not_at_once
    assert planned.device_total == planned.total  # a skeleton on "auto": the allocated peak only
    assert on_cuda.total == planned.total
    assert on_cuda.device_total == parts + CUDA_CONTEXT_BYTES
    text = "\n".join(on_cuda.lines())
    for part in ("not at once", "allocated peak", "allocator reserve", "CUDA context", "estimated peak"):
        assert part in text


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ({"adapter_dtype": "int8"}, "adapter_dtype='int8' is not one of float32, bfloat16, float16"),
        ({"autocast": "float32"}, "autocast='float32' is not one of bfloat16, float16"),
        ({"attention": "flash"}, "attention='flash' is not one of eager, sdpa, flash_attention_2"),
        ({"device": "tpu"}, "device='tpu' is not one of auto, cuda, cpu"),
        ({"master_weights": True, "adapter_dtype": "float32"}, "master_weights=true needs 16-bit adapters"),
        ({"master_weights": True}, "master_weights=true needs 16-bit adapters"),  # PEFT's fp32, resolved
    ],
)
def test_a_bad_recipe_is_refused(recipe, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        estimate_memory(LLAMA_2_7B, lora_config(8), batch_size=1, seq_len=8, **recipe)


def test_the_policy_recipe_prices_assert_fits_memory():
    """`[tool.pytest_lora.policy.memory]` is the default recipe; a keyword given to the check wins."""
    recipe = MemoryRecipe(optimizer="paged_adamw_8bit", adapter_dtype="bfloat16", gradient_checkpointing=True)
    config = lora_config(64, target_modules="all-linear")
    with use_policy(Policy(memory=recipe)):
        estimate = assert_fits_memory(LLAMA_2_7B, config, batch_size=1, seq_len=512, budget_bytes=24 * GIB)
        assert estimate.recipe.optimizer == "paged_adamw_8bit" and estimate.gradient_checkpointing
        plain = assert_fits_memory(
            LLAMA_2_7B, config, batch_size=1, seq_len=512, budget_bytes=24 * GIB, gradient_checkpointing=False
        )
    assert (plain.recipe.optimizer, plain.gradient_checkpointing) == ("paged_adamw_8bit", False)
    assert estimate == estimate_memory(
        LLAMA_2_7B,
        config,
        batch_size=1,
        seq_len=512,
        optimizer="paged_adamw_8bit",
        adapter_dtype="bfloat16",
        gradient_checkpointing=True,
    )


def test_a_bad_memory_recipe_in_the_policy_stops_the_session(lora_pytester: pytest.Pytester) -> None:
    lora_pytester.makepyprojecttoml('[tool.pytest_lora.policy.memory]\noptimizer = "lion"\n')
    lora_pytester.makepyfile("def test_never_runs():\n    raise AssertionError('must not run')\n")
    result = lora_pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: pytest-lora: *pyproject.toml *tool.pytest_lora.policy* memory: optimizer='lion' is not one of *"]
    )


# --- assert_fits_memory ------------------------------------------------------------------------------


def test_fits_returns_the_estimate():
    estimate = assert_fits_memory(LLAMA_2_7B, lora_config(8), batch_size=1, seq_len=512, budget_bytes=24 * GIB)
    assert estimate.total < 24 * GIB


def test_over_budget_message_is_a_diagnosis():
    with pytest.raises(LoraAssertionError) as info:
        assert_fits_memory(
            LLAMA_2_7B,
            lora_config(64, target_modules="all-linear"),
            batch_size=8,
            seq_len=2048,
            budget_bytes=24 * GIB,
        )
    message = str(info.value)
    assert message.startswith("LoRA training step does not fit in memory: estimated ")
    assert "> 24.00 GiB (budget_bytes)" in message
    assert "r=64 on q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in message
    for part in ("base 4-bit weights", "activations", "estimated peak", "the guide"):
        assert part in message
    for fix in ("lower r (64 -> 32)", "adapt only q_proj, v_proj", "batch 8 -> 4", "gradient checkpointing"):
        assert fix in message


def test_budget_from_the_policy_in_gib():
    config = lora_config(8)
    needed = estimate_memory(LLAMA_2_7B, config, batch_size=1, seq_len=512).total
    with use_policy(Policy(memory_budget_gb=needed / GIB * 1.01)):
        assert_fits_memory(LLAMA_2_7B, config, batch_size=1, seq_len=512)
    with use_policy(Policy(memory_budget_gb=needed / GIB * 0.99)), pytest.raises(LoraAssertionError) as info:
        assert_fits_memory(LLAMA_2_7B, config, batch_size=1, seq_len=512)
    assert "memory_budget_gb = " in str(info.value)


@pytest.mark.parametrize("budget", [float("inf"), float("nan"), 0, -1, True, "24GB", 2**70])
def test_a_budget_that_is_no_byte_count_is_a_policy_error(budget):
    with pytest.raises(PolicyError, match=re.escape(f"budget_bytes = {budget!r} is not a number of bytes")):
        assert_fits_memory(LLAMA_2_7B, lora_config(8), batch_size=1, seq_len=512, budget_bytes=budget)


def test_no_budget_and_no_gpu_is_a_clear_error(lora_base_model):
    if torch.cuda.is_available():
        pytest.skip("on a GPU the free memory is the budget")
    with pytest.raises(PolicyError, match="no memory budget to check against on cpu"):
        assert_fits_memory(lora_base_model, lora_config(8))


# --- out of memory inside a fixture -------------------------------------------------------------------


def test_out_of_memory_becomes_a_diagnosis_and_frees_the_step(lora_base_model):
    released = []
    big: list[weakref.ref] = []

    def step():
        activations = torch.ones(1_000_000)  # what a failed forward leaves in its frames
        big.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with pytest.raises(TrainingError) as info:
        run_oom_checked(
            step,
            what="lora_benchmark (r=8)",
            device="cpu",
            estimate=lambda: estimate_memory(lora_base_model, lora_config(8), batch_size=2, seq_len=16),
            release=lambda: released.append(True),
        )
    message = str(info.value)
    assert message.startswith("out of memory in lora_benchmark (r=8) on cpu: CUDA out of memory. Tried to allocate")
    assert "measured peak before the failure" in message and "estimated peak of this step" in message
    assert "lower r" in message and "gradient checkpointing" in message
    assert released == [True]
    assert big[0]() is None, "the failed step's tensors are still referenced (traceback kept alive)"
    assert info.value.__context__ is None and info.value.__cause__ is None


def test_other_errors_pass_through():
    def step():
        raise RuntimeError("not memory")

    with pytest.raises(RuntimeError, match="not memory"):
        run_oom_checked(step, what="x", device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: compares with max_memory_allocated")
def test_estimate_against_cuda_max_memory_allocated(tmp_path):
    """A 4-bit random-init Llama (1024 wide, 8 layers, 32k vocab) on the GPU: estimate within 15% of measured."""
    from conftest import load_4bit_on_cuda
    from transformers import LlamaConfig, LlamaForCausalLM

    from pytest_lora.model.adapters import AdapterManager

    shape = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16)
    LlamaForCausalLM(LlamaConfig(**shape, vocab_size=32000, dtype="bfloat16")).save_pretrained(tmp_path)
    model = AdapterManager(load_4bit_on_cuda(tmp_path)).attach(lora_config(16))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens = torch.randint(0, 32000, (4, 512), device="cuda:0")
    model.train()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    estimate = estimate_memory(model, batch_size=4, seq_len=512)
    error = estimate.total / measured - 1
    print(f"estimate {format_bytes(estimate.total)} vs measured {format_bytes(measured)}: {error:+.1%}")
    assert abs(error) < 0.15, "\n".join(estimate.lines())
