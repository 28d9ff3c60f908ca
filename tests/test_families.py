"""Counting on every model family of the zoo: the same numbers as PEFT, and the same refusals.

For each family and each kind of config a team writes (its q/v-style targets, all-linear, PEFT's default
targets, rank/alpha patterns, layers_to_transform, DoRA, modules_to_save, the bias modes), the static
estimate from the config alone (meta device) and the count of the real 4-bit model must equal PEFT's
`get_nb_trainable_parameters()`, and where PEFT refuses a config, pytest-lora refuses it too, with its
own message. The 4-bit models are loaded once per session.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
from peft import LoraConfig, get_peft_model

from pytest_lora import assert_adapter_shapes, count_parameters, estimate_memory
from pytest_lora.adapters import AdapterManager
from pytest_lora.errors import AdapterConfigError
from pytest_lora.estimate import estimate_lora_parameters, meta_model
from pytest_lora.flops import step_flops
from pytest_lora.shapes import model_shape
from pytest_lora.zoo import ZOO, ZOO_NAMES, builtin_model_dir

# Each family's attention targets as its users write them, and its output head.
QV = {
    "tiny-llama": ["q_proj", "v_proj"],
    "tiny-qwen2": ["q_proj", "v_proj"],
    "tiny-mistral": ["q_proj", "v_proj"],
    "tiny-phi3": ["qkv_proj"],
    "tiny-gemma2": ["q_proj", "v_proj"],
    "tiny-gpt2": ["c_attn"],
    "tiny-opt": ["q_proj", "v_proj"],
    "tiny-falcon": ["query_key_value"],
    "tiny-mixtral": ["q_proj", "v_proj"],
    "tiny-t5": ["q", "v"],
    "tiny-bert-cls": ["query", "value"],
}
HEAD = {name: "classifier" if name == "tiny-bert-cls" else "lm_head" for name in ZOO_NAMES}
TASK = {"tiny-t5": "SEQ_2_SEQ_LM", "tiny-bert-cls": "SEQ_CLS"}


def variants(name: str) -> dict[str, dict[str, Any]]:
    """The configs of the matrix for one family (LoraConfig fields besides r, alpha and dropout)."""
    qv = QV[name]
    return {
        "qv": {"target_modules": qv},
        "all-linear": {"target_modules": "all-linear"},
        "default-targets": {"target_modules": None},
        "patterns": {"target_modules": qv, "rank_pattern": {qv[0]: 4}, "alpha_pattern": {qv[0]: 32}},
        "layers": {"target_modules": qv, "layers_to_transform": [1]},
        "dora": {"target_modules": qv, "use_dora": True},
        "modules_to_save": {"target_modules": qv, "modules_to_save": [HEAD[name]]},
        "bias-all": {"target_modules": qv, "bias": "all"},
        "bias-lora_only": {"target_modules": qv, "bias": "lora_only"},
        "task": {"target_modules": "all-linear", "task_type": TASK.get(name, "CAUSAL_LM")},
        "all-linear-dropout": {"target_modules": "all-linear", "lora_dropout": 0.05},
    }


CASES = [(name, variant) for name in ZOO_NAMES for variant in variants(name)]


def lora(name: str, variant: str) -> LoraConfig:
    fields = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, **variants(name)[variant]}
    return LoraConfig(**fields)


def peft_count(model: Any, config: LoraConfig) -> tuple[int, int] | Exception:
    """PEFT's own count after get_peft_model, or the exception it raises."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return get_peft_model(model, copy.deepcopy(config), low_cpu_mem_usage=True).get_nb_trainable_parameters()
    except (ValueError, TypeError) as exc:
        return exc


@pytest.mark.parametrize(("name", "variant"), CASES, ids=[f"{n}-{v}" for n, v in CASES])
def test_estimate_from_config_equals_peft_or_refuses_with_it(name: str, variant: str) -> None:
    """From config.json fields alone, on the meta device: PEFT's count, or a refusal where PEFT refuses."""
    config = ZOO[name].config
    want = peft_count(meta_model(config), lora(name, variant))
    if isinstance(want, Exception):
        with pytest.raises(AdapterConfigError, match=r"(?s)fix:"):
            estimate_lora_parameters(config, lora(name, variant))
        return
    count = estimate_lora_parameters(config, lora(name, variant))
    assert (count.trainable, count.total) == want


@pytest.fixture(scope="session")
def four_bit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Each family's checkpoint loaded once, in 4-bit (nf4, double quant, bf16 compute), by its own class.

    T5 and the BERT classifier are loaded through their architecture class directly (the plugin's
    loader takes causal LMs), with the same BitsAndBytesConfig.
    """
    import torch
    import transformers

    from pytest_lora.models import prepare_base, silence_bitsandbytes_kernel_notice
    from pytest_lora.zoo import quiet_progress

    silence_bitsandbytes_kernel_notice()
    cache = tmp_path_factory.getbasetemp() / "lora-model-cache"
    quant = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
    models = {}
    with quiet_progress():
        for name in ZOO_NAMES:
            cls = getattr(transformers, ZOO[name].architecture)
            model = cls.from_pretrained(builtin_model_dir(cache, name), quantization_config=quant, dtype=torch.bfloat16)
            prepare_base(model)
            models[name] = model
    return models


FOUR_BIT_VARIANTS = ("qv", "all-linear", "default-targets", "patterns", "dora", "modules_to_save", "bias-all")
FOUR_BIT_CASES = [(name, variant) for name in ZOO_NAMES for variant in FOUR_BIT_VARIANTS]


@pytest.mark.parametrize(("name", "variant"), FOUR_BIT_CASES, ids=[f"{n}-{v}" for n, v in FOUR_BIT_CASES])
def test_4bit_model_counts_equal_peft_and_the_config_estimate(four_bit, name: str, variant: str) -> None:
    """On the loaded 4-bit model: count_parameters == PEFT == the estimate from the model == from config.json;
    the adapters have the shapes the config asks for; memory and FLOPs read the same adapters."""
    base = four_bit[name]
    config = lora(name, variant)
    try:
        from_config = estimate_lora_parameters(ZOO[name].config, config)
    except AdapterConfigError:
        assert isinstance(peft_count(meta_model(ZOO[name].config), config), Exception)
        return
    from_model = estimate_lora_parameters(base, config)
    planned = estimate_memory(base, config, batch_size=2, seq_len=16)
    manager = AdapterManager(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = manager.attach(config)
    try:
        count = count_parameters(peft_model)
        assert (count.trainable, count.total) == peft_model.get_nb_trainable_parameters()
        assert count == from_model == from_config
        assert_adapter_shapes(peft_model)
        attached = estimate_memory(peft_model, batch_size=2, seq_len=16)
        assert attached.lora_params == planned.lora_params
        assert step_flops(model_shape(peft_model), 16).lora == step_flops(model_shape(base, config), 16).lora > 0
    finally:
        manager.detach()
