"""The built-in zoo: one tiny checkpoint per model family, written once, selectable as builtin:NAME."""

from __future__ import annotations

import hashlib
import json

import pytest

from pytest_lora import ModelLoadError
from pytest_lora.core.settings import Settings
from pytest_lora.model.loading import BUILTIN_MODEL, load_base_model, resolve_source
from pytest_lora.model.zoo import ZOO, ZOO_NAMES, builtin_model_dir, checkpoint_problem

CAUSAL = [name for name in ZOO_NAMES if ZOO[name].causal_lm]
# transformers 5.24 quantizes only modules whose type *is* nn.Linear (or Conv1D): Falcon's
# FalconLinear subclass stays in full precision, so its 4-bit model has no 4-bit layer.
NO_4BIT_LAYERS = {"tiny-falcon"}
# The default model's weights, which the README's figures are measured on: a change is a regression.
TINY_LLAMA_WEIGHTS_SHA256 = "3bac7cad70e7ba11937a4e5e8bec34b06e47bb75e499416452b67319fc6b8cea"


@pytest.fixture(scope="module")
def zoo_cache(tmp_path_factory: pytest.TempPathFactory):
    """A cache of this module's own, so that every entry is really generated in this run."""
    return tmp_path_factory.mktemp("zoo-cache")


def test_the_zoo_has_every_family() -> None:
    assert BUILTIN_MODEL == "builtin:tiny-llama" and ZOO_NAMES[0] == "tiny-llama"
    architectures = {ZOO[name].architecture for name in ZOO_NAMES}
    assert architectures == {
        "LlamaForCausalLM",
        "Qwen2ForCausalLM",
        "MistralForCausalLM",
        "Phi3ForCausalLM",
        "Gemma2ForCausalLM",
        "GPT2LMHeadModel",
        "OPTForCausalLM",
        "FalconForCausalLM",
        "MixtralForCausalLM",
        "T5ForConditionalGeneration",
        "BertForSequenceClassification",
    }
    assert set(ZOO_NAMES) - set(CAUSAL) == {"tiny-t5", "tiny-bert-cls"}


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_each_entry_is_written_once_with_its_architecture(zoo_cache, name: str) -> None:
    directory = builtin_model_dir(zoo_cache, name)
    weights = directory / "model.safetensors"
    first = weights.stat()
    assert checkpoint_problem(directory) is None
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == [ZOO[name].architecture]
    assert config["model_type"] == ZOO[name].config["model_type"]
    assert builtin_model_dir(zoo_cache, f"builtin:{name}") == directory
    again = weights.stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns), "rewritten on the second call"
    assert sorted(p.name for p in zoo_cache.iterdir() if p.name.startswith(".")) == [], "temporary dirs left"


def test_the_default_llama_is_bit_identical(zoo_cache) -> None:
    weights = builtin_model_dir(zoo_cache) / "model.safetensors"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == TINY_LLAMA_WEIGHTS_SHA256


@pytest.mark.parametrize("name", [name for name in CAUSAL if name != "tiny-llama"])  # the rest of the suite loads it
def test_causal_entries_load_in_4bit_through_the_loader(zoo_cache, name: str) -> None:
    import torch

    settings = Settings(model=f"builtin:{name}", device="cpu", cache_dir=str(zoo_cache))
    loaded = load_base_model(settings)
    model = loaded.model
    assert loaded.source.label == f"builtin:{name}" and loaded.quantization.startswith("4-bit nf4")
    assert model.config.model_type == ZOO[name].config["model_type"]
    four_bit = [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    assert bool(four_bit) is (name not in NO_4BIT_LAYERS), four_bit
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        logits = model(torch.arange(16).unsqueeze(0)).logits
    assert logits.shape == (1, 16, 256) and torch.isfinite(logits).all()


def test_an_unknown_builtin_name_lists_the_names() -> None:
    with pytest.raises(ModelLoadError) as info:
        resolve_source("builtin:tiny-gtp2")
    message = str(info.value)
    assert message.startswith("--lora-model builtin:tiny-gtp2: no built-in model of that name")
    assert "builtin:tiny-llama, builtin:tiny-qwen2," in message and "builtin:tiny-bert-cls" in message
    assert "fix:" in message


def test_builtin_name_selects_the_model_in_a_session(lora_pytester: pytest.Pytester) -> None:
    lora_pytester.makepyfile(
        """
        def test_family(lora_base_model):
            assert lora_base_model.config.model_type == "qwen2"
            assert lora_base_model.model.layers[0].self_attn.q_proj.bias is not None
        """
    )
    result = lora_pytester.runpytest("--lora-model=builtin:tiny-qwen2", "--lora-device", "cpu")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["lora: model=builtin:tiny-qwen2, device=cpu*", "*base model builtin:tiny-qwen2 on cpu*"]
    )
