"""The FLOPs formula against torch's own FLOP counter, the peak table, MFU."""

from __future__ import annotations

import functools

import pytest
from _flop_counter import SEQ, counted_flops_per_token, tiny_unquantized
from conftest import lora_config

from pytest_lora.core.flops import PEAK_BF16_TFLOPS, PeakFlops, mfu, peak_flops, step_flops
from pytest_lora.model.loading import TINY_LLAMA_CONFIG
from pytest_lora.model.shapes import model_shape

CONFIGS = {
    "q_proj,v_proj r=8": lora_config(8),
    "all-linear r=16": lora_config(16, target_modules="all-linear"),
    "q,k,v,o r=4 rank_pattern": lora_config(
        4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], rank_pattern={"o_proj": 12}
    ),
    "last two layers only": lora_config(8, layers_to_transform=[2, 3]),
    "v_proj only": lora_config(8, target_modules=["v_proj"]),
    "q_proj only": lora_config(8, target_modules=["q_proj"]),
    "MLP only": lora_config(8, target_modules=["gate_proj", "up_proj", "down_proj"]),
}


@functools.cache
def formula_and_counted(name: str, seq_len: int = SEQ) -> tuple[float, float]:
    """(the formula's model FLOPs, FlopCounterMode's count), per token."""
    model = tiny_unquantized(CONFIGS[name])
    return step_flops(model_shape(model), seq_len).model, counted_flops_per_token(model, seq_len)


@pytest.mark.parametrize(
    ("name", "seq_len"),
    [(name, SEQ) for name in CONFIGS if name != "MLP only"] + [("q_proj,v_proj r=8", 256)],
)
def test_formula_equals_flop_counter(name, seq_len):
    formula, counted = formula_and_counted(name, seq_len)
    assert formula == counted


def test_mlp_only_targets_read_high_as_documented():
    """The first adapted layer's attention block needs no backward at all: left out (flops.py), 10% high here."""
    formula, counted = formula_and_counted("MLP only")
    assert 1.05 < formula / counted < 1.12


def test_formula_terms_on_the_tiny_model():
    shape = model_shape(tiny_unquantized(lora_config(8)))
    flops = step_flops(shape, SEQ)
    n_base, n_lora = shape.base_matmul_params, shape.lora_params
    assert (n_base, n_lora) == (4 * 49_152 + 64 * 256, 4 * 8 * (128 + 96))
    qkv_layer_0 = 64 * 64 + 64 * 32 + 64 * 32
    assert flops.base == 4 * n_base - 2 * qkv_layer_0  # their input needs no gradient in layer 0
    assert flops.lora == 6 * n_lora - 2 * 8 * 64 * 2  # nor does lora_A's of q_proj and v_proj there
    assert flops.attention == 12 * 4 * 64 * SEQ - 2 * 64 * SEQ  # K has no adapter: no dK in layer 0
    assert flops.recompute == 0 and flops.hardware == flops.model


def test_layers_below_the_first_adapter_count_forward_only():
    shape = model_shape(tiny_unquantized(lora_config(8, layers_to_transform=[3])))
    per_layer, qkv = 49_152, 64 * 64 + 64 * 32 + 64 * 32
    flops = step_flops(shape, SEQ)
    assert flops.base == 2 * shape.base_matmul_params + 2 * (per_layer - qkv + 64 * 256)
    assert flops.attention == 4 * 64 * SEQ * (3 + 3) - 2 * 64 * SEQ


def test_gradient_checkpointing_adds_recompute_as_hardware_flops_only():
    shape = model_shape(tiny_unquantized(lora_config(8)))
    plain = step_flops(shape, SEQ)
    checkpointed = step_flops(shape, SEQ, gradient_checkpointing=True)
    lm_head = 64 * 256
    expected = 2 * (shape.base_matmul_params - lm_head) + 2 * shape.lora_params + 4 * 4 * 64 * SEQ
    assert checkpointed.model == plain.model
    assert checkpointed.recompute == expected
    assert checkpointed.hardware == plain.model + expected


def test_no_adapter_means_forward_only():
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {key: value for key, value in TINY_LLAMA_CONFIG.items() if key != "architectures"}
    shape = model_shape(LlamaForCausalLM(LlamaConfig(**fields)))
    flops = step_flops(shape, SEQ)
    assert flops.base == 2 * shape.base_matmul_params and flops.lora == 0
    assert flops.attention == 4 * 4 * 64 * SEQ


@pytest.mark.parametrize(
    ("device_name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.5),
        ("NVIDIA H100 NVL", 835.5),
        ("NVIDIA H200", 989.4),
        ("NVIDIA GH200 480GB", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", 362.1),
        ("NVIDIA A10", 125.0),
        ("NVIDIA GeForce RTX 4090", 165.2),
    ],
)
def test_peak_table_by_device_name(device_name, tflops):
    peak = peak_flops(device_name)
    assert peak.flops == pytest.approx(tflops * 1e12)
    assert "dense bf16" in peak.source


@pytest.mark.parametrize("device_name", [None, "", "NVIDIA A10G", "Tesla T4", "AMD Instinct MI300X"])
def test_unknown_device_has_no_peak_and_says_why(device_name):
    peak = peak_flops(device_name)
    assert peak.flops is None and not peak.known
    assert "--lora-peak-tflops" in peak.source
    assert mfu(1e9, 1e3, peak) is None


def test_override_wins_over_the_table():
    peak = peak_flops("NVIDIA H100 80GB HBM3", override_tflops=500.0)
    assert peak.flops == 500e12 and "--lora-peak-tflops 500" in peak.source
    assert peak_flops(None, override_tflops=1.0).flops == 1e12


def test_mfu_is_achieved_model_flops_over_peak():
    assert mfu(6e9, 10_000, PeakFlops(100e12, "test")) == pytest.approx(0.6)
    assert mfu(6e9, 0.0, PeakFlops(100e12, "test")) is None


def test_each_table_row_is_reachable_by_its_own_name():
    """Most specific patterns first: "H100 PCIe" must not fall into the generic H100 (SXM) row."""
    for _, label, tflops in PEAK_BF16_TFLOPS:
        assert peak_flops(f"NVIDIA {label}").flops == pytest.approx(tflops * 1e12), label


def _tiny_mixtral(config):
    """The zoo's Mixtral in fp32, eager attention and eager experts (FlopCounterMode sees each expert's matmul)."""
    import torch
    from peft import get_peft_model
    from transformers import MixtralConfig, MixtralForCausalLM

    from pytest_lora.model.zoo import ZOO

    fields = {k: v for k, v in ZOO["tiny-mixtral"].config.items() if k not in ("architectures", "model_type")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = MixtralForCausalLM(MixtralConfig(**fields, attn_implementation="eager", experts_implementation="eager"))
    base.requires_grad_(False)
    return get_peft_model(base, config)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_moe_formula_equals_flop_counter(targets) -> None:
    """Routed experts (2 of 4 per token) in N_base; all-linear adapts the fused experts and the router, whose
    updates PEFT folds into the weights once per step: the formula follows both, exactly."""
    from _flop_counter import BATCH

    model = _tiny_mixtral(lora_config(8, target_modules=targets))
    shape = model_shape(model)
    assert sum(linear.folded and linear.r > 0 for linear in shape.linears) == (6 if targets == "all-linear" else 0)
    assert step_flops(shape, SEQ, batch_size=BATCH).model == counted_flops_per_token(model, SEQ)
