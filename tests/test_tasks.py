"""The model's task picks the loader and the training objective: causal LM, seq2seq LM, classifiers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig
from transformers import AutoConfig

from pytest_lora import AdapterConfigError, ModelLoadError, TrainingError, count_parameters
from pytest_lora.core.settings import TASKS
from pytest_lora.model.estimate import estimate_lora_parameters
from pytest_lora.model.loading import choose_task, model_task
from pytest_lora.model.training import objective
from pytest_lora.model.zoo import ZOO, builtin_model_dir

BERT = "builtin:tiny-bert-cls"
T5 = "builtin:tiny-t5"


def _config(model_type: str, *architectures: str) -> object:
    config = AutoConfig.for_model(model_type)
    config.architectures = list(architectures) or None
    return config


@pytest.mark.parametrize(
    ("model_type", "architecture", "task"),
    [
        ("llama", "LlamaForCausalLM", "CAUSAL_LM"),
        ("gpt2", "GPT2LMHeadModel", "CAUSAL_LM"),
        ("t5", "T5ForConditionalGeneration", "SEQ_2_SEQ_LM"),
        ("mt5", "MT5ForConditionalGeneration", "SEQ_2_SEQ_LM"),
        ("bert", "BertForSequenceClassification", "SEQ_CLS"),
        ("bert", "BertForTokenClassification", "TOKEN_CLS"),
        ("llama", "LlamaForSequenceClassification", "SEQ_CLS"),
        ("llama", None, "CAUSAL_LM"),  # no architectures: the model type's first task, causal first
        ("t5", None, "SEQ_2_SEQ_LM"),
    ],
)
def test_auto_follows_the_checkpoint_architectures(model_type: str, architecture: str | None, task: str) -> None:
    config = _config(model_type, *([architecture] if architecture else []))
    assert choose_task(config, "auto", "--lora-model m") == task
    assert choose_task(config, task, "--lora-model m") == task


def test_the_setting_overrides_the_architecture() -> None:
    assert choose_task(_config("llama", "LlamaForCausalLM"), "TOKEN_CLS", "w") == "TOKEN_CLS"
    assert choose_task(_config("bert", "BertForSequenceClassification"), "CAUSAL_LM", "w") == "CAUSAL_LM"


def test_a_head_of_another_task_names_the_choices() -> None:
    """bert-base-uncased is saved as a masked LM: its task must be chosen, never guessed."""
    with pytest.raises(ModelLoadError) as info:
        choose_task(_config("bert", "BertForMaskedLM"), "auto", "--lora-model bert-base-uncased")
    message = str(info.value)
    assert message.startswith("--lora-model bert-base-uncased: its architecture BertForMaskedLM is none of the tasks")
    assert "SEQ_CLS (BertForSequenceClassification)" in message and "TOKEN_CLS (BertForTokenClassification)" in message
    assert "fix: say which task to fine-tune, e.g. --lora-task CAUSAL_LM" in message
    assert '@pytest.mark.lora(task="CAUSAL_LM")' in message


def test_a_task_the_model_type_lacks_is_refused_with_what_it_has() -> None:
    with pytest.raises(ModelLoadError) as info:
        choose_task(_config("llama", "LlamaForCausalLM"), "SEQ_2_SEQ_LM", "--lora-model m")
    message = str(info.value)
    assert "task SEQ_2_SEQ_LM: transformers" in message and "no seq2seq LM class for model_type 'llama'" in message
    assert "it has: CAUSAL_LM (LlamaForCausalLM), SEQ_CLS (LlamaForSequenceClassification)" in message
    assert 'task = "auto"' in message


def test_a_model_type_with_none_of_the_tasks_is_refused() -> None:
    with pytest.raises(ModelLoadError) as info:
        choose_task(_config("vit", "ViTForImageClassification"), "auto", "--lora-model vit")
    message = str(info.value)
    assert "no causal LM, seq2seq LM, sequence classification, token classification class for model_type 'vit'" in (
        message
    )
    assert "fix:" in message


def test_remote_code_classes_come_from_auto_map() -> None:
    config = SimpleNamespace(
        model_type="my-model",
        architectures=["MyForSequenceClassification"],
        auto_map={"AutoModelForSequenceClassification": "modeling_my.MyForSequenceClassification"},
    )
    assert choose_task(config, "auto", "w") == "SEQ_CLS"


def test_every_task_has_a_loader() -> None:
    assert TASKS == ("CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS")
    for task in TASKS:
        assert choose_task(_config("bert" if task != "SEQ_2_SEQ_LM" else "t5"), task, "w") == task


# --- the objective -----------------------------------------------------------------------------------


def _fake(name: str, **config: object) -> object:
    """A stand-in with a transformers-like class name: `objective` reads only the class and the config."""
    defaults = {"num_labels": 2, "vocab_size": 256, "is_encoder_decoder": False}
    return type(name, (), {"config": SimpleNamespace(**{**defaults, **config})})()


def test_the_objective_per_task() -> None:
    batch = torch.tensor([[0, 10, 200, 250], [130, 140, 150, 5]])
    causal = objective(_fake("LlamaForCausalLM"))(batch)
    assert causal["input_ids"] is batch and causal["labels"] is batch
    seq2seq = objective(_fake("T5ForConditionalGeneration", is_encoder_decoder=True))(batch)
    assert seq2seq["input_ids"].tolist() == [[0, 10], [130, 140]]
    assert seq2seq["labels"].tolist() == [[200, 250], [150, 5]]
    assert seq2seq["labels"].is_contiguous()
    # prompt/response rows (-100 on the prompt): the encoder sees the prompt, the decoder learns the response
    labels = torch.tensor([[-100, -100, 200, 250], [-100, 140, -100, 5]])
    pairs = objective(_fake("T5ForConditionalGeneration", is_encoder_decoder=True, pad_token_id=0))(batch, labels)
    assert pairs["input_ids"].tolist() == [[0, 10, 0, 0], [130, 0, 150, 0]]
    assert pairs["labels"] is labels
    # two labels: are most tokens in the upper half of the vocabulary (ids >= 128)? 2 of 4 rounds to even
    assert objective(_fake("BertForSequenceClassification"))(batch)["labels"].tolist() == [0, 1]
    three = objective(_fake("BertForSequenceClassification", num_labels=3))(batch)["labels"]
    assert three.tolist() == [1, 1]  # bins [0,0,2,2] -> 1, [1,1,1,0] -> 0.75 -> 1
    tokens = objective(_fake("BertForTokenClassification"))(batch)["labels"]
    assert tokens.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]
    regression = objective(_fake("BertForSequenceClassification", num_labels=1))(batch)["labels"]
    assert regression.dtype == torch.float32 and regression.tolist() == [0.5, 0.75]
    multi = objective(_fake("BertForSequenceClassification", problem_type="multi_label_classification"))(batch)
    assert multi["labels"].tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_model_task_reads_the_class_under_a_peft_model() -> None:
    inner = _fake("BertForSequenceClassification")
    wrapped = SimpleNamespace(get_base_model=lambda: inner)
    assert model_task(wrapped) == model_task(inner) == "SEQ_CLS"
    assert model_task(_fake("T5ForConditionalGeneration", is_encoder_decoder=True)) == "SEQ_2_SEQ_LM"
    assert model_task(_fake("GPT2LMHeadModel")) == "CAUSAL_LM"


# --- real models ---------------------------------------------------------------------------------------


@pytest.mark.lora(model=T5)
def test_t5_loads_as_a_seq2seq_lm(lora_session, lora_settings) -> None:
    """Before: `Unrecognized configuration class T5Config for ... AutoModelForCausalLM`, no fix line."""
    loaded = lora_session.base(lora_settings)
    assert loaded.task == "SEQ_2_SEQ_LM" and type(loaded.model).__name__ == "T5ForConditionalGeneration"
    assert type(loaded.model.encoder.block[0].layer[0].SelfAttention.q).__name__ == "Linear4bit"


@pytest.mark.lora(model=BERT)
def test_a_bert_classifier_loads_its_class_with_a_trainable_head(lora_session, lora_settings, lora_model) -> None:
    """Before: BertLMHeadModel was loaded silently (classifier dropped) and training died in bitsandbytes."""
    loaded = lora_session.base(lora_settings)
    model = loaded.model
    assert loaded.task == "SEQ_CLS" and type(model).__name__ == "BertForSequenceClassification"
    assert type(model.classifier) is torch.nn.Linear, "the head PEFT trains must stay out of 4-bit"
    # what the first training forward would write into the shared config, settled at load
    assert model.config.problem_type == "single_label_classification"
    assert type(model.bert.encoder.layer[0].attention.self.query).__name__ == "Linear4bit"
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
    from_config = estimate_lora_parameters(ZOO["tiny-bert-cls"].config, config)
    peft_model = lora_model(config)
    head = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert head == [f"base_model.model.classifier.modules_to_save.default.{p}" for p in ("weight", "bias")]
    count = count_parameters(peft_model)
    assert (count.trainable, count.total) == peft_model.get_nb_trainable_parameters()
    assert from_config == count
    assert count.trainable == 2 * 2 * 8 * (64 + 64) + 64 * 2 + 2  # query, value in 2 layers; the head


@pytest.mark.lora(model=BERT)
def test_a_task_type_for_another_task_is_refused(lora_model) -> None:
    """PEFT's CAUSAL_LM wrapper on a classifier fails on a missing generation hook, deep in PEFT."""
    with pytest.raises(AdapterConfigError) as info:
        lora_model(LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="CAUSAL_LM"))
    message = str(info.value)
    assert "task_type = 'CAUSAL_LM' does not fit the base model, a BertForSequenceClassification (SEQ_CLS)" in message
    assert "fix: task_type='SEQ_CLS' (PEFT then trains the classifier head too" in message


@pytest.mark.lora(task="TOKEN_CLS")
def test_token_classification_of_the_builtin_llama_learns(lora_train, lora_session, lora_settings) -> None:
    """The task override loads LlamaForTokenClassification (head `score`, kept out of 4-bit) and trains it."""
    assert type(lora_session.base(lora_settings).model).__name__ == "LlamaForTokenClassification"
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="TOKEN_CLS")
    result = lora_train(config, steps=6, seq_len=32, eval_every=6)
    assert result.losses[-1] < 0.8 * result.losses[0] and result.base_unchanged
    assert any("score.modules_to_save" in name for name in result.changed_lora)


@pytest.mark.lora(task="SEQ_CLS")
def test_a_decoder_classifier_without_pad_token_says_so(lora_train) -> None:
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    with pytest.raises(TrainingError) as info:
        lora_train(config, steps=2)
    message = str(info.value)
    assert message.startswith("step 1: LlamaForSequenceClassification (SEQ_CLS) rejected the objective's inputs")
    assert "its config needs pad_token_id" in message


# --- the plugin ------------------------------------------------------------------------------------------


def test_task_option_and_marker(lora_pytester: pytest.Pytester) -> None:
    lora_pytester.makepyfile(
        """
        import pytest

        def test_session_task(lora_base_model, lora_settings):
            assert lora_settings.task == "TOKEN_CLS"
            assert type(lora_base_model).__name__ == "LlamaForTokenClassification"

        @pytest.mark.lora(task="CAUSAL_LM")
        def test_marker_task(lora_session, lora_settings):
            assert type(lora_session.base(lora_settings).model).__name__ == "LlamaForCausalLM"
        """
    )
    result = lora_pytester.runpytest("--lora-task=TOKEN_CLS")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "*base model builtin:tiny-llama*loaded 1x in *s, as TOKEN_CLS",
            "*base model builtin:tiny-llama*loaded 1x in *s",
        ]
    )


def test_a_bad_task_value_stops_the_session(lora_pytester: pytest.Pytester) -> None:
    result = lora_pytester.runpytest("--lora-task", "seq2seq")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--lora-task: task = 'seq2seq' is not one of auto, CAUSAL_LM, SEQ_2_SEQ_LM, SEQ_CLS, TOKEN_CLS; use one*"]
    )


def test_an_unsupported_head_fails_with_the_fix(lora_pytester: pytest.Pytester, lora_session, tmp_path) -> None:
    """A masked-LM checkpoint (how bert-base-uncased is saved) fails each test with one clear message."""
    directory = tmp_path / "bert-mlm"
    shutil.copytree(builtin_model_dir(lora_session.settings.cache_dir, "tiny-bert-cls"), directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "architectures": ["BertForMaskedLM"]}))
    lora_pytester.makepyfile("def test_it(lora_base_model):\n    pass\n")
    result = lora_pytester.runpytest(f"--lora-model={directory}")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            f"*ModelLoadError: --lora-model {directory}: its architecture BertForMaskedLM is none of the tasks*",
            "*fix: say which task to fine-tune, e.g. --lora-task CAUSAL_LM*",
        ]
    )
    assert "Traceback" not in result.stdout.str()


@pytest.mark.lora(model=T5)
def test_t5_learns_prompt_response_pairs_on_the_responses(lora_train) -> None:
    """Before: the labels were dropped and the decoder trained on prompt tokens too (27% of its targets)."""
    data = Path(__file__).parents[1] / "examples" / "data" / "unit_conversions.jsonl"
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")
    result = lora_train(config, steps=12, lr=2e-2, seq_len=32, dataset=data, eval_every=12)
    assert result.losses[-1] < result.losses[0] and result.base_unchanged


@pytest.mark.lora(model=T5)
def test_planted_data_needs_a_causal_lm(lora_train) -> None:
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")
    with pytest.raises(TrainingError, match=r"T5ForConditionalGeneration is a SEQ_2_SEQ_LM model\.\n  fix: pass your"):
        lora_train(config, steps=1, seq_len=32, dataset="builtin:planted-rank-8")
