"""The team's own data: files and Hugging Face datasets read as text, tokenized, packed to seq_len, and
trained on with the loss on the response tokens only; bad data refused with the file, the field and the fix."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import lora_config

from pytest_lora import TextDataset, TrainingError
from pytest_lora.model import data as text_data
from pytest_lora.model import training

pytestmark = pytest.mark.lora

# Nine pairs of 2 + 3 bytes: three fit a 16-token row, so the rows are known exactly.
PAIRS = [{"prompt": f"p{i}", "response": f"r{i}!"} for i in range(9)]
WORDS = ["convert", "km", "to", "m", "is", "cm", "kg", "g", "h", "min", "s", "one", "two", "three"]


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def _rows(data: training.TokenData) -> list[tuple[bytes, tuple[int, ...]]]:
    """Every row of both splits as (ids as bytes, labels), sorted: the split is a seeded shuffle."""
    ids = torch.cat([data.train, data.val])
    labels = torch.cat([data.train_labels, data.val_labels])
    return sorted((bytes(row.tolist()), tuple(label.tolist())) for row, label in zip(ids, labels, strict=True))


def test_pairs_are_packed_whole_with_the_loss_on_the_response_only(lora_base_model, tmp_path) -> None:
    data = text_data.load(_jsonl(tmp_path / "pairs.jsonl", PAIRS), model=lora_base_model, seq_len=16, seed=0)
    assert data.name.endswith("(pairs, bytes tokenizer)") and (len(data.train), len(data.val)) == (2, 1)
    expected = []
    for first in (0, 3, 6):
        ids = b"".join(f"p{i}r{i}!".encode() for i in range(first, first + 3)) + b"\0"
        labels = [-100, -100, *b"r%d!" % first, -100, -100, *b"r%d!" % (first + 1), -100, -100]
        expected.append((ids, (*labels, *b"r%d!" % (first + 2), -100)))
    assert _rows(data) == sorted(expected)


def test_plain_text_is_one_stream_cut_into_seq_len_rows(lora_base_model, tmp_path) -> None:
    text = "".join(f"line {i:02d} of the corpus\n" for i in range(10))  # 220 bytes: 13 rows of 16, 12 left over
    (tmp_path / "corpus.txt").write_text(text)
    data = training.model_data(lora_base_model, str(tmp_path / "corpus.txt"), seq_len=16, seed=0)
    assert data.train_labels is None and data.val_labels is None
    rows = sorted(bytes(row.tolist()) for row in torch.cat([data.train, data.val]))
    assert rows == sorted(text.encode()[i : i + 16] for i in range(0, 13 * 16, 16))
    assert (len(data.train), len(data.val)) == (12, 1)


def _write_form(form: str, tmp_path: Path) -> object:
    """The same nine pairs in each form a team may hold them."""
    if form == "jsonl":
        return _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    if form == "json":
        (tmp_path / "pairs.json").write_text(json.dumps(PAIRS))
        return str(tmp_path / "pairs.json")
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_list(PAIRS)
    if form == "parquet":
        dataset.to_parquet(str(tmp_path / "pairs.parquet"))
        return tmp_path / "pairs.parquet"
    if form == "save_to_disk":
        dataset.save_to_disk(str(tmp_path / "saved"))
        return str(tmp_path / "saved")
    return dataset


@pytest.mark.parametrize("form", ["jsonl", "json", "parquet", "Dataset", "save_to_disk"])
def test_every_form_of_the_same_records_gives_the_same_rows(lora_base_model, tmp_path, form) -> None:
    reference = text_data.load(_jsonl(tmp_path / "ref.jsonl", PAIRS), model=lora_base_model, seq_len=16, seed=0)
    data = training.model_data(lora_base_model, _write_form(form, tmp_path), seq_len=16, seed=0)
    assert data.fingerprint == reference.fingerprint


def test_a_dataset_dicts_validation_split_is_the_held_out_data(lora_base_model) -> None:
    datasets = pytest.importorskip("datasets")
    splits = datasets.DatasetDict(
        train=datasets.Dataset.from_list(PAIRS), validation=datasets.Dataset.from_list(PAIRS[:3])
    )
    data = training.model_data(lora_base_model, splits, seq_len=16, seed=0)
    assert (len(data.train), len(data.val)) == (3, 1)
    assert bytes(data.val[0].tolist()) == b"p0r0!p1r1!p2r2!\0"


def test_training_and_validation_take_the_loss_on_the_response_tokens_only(lora_model, lora_train, tmp_path) -> None:
    path = _jsonl(
        tmp_path / "qa.jsonl", [{"prompt": f"Convert {i} km to m. ", "response": f"{i}000 m"} for i in range(40)]
    )
    model = lora_model(lora_config(8))
    data = training.model_data(model, path, seq_len=32, seed=0)
    first = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[:4]
    model.train()  # as train() runs it; with grad enabled, so the 4-bit layers never repack

    def response_loss(ids, labels):
        logits = model(input_ids=ids).logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100).item()

    expected = response_loss(data.train[first], data.train_labels[first])
    every_token = model(input_ids=data.train[first], labels=data.train[first]).loss.item()
    result = lora_train(model, dataset=path, steps=1, batch_size=4, seq_len=32, seed=0)
    assert result.losses[0] == pytest.approx(expected, rel=1e-5)
    assert every_token != pytest.approx(expected, rel=1e-5)  # with the prompt's tokens the loss differs
    assert result.val_losses[-1] == pytest.approx(response_loss(data.val, data.val_labels), rel=1e-5)


def _tokenizer(directory: Path, extra: int = 0):
    """A real word-level fast tokenizer (BOS added, EOS and pad defined), built offline and saved."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({word: len(vocab) + i for i, word in enumerate(WORDS + [f"w{n}" for n in range(extra)])})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="[UNK]"
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


def _tiny_llama(directory: Path, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(directory)


def test_a_model_directory_with_a_tokenizer_reads_text_with_it(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    tokenizer = _tokenizer(tmp_path / "model")
    _tiny_llama(tmp_path / "model", len(tokenizer))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    pairs = [{"prompt": "convert one km", "response": f"{n} is {n} m"} for n in ("one", "two", "three")] * 2
    path = _jsonl(tmp_path / "pairs.jsonl", pairs)
    data = training.model_data(model, path, seq_len=10, seed=0)
    assert data.name.endswith(f"(pairs, {tmp_path / 'model'} tokenizer)")
    prompt = tokenizer("convert one km")["input_ids"]
    response = [*tokenizer("one is one m", add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    assert prompt[0] == tokenizer.bos_token_id and (len(prompt), len(response)) == (4, 5)
    rows = torch.cat([data.train, data.val]).tolist()
    labels = torch.cat([data.train_labels, data.val_labels]).tolist()
    assert [*prompt, *response, tokenizer.pad_token_id] in rows  # one pair of 9 per row of 10, padded
    assert labels[rows.index([*prompt, *response, tokenizer.pad_token_id])] == [-100] * 4 + response + [-100]
    explicit = training.model_data(model, TextDataset(path, tokenizer=str(tmp_path / "model")), seq_len=10, seed=0)
    assert explicit.fingerprint == data.fingerprint


def test_a_model_without_a_tokenizer_and_a_word_vocabulary_is_refused(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    _tiny_llama(tmp_path / "model", 1000)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    path = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    with pytest.raises(TrainingError, match=r"has no tokenizer of its own here .*\n  fix: save the tokenizer"):
        training.model_data(model, path, seq_len=16, seed=0)


def test_datasets_stays_optional(lora_base_model, tmp_path, monkeypatch) -> None:
    (tmp_path / "saved").mkdir()
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    assert training.model_data(lora_base_model, _jsonl(tmp_path / "a.jsonl", PAIRS), seq_len=16, seed=0)
    with pytest.raises(
        TrainingError, match=re.escape("needs the datasets package, not installed.\n  fix: pip install")
    ):
        training.model_data(lora_base_model, str(tmp_path / "saved"), seq_len=16, seed=0)


def test_resolve_path_counts_from_the_policy_file() -> None:
    assert text_data.resolve_path("data/a.jsonl", "/team/pyproject.toml") == "/team/data/a.jsonl"
    assert text_data.resolve_path("/abs/a.jsonl", "/team/pyproject.toml") == "/abs/a.jsonl"
    assert text_data.resolve_path("builtin:planted-rank-8", "/team/pyproject.toml") == "builtin:planted-rank-8"
    assert not text_data.is_text_source("builtin:planted-rank-8") and text_data.is_text_source("a.jsonl")


# Each bad-data case is a user's test in one inner run (one model load): (test body, its first message line, fix).
BAD_DATA = {
    "missing-file": (
        'lora_train(cfg(), dataset="no/such.jsonl")',
        "dataset no/such.jsonl: no such file (looked in */no).",
        "fix: check the path (a relative path counts from the directory pytest runs in*",
    ),
    "empty-file": (
        'lora_train(cfg(), dataset="empty.jsonl")',
        "dataset empty.jsonl: the file is empty (no records).",
        "fix: point it at the data file",
    ),
    "field-missing": (
        'lora_train(cfg(), dataset=TextDataset("pairs.jsonl", text_field="body"))',
        "dataset pairs.jsonl: no field 'body'; the fields are 'prompt', 'response'.",
        "fix: use one of those names (TextDataset text_field / prompt_field / response_field)",
    ),
    "no-known-field": (
        'lora_train(cfg(), dataset="qa.jsonl")',
        "dataset qa.jsonl: no field to train on: expected 'text', or 'prompt' and 'response' (or 'completion'); "
        "the records have 'question', 'answer'.",
        "fix: name the field, e.g. TextDataset(..., text_field='question'), or prompt_field=... and response_field=*",
    ),
    "field-missing-in-a-record": (
        'lora_train(cfg(), dataset="ragged.jsonl")',
        "dataset ragged.jsonl line 2: no field 'response'; its fields are 'prompt'.",
        "fix: give every record a 'response' field",
    ),
    "too-few-tokens": (
        'lora_train(cfg(), dataset="short.txt")',
        "dataset short.txt: the text tokenizes to 12 tokens (bytes tokenizer), fewer than seq_len=64, so not one *",
        "fix: more text, or a smaller seq_len",
    ),
    "tokenizer-too-large": (
        'lora_train(cfg(), dataset=TextDataset("pairs.jsonl", tokenizer="big-tokenizer"))',
        "dataset pairs.jsonl: the tokenizer (big-tokenizer) has 318 tokens, but the model's vocabulary has 256 *",
        "fix: tokenize with the tokenizer saved with this model (the default), or pass TextDataset(..., tokenizer=*",
    ),
    "not-json": (
        'lora_train(cfg(), dataset="broken.jsonl")',
        "dataset broken.jsonl line 2: not valid JSON (*).",
        "fix: one JSON object per line",
    ),
    "not-text": (
        'lora_train(cfg(), dataset=TextDataset("numbers.jsonl", text_field="n"))',
        "dataset numbers.jsonl line 1: field 'n' = 1 (int) is not a string.",
        "fix: that field must hold text",
    ),
    "not-utf8": (
        'lora_train(cfg(), dataset="latin1.txt")',
        "dataset latin1.txt: not UTF-8 text (byte 0xe9 at offset 3).",
        "fix: convert it, e.g. `iconv -f latin1 -t utf-8 latin1.txt > utf8-latin1.txt`",
    ),
    "unknown-builtin": (
        'lora_train(cfg(), dataset="builtin:nope")',
        "dataset = 'builtin:nope': no such built-in dataset; the built-in one is 'builtin:planted-rank-K' (K >= 1).",
        "fix: e.g. dataset='builtin:planted-rank-8', or a path to your own .jsonl / .json / .txt / .parquet",
    ),
    "planted-rank-not-a-number": (
        'lora_train(cfg(), dataset="builtin:planted-rank-\u00b2")',
        "dataset = 'builtin:planted-rank-\u00b2': the planted rank must be an int >= 1.",
        "fix: e.g. 'builtin:planted-rank-8'",
    ),
    "unsupported-type": (
        'lora_train(cfg(), dataset="table.csv")',
        "dataset table.csv: unsupported file type '.csv'.",
        "fix: use one of .jsonl, .json, .txt, .parquet, or a directory written by Dataset.save_to_disk",
    ),
}


def test_bad_data_gets_a_message_naming_the_file_the_field_and_the_fix(lora_pytester: pytest.Pytester) -> None:
    root = lora_pytester.path
    _jsonl(root / "pairs.jsonl", PAIRS)
    _jsonl(root / "qa.jsonl", [{"question": "q", "answer": "a"}])
    _jsonl(root / "ragged.jsonl", [PAIRS[0], {"prompt": "p"}])
    _jsonl(root / "numbers.jsonl", [{"n": 1}])
    (root / "empty.jsonl").write_text("\n")
    (root / "short.txt").write_text("hello there\n")
    (root / "broken.jsonl").write_text(json.dumps(PAIRS[0]) + "\n{oops\n")
    (root / "table.csv").write_text("prompt,response\n")
    (root / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    _tokenizer(root / "big-tokenizer", extra=300)
    tests = "".join(
        f"\n\ndef test_{case.replace('-', '_')}(lora_train):\n    {body}\n" for case, (body, *_) in BAD_DATA.items()
    )
    lora_pytester.makepyfile(
        "from peft import LoraConfig\n\nfrom pytest_lora import TextDataset\n\n\n"
        "def cfg():\n    return LoraConfig(r=8, lora_alpha=16, target_modules=['q_proj', 'v_proj'])\n" + tests
    )
    result = lora_pytester.runpytest()
    result.assert_outcomes(failed=len(BAD_DATA))
    out = result.stdout.str()
    assert "INTERNALERROR" not in out and "site-packages/torch" not in out and "Traceback" not in out
    for case, (_, message, fix) in BAD_DATA.items():
        lines = [f"*_ test_{case.replace('-', '_')} _*", f"E *.TrainingError: {message}", f"E * {fix}"]
        result.stdout.fnmatch_lines([line.replace("[", "[[]") for line in lines])


RUNNERS = """
from pathlib import Path

import pytest
from peft import LoraConfig

PAIRS = Path(__file__).parent / "data" / "pairs.jsonl"


def config(r=8):
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"])


def test_train(lora_train):
    result = lora_train(config(), dataset=PAIRS, steps=2, batch_size=2, seq_len=16)
    assert result.data_name.endswith("pairs.jsonl (pairs, bytes tokenizer)")


def test_benchmark(lora_benchmark):
    run = lora_benchmark(config(), dataset=str(PAIRS), batch_size=2, seq_len=16, steps_per_round=1, rounds=1)
    assert run.tokens_per_second > 0


def test_sweep(lora_sweep):
    assert lora_sweep.run({"target_modules": ["q_proj", "v_proj"]}, batch_size=2, seq_len=16) > 0


@pytest.mark.lora(model="own-model")
def test_model_with_its_own_tokenizer(lora_train):
    result = lora_train(config(), dataset=PAIRS, steps=2, batch_size=2, seq_len=10)
    assert result.data_name.endswith("own-model tokenizer)"), result.data_name
"""


def test_train_benchmark_and_the_policys_sweep_take_a_file(lora_pytester: pytest.Pytester, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # no sweep plots: seconds of rendering, not under test here
    root = lora_pytester.path
    (root / "data").mkdir()
    _jsonl(root / "data" / "pairs.jsonl", [{"prompt": f"convert {n} km", "response": "to m"} for n in WORDS * 2])
    _tokenizer(root / "own-model")
    _tiny_llama(root / "own-model", len(WORDS) + 4)
    lora_pytester.makepyprojecttoml(
        "[tool.pytest_lora.policy.sweep]\nranks = [4, 8]\nsteps = 2\ndata_fraction = 1.0\n"
        'dataset = "data/pairs.jsonl"\n'
    )
    lora_pytester.makepyfile(RUNNERS)
    result = lora_pytester.runpytest("--benchmark-disable", "--lora-sweep-dir=out")
    result.assert_outcomes(passed=5)
    (report,) = (root / "out").glob("*.json")
    assert json.loads(report.read_text())["dataset"].startswith(f"{root / 'data' / 'pairs.jsonl'} (pairs, bytes")


def test_lora_train_takes_the_planted_data_by_name(lora_train) -> None:
    """The calibration data outside the sweep: sampled from the base with the adapter switched off."""
    config = {"r": 8, "lora_alpha": 16, "target_modules": ["lm_head"]}
    result = lora_train(config, steps=2, batch_size=8, seq_len=16, dataset="builtin:planted-rank-8")
    assert result.data_name.startswith("builtin:planted-rank-8 (seed 0: base + a rank-8 update of lm_head)")
    assert result.val_losses and all(math.isfinite(loss) for loss in result.val_losses)


def test_a_byte_order_mark_is_not_part_of_the_first_record(lora_base_model, tmp_path) -> None:
    plain, marked = tmp_path / "plain.jsonl", tmp_path / "marked.jsonl"
    _jsonl(plain, PAIRS)
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    rows = [_rows(training.model_data(lora_base_model, path, seq_len=32, seed=0)) for path in (plain, marked)]
    assert rows[0] == rows[1]
