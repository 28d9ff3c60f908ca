"""Counting LoRA parameters from a config alone, on the meta device: the same numbers PEFT reports."""

from __future__ import annotations

import json

import pytest
from conftest import lora_config
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, LlamaConfig

from pytest_lora.core.errors import AdapterConfigError, ModelLoadError
from pytest_lora.model.counting import ParamCount, count_parameters
from pytest_lora.model.estimate import estimate_lora_parameters, meta_model
from pytest_lora.model.loading import TINY_LLAMA_CONFIG

LLAMA_2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "vocab_size": 32000,
}
LLAMA_2_7B_TOTAL = 6_738_415_616
TINY_GPT2 = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)


@pytest.mark.parametrize(
    ("r", "trainable", "percent"), [(4, 2_097_152, 0.0311), (8, 4_194_304, 0.0622), (16, 8_388_608, 0.1243)]
)
def test_llama_2_7b_reference_counts(r: int, trainable: int, percent: float) -> None:
    """The guide's table, counted right: r=4 on q, v is 0.031% of 6.74B, below its own 0.05% floor."""
    count = estimate_lora_parameters(LLAMA_2_7B, {"r": r, "target_modules": ["q_proj", "v_proj"]})
    assert count == ParamCount(trainable=trainable, total=LLAMA_2_7B_TOTAL + trainable)
    assert round(count.percent, 4) == percent


def test_base_as_config_object_directory_or_mapping_agree(tmp_path) -> None:
    """A directory holding only config.json is enough: no weights are read."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_2_7B))
    lora = LoraConfig(r=8, target_modules=["q_proj", "v_proj"])
    counts = {
        estimate_lora_parameters(base, lora)
        for base in (LLAMA_2_7B, tmp_path, str(tmp_path), LlamaConfig(**{k: v for k, v in LLAMA_2_7B.items()}))
    }
    assert counts == {ParamCount(trainable=4_194_304, total=LLAMA_2_7B_TOTAL + 4_194_304)}


def test_meta_model_holds_no_weights() -> None:
    model = meta_model(LLAMA_2_7B)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert count_parameters(model).total == LLAMA_2_7B_TOTAL


# Each config against PEFT's own count after get_peft_model on the same meta model: the shape rule
# (plain LoRA, DoRA, lora_bias, bias="all", patterns, layer selection, Conv1D, embeddings) and the
# PEFT path (modules_to_save, bias="lora_only", classification task types) must both agree.
CASES = [
    (TINY_LLAMA_CONFIG, {"target_modules": ["q_proj", "v_proj"]}),
    (TINY_LLAMA_CONFIG, {"target_modules": "all-linear"}),
    (TINY_LLAMA_CONFIG, {"target_modules": "all-linear", "rank_pattern": {"q_proj": 4, "layers.1.mlp.up_proj": 32}}),
    (TINY_LLAMA_CONFIG, {"target_modules": r".*\.(q|v)_proj"}),
    (TINY_LLAMA_CONFIG, {"target_modules": ["q_proj", "v_proj"], "use_dora": True}),
    (TINY_LLAMA_CONFIG, {"target_modules": ["q_proj", "v_proj"], "lora_bias": True}),
    (TINY_LLAMA_CONFIG, {"target_modules": ["q_proj", "v_proj"], "bias": "all"}),
    (TINY_LLAMA_CONFIG, {"target_modules": ["q_proj", "v_proj"], "bias": "lora_only"}),
    (TINY_LLAMA_CONFIG, {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}),
    (TINY_LLAMA_CONFIG, {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0, 2]}),
    (
        TINY_LLAMA_CONFIG,
        {"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["model.layers.0.self_attn.q_proj"]},
    ),
    (TINY_LLAMA_CONFIG, {"target_modules": ["q_proj", "embed_tokens"]}),
    (TINY_LLAMA_CONFIG, {"target_modules": ["embed_tokens"], "use_dora": True}),
    (TINY_LLAMA_CONFIG, {"target_modules": ["q_proj", "v_proj"], "task_type": "SEQ_CLS"}),
    (TINY_GPT2, {"target_modules": ["c_attn"], "fan_in_fan_out": True}),
    (TINY_GPT2, {"target_modules": "all-linear", "fan_in_fan_out": True, "bias": "all"}),
    (TINY_GPT2, {"target_modules": ["c_attn"], "fan_in_fan_out": True, "use_dora": True}),
    (TINY_LLAMA_CONFIG, {"target_modules": "all-linear", "exclude_modules": ["q_proj"]}),
]


def _case_id(value: object) -> str:
    if isinstance(value, dict) and "target_modules" in value:
        return ",".join(f"{key}={value[key]}" for key in value).replace(" ", "").replace("'", "")
    return "gpt2" if value is TINY_GPT2 else "llama"


@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")
@pytest.mark.parametrize(("base", "fields"), CASES, ids=_case_id)
def test_equals_peft_count_on_the_same_meta_model(base, fields) -> None:
    config = LoraConfig(r=8, lora_alpha=16, **fields)
    count = estimate_lora_parameters(base, config)  # first: get_peft_model rewrites the config it is given
    want = get_peft_model(meta_model(base), config, low_cpu_mem_usage=True).get_nb_trainable_parameters()
    assert (count.trainable, count.total) == want


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_equals_peft_count_on_the_real_4bit_model(lora_model, lora_base_model, targets) -> None:
    """The built-in 4-bit base: the config-only estimate, and the estimate on the loaded model, match PEFT's."""
    config = lora_config(8, target_modules=targets)
    from_config = estimate_lora_parameters(TINY_LLAMA_CONFIG, config)
    from_model = estimate_lora_parameters(lora_base_model, config)
    peft_model = lora_model(config)
    assert from_config == from_model == count_parameters(peft_model)
    assert (from_config.trainable, from_config.total) == peft_model.get_nb_trainable_parameters()


def test_a_real_model_is_read_not_wrapped(lora_base_model) -> None:
    """Even a config that needs PEFT's own count (modules_to_save) leaves the given model untouched."""
    before = [name for name, _ in lora_base_model.named_modules()]
    count = estimate_lora_parameters(lora_base_model, lora_config(8, modules_to_save=["lm_head"]))
    assert count.trainable == estimate_lora_parameters(TINY_LLAMA_CONFIG, lora_config(8)).trainable + 256 * 64
    assert [name for name, _ in lora_base_model.named_modules()] == before
    assert not getattr(lora_base_model, "peft_config", None)


def test_bad_bases_and_configs_are_named() -> None:
    with pytest.raises(ModelLoadError, match="no model_type"):
        estimate_lora_parameters({"hidden_size": 64}, lora_config(8))
    with pytest.raises(ModelLoadError, match=r"cannot read its config\.json"):
        estimate_lora_parameters("./no/such/model/dir", lora_config(8))
    with pytest.raises(AdapterConfigError, match=r"'q_prj' matches no module(.|\n)*Did you mean 'q_proj'"):
        estimate_lora_parameters(TINY_LLAMA_CONFIG, lora_config(8, target_modules=["q_prj", "v_proj"]))


def test_a_model_that_already_has_adapters_is_refused(lora_model) -> None:
    with pytest.raises(AdapterConfigError, match="already carries LoRA adapters"):
        estimate_lora_parameters(lora_model(lora_config(8)), lora_config(8))


@pytest.mark.parametrize(
    ("architectures", "expected"),
    [
        (["pipeline"], "'pipeline' names transformers.pipeline, a function: it cannot build"),
        (["AutoModel"], "'AutoModel' names transformers.AutoModel, a class, but not a PreTrainedModel"),
        ([7], "= 7 is int, not a class name"),
    ],
)
def test_architectures_may_only_name_a_model_class(tmp_path, architectures, expected) -> None:
    """A config check never calls what config.json names unless it is a model class (`pipeline` would run)."""
    (tmp_path / "config.json").write_text(json.dumps({**TINY_LLAMA_CONFIG, "architectures": architectures}))
    with pytest.raises(ModelLoadError) as info:
        estimate_lora_parameters(tmp_path, lora_config(8))
    assert str(info.value).startswith(f"base model {tmp_path}: config.json architectures[0] = ")
    assert expected in str(info.value)
    assert 'fix: set architectures to the model\'s class, e.g. ["LlamaForCausalLM"], or remove the key' in str(
        info.value
    )
    # a name transformers does not have (remote code, a newer release) still falls back to the auto classes
    (tmp_path / "config.json").write_text(json.dumps({**TINY_LLAMA_CONFIG, "architectures": ["FutureForCausalLM"]}))
    assert type(meta_model(tmp_path)).__name__ == "LlamaForCausalLM"
