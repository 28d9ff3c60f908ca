"""The team's own data for a short LoRA run: text files and Hugging Face datasets, tokenized and packed.

Teams hold text, not token ids. `dataset=` of `lora_train`, `lora_benchmark` and the sweep also takes
a `.jsonl` / `.json` / `.txt` / `.parquet` file, a `Dataset.save_to_disk` directory or a Hugging Face
`Dataset` / `DatasetDict`, read as plain text (packed into `seq_len` rows, loss on every token) or as
prompt/response pairs (whole pairs packed into rows, loss on the response tokens only). The tokenizer is
the model's own unless given; a model without one and a 256-token vocabulary (the built-in tiny Llama)
reads text as UTF-8 bytes. Bad data is a `TrainingError` naming the file, the field and the fix.
torch, transformers, pyarrow and datasets are imported inside the functions, only when needed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_lora.core.errors import TrainingError

if TYPE_CHECKING:
    from pytest_lora.model.training import TokenData

SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")
IGNORE_INDEX = -100  # transformers' label for "no loss here"
BYTE_VOCAB = 256
BYTES = "bytes"  # `tokenizer="bytes"`: the byte tokenizer
_VAL_SPLITS = ("validation", "val", "valid", "eval", "test")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_EXTRA = "pip install pytest-lora[data]"


@dataclass(frozen=True)
class TextDataset:
    """Text for `dataset=`, with how to read it; a bare path or `Dataset` means the defaults.

    `source`: a `.jsonl` / `.json` / `.txt` / `.parquet` file, a `Dataset.save_to_disk` directory, or a
    `datasets.Dataset` / `DatasetDict`. Fields: `text_field` for plain text; `prompt_field` and
    `response_field` for pairs (loss on the response only). By default a `text` field, else `prompt` with
    `response` (or `completion`), else pre-tokenized `input_ids`. `tokenizer`: None (the model's own),
    `"bytes"`, a local tokenizer directory, or a transformers tokenizer.

    Example: `lora_train(config, dataset=TextDataset("data/chat.jsonl", prompt_field="question",
    response_field="answer"))`.
    """

    source: Any
    text_field: str | None = None
    prompt_field: str | None = None
    response_field: str | None = None
    tokenizer: Any = None


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255: text for a model whose vocabulary is exactly the 256 byte values.

    Called like a transformers tokenizer (`tokenizer(texts)["input_ids"]`, `len(tokenizer)`). All 256 ids
    are bytes, so there is no BOS, EOS or padding token.
    """

    name_or_path = BYTES
    eos_token_id = None
    pad_token_id = None

    def __call__(self, texts: Sequence[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
        return {"input_ids": [list(text.encode("utf-8")) for text in texts]}

    def __len__(self) -> int:
        return BYTE_VOCAB


def is_text_source(dataset: Any) -> bool:
    """Whether `dataset` is for this module: a path, a TextDataset or a Hugging Face dataset.

    `builtin:...` names are not paths: they are built-in data sets, for `training.coerce_data`.
    """
    if isinstance(dataset, TextDataset | os.PathLike):
        return True
    if isinstance(dataset, str):
        return not dataset.startswith("builtin:")
    return _hf_kind(dataset) is not None


def load(dataset: Any, *, model: Any, seq_len: int, seed: int) -> Any:
    """`dataset` read, tokenized with `model`'s tokenizer and packed into `seq_len` rows, split 90/10
    (seeded) unless it has a validation split. Returns what `training.coerce_data` takes: a TokenData,
    or pre-tokenized records (`input_ids`) as they were."""
    spec = dataset if isinstance(dataset, TextDataset) else TextDataset(dataset)
    splits, where = _read(spec.source)
    mode, fields = _mode(spec, splits[0], where)
    if mode == "ids":
        return splits[0].raw if len(splits) == 1 else (splits[0].raw, splits[1].raw)
    vocab_size = model.config.vocab_size
    tokenizer, tokenizer_name = _tokenizer(spec.tokenizer, model, where)
    if len(tokenizer) > vocab_size:
        raise TrainingError(
            f"dataset {where}: the tokenizer ({tokenizer_name}) has {len(tokenizer):,} tokens, but the model's "
            f"vocabulary has {vocab_size:,} (ids 0 .. {vocab_size - 1}): its ids would index past the embedding.\n"
            "  fix: tokenize with the tokenizer saved with this model (the default), or pass "
            "TextDataset(..., tokenizer=...) with one that fits"
        )
    packed = [_pack(split, mode, fields, tokenizer, tokenizer_name, seq_len) for split in splits]
    return _token_data(packed, f"{where} ({mode}, {tokenizer_name} tokenizer)", seed)


def resolve_path(value: str, base: str | os.PathLike[str] | None) -> str:
    """A path from a settings file counts from that file's directory; `builtin:...` names are left alone."""
    if base is None or value.startswith("builtin:") or os.path.isabs(value):
        return value
    return os.path.join(os.path.dirname(os.path.abspath(base)), value)


@dataclass(frozen=True)
class _Records:
    """One split: its field names, a reader of one field's values (checked), and the object as given."""

    where: str
    fields: tuple[str, ...]
    values: Callable[[str], list[Any]]
    label: Callable[[int], str]  # "line 3" for the record at that index
    raw: Any


def _hf_kind(obj: Any) -> str | None:
    """'Dataset' or 'DatasetDict' for a Hugging Face dataset, without importing `datasets`."""
    kind = type(obj).__name__
    if type(obj).__module__.split(".")[0] == "datasets" and kind in ("Dataset", "DatasetDict"):
        return kind
    return None


def _read(source: Any) -> tuple[list[_Records], str]:
    """The splits of `source` (train, and validation when it has one) and its name for messages."""
    if _hf_kind(source) is not None:
        return _from_hf(source, type(source).__name__)
    if not isinstance(source, str | os.PathLike):
        raise TrainingError(
            f"dataset: a TextDataset source must be a file path or a Hugging Face Dataset / DatasetDict, got "
            f"{type(source).__name__}.\n  fix: pass a path to a {' / '.join(SUFFIXES)} file, or a Dataset"
        )
    path = Path(source).expanduser()
    where = os.fspath(source)
    if path.is_dir():
        return _from_hf(_load_from_disk(path, where), where)
    if not path.is_file():
        raise TrainingError(
            f"dataset {where}: no such file (looked in {path.absolute().parent}).\n"
            "  fix: check the path (a relative path counts from the directory pytest runs in; in the policy's "
            "[sweep] table, from the policy file's directory)"
        )
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise TrainingError(
            f"dataset {where}: unsupported file type '{suffix}'.\n  fix: use one of {', '.join(SUFFIXES)}, "
            "or a directory written by Dataset.save_to_disk"
        )
    rows = {".jsonl": _jsonl, ".json": _json, ".txt": _txt, ".parquet": _parquet}[suffix](path, where)
    if not rows:
        raise TrainingError(f"dataset {where}: the file is empty (no records).\n  fix: point it at the data file")
    return [_from_rows(rows, where)], where


def _jsonl(path: Path, where: str) -> list[tuple[str, Any]]:
    rows = []
    for number, line in enumerate(_read_text(path, where).splitlines(), start=1):
        if line.strip():
            try:
                rows.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise TrainingError(
                    f"dataset {where} line {number}: not valid JSON ({exc.msg}).\n  fix: one JSON object per line"
                ) from None
    return rows


def _read_text(path: Path, where: str) -> str:
    """UTF-8, with or without the byte-order mark Windows tools write; anything else named, with the fix."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TrainingError(
            f"dataset {where}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}).\n"
            f"  fix: convert it, e.g. `iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}`"
        ) from None


def _json(path: Path, where: str) -> list[tuple[str, Any]]:
    text = _read_text(path, where)
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TrainingError(
            f"dataset {where}: not valid JSON ({exc.msg} at line {exc.lineno}).\n  fix: correct the syntax there"
        ) from None
    if not isinstance(data, list):
        raise TrainingError(
            f"dataset {where}: the JSON is a {type(data).__name__}; expected a list of records "
            '([{"text": ...}, ...]).\n  fix: write a list of objects, or use JSON Lines (.jsonl)'
        )
    return [(f"record {number}", item) for number, item in enumerate(data, start=1)]


def _txt(path: Path, where: str) -> list[tuple[str, Any]]:
    text = _read_text(path, where)
    return [("the file", {"text": text})] if text.strip() else []


def _parquet(path: Path, where: str) -> list[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TrainingError(
            f"dataset {where}: reading .parquet needs pyarrow, which is not installed.\n  fix: {_EXTRA}"
        ) from None
    return [(f"row {number}", row) for number, row in enumerate(pq.read_table(path).to_pylist(), start=1)]


def _load_from_disk(path: Path, where: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise TrainingError(
            f"dataset {where}: a directory is read as a Hugging Face dataset (Dataset.save_to_disk), which "
            f"needs the datasets package, not installed.\n  fix: {_EXTRA}, or pass a {' / '.join(SUFFIXES)} file"
        ) from None
    try:
        return datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise TrainingError(
            f"dataset {where}: the directory is not a saved Hugging Face dataset ({exc}).\n"
            "  fix: point it at the directory Dataset.save_to_disk wrote, or at a data file"
        ) from None


def _from_rows(rows: list[tuple[str, Any]], where: str) -> _Records:
    """Records from a file: each must be an object; a field missing from one record names that record."""
    for label, row in rows:
        if not isinstance(row, Mapping):
            raise TrainingError(
                f"dataset {where} {label}: a {type(row).__name__}, not an object with fields.\n"
                '  fix: one object per record, e.g. {"prompt": "...", "response": "..."}'
            )
    fields = tuple(rows[0][1])

    def values(name: str) -> list[Any]:
        for label, row in rows:
            if name not in row:
                raise TrainingError(
                    f"dataset {where} {label}: no field '{name}'; its fields are {_names(row)}.\n"
                    f"  fix: give every record a '{name}' field"
                )
        return [row[name] for _, row in rows]

    return _Records(where, fields, values, lambda index: rows[index][0], [row for _, row in rows])


def _from_hf(dataset: Any, where: str) -> tuple[list[_Records], str]:
    """A Dataset is one split; a DatasetDict gives 'train' and its first validation-like split."""
    if _hf_kind(dataset) == "Dataset":
        return [_hf_split(dataset, where)], where
    if "train" not in dataset:
        raise TrainingError(
            f"dataset {where}: the DatasetDict has no 'train' split; its splits are {_names(dataset)}.\n"
            f"  fix: pass one split (e.g. dataset[{next(iter(dataset), 'train')!r}]), or name the training one 'train'"
        )
    val = next((name for name in _VAL_SPLITS if name in dataset), None)
    names = ["train"] if val is None else ["train", val]
    return [_hf_split(dataset[name], f"{where}['{name}']") for name in names], where


def _hf_split(dataset: Any, where: str) -> _Records:
    if len(dataset) == 0:
        raise TrainingError(f"dataset {where}: the dataset is empty (0 rows).\n  fix: pass a dataset with rows")
    return _Records(
        where, tuple(dataset.column_names), lambda name: list(dataset[name]), lambda index: f"row {index}", dataset
    )


def _names(keys: Any) -> str:
    return ", ".join(repr(str(key)) for key in keys) or "(none)"


def _mode(spec: TextDataset, records: _Records, where: str) -> tuple[str, tuple[str, ...]]:
    """The mode (text, pairs or ids) and the fields it reads: the spec's, else the first the data has."""
    if spec.text_field is not None and (spec.prompt_field is not None or spec.response_field is not None):
        raise TrainingError(
            f"dataset {where}: text_field={spec.text_field!r} and prompt/response fields are both given.\n"
            "  fix: text_field for plain text, or prompt_field and response_field for pairs"
        )
    fields: tuple[str, ...]
    if spec.text_field is not None:
        mode, fields = "text", (spec.text_field,)
    elif spec.prompt_field is not None or spec.response_field is not None:
        mode, fields = "pairs", (spec.prompt_field or "prompt", spec.response_field or "response")
    elif "text" in records.fields:
        mode, fields = "text", ("text",)
    elif "prompt" in records.fields and {"response", "completion"} & set(records.fields):
        mode, fields = "pairs", ("prompt", "response" if "response" in records.fields else "completion")
    elif "input_ids" in records.fields:
        return "ids", ("input_ids",)
    else:
        first = records.fields[0] if records.fields else "body"
        raise TrainingError(
            f"dataset {where}: no field to train on: expected 'text', or 'prompt' and 'response' (or "
            f"'completion'); the records have {_names(records.fields)}.\n"
            f"  fix: name the field, e.g. TextDataset(..., text_field={first!r}), or prompt_field=... and "
            "response_field=... for pairs"
        )
    for name in fields:
        if name not in records.fields:
            raise TrainingError(
                f"dataset {records.where}: no field '{name}'; the fields are {_names(records.fields)}.\n"
                "  fix: use one of those names (TextDataset text_field / prompt_field / response_field)"
            )
    return mode, fields


def _tokenizer(given: Any, model: Any, where: str) -> tuple[Any, str]:
    """The tokenizer and its name: the one given, else the model's own (its directory, or the hub cache
    for a hub id), else bytes for a 256-token model without one."""
    if given is None:
        source = str(getattr(model.config, "name_or_path", "") or "")
        if Path(source).is_dir():
            if any((Path(source) / name).is_file() for name in _TOKENIZER_FILES):
                return _auto_tokenizer(source, where), source
        elif source:
            try:
                return _auto_tokenizer(source, where), source
            except TrainingError:
                pass  # not cached: bytes for a byte-sized vocabulary, else the message below
        if model.config.vocab_size == BYTE_VOCAB:
            return ByteTokenizer(), BYTES
        raise TrainingError(
            f"dataset {where} is text, but the model ({source or 'built in memory'}) has no tokenizer of its own "
            f"here (no {' / '.join(_TOKENIZER_FILES)} in its directory or the hub cache).\n  fix: save the "
            "tokenizer with the model (tokenizer.save_pretrained(model_dir)), or pass TextDataset(..., tokenizer=...)"
        )
    if isinstance(given, str) and given == BYTES:
        return ByteTokenizer(), BYTES
    if isinstance(given, str | os.PathLike):
        return _auto_tokenizer(os.fspath(given), where), os.fspath(given)
    if not callable(given) or not hasattr(given, "__len__"):
        raise TrainingError(
            f"dataset {where}: tokenizer={given!r} is not a tokenizer.\n"
            "  fix: pass a transformers tokenizer, a local tokenizer directory, or 'bytes'"
        )
    return given, str(getattr(given, "name_or_path", "") or type(given).__name__)


def _auto_tokenizer(source: str, where: str) -> Any:
    """transformers' AutoTokenizer from local files only: a test run never downloads."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TrainingError(
            f"dataset {where}: cannot load the tokenizer {source} from local files ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}).\n  fix: save it there with "
            "tokenizer.save_pretrained(dir), or download it once (huggingface-cli download) before the run"
        ) from None


def _texts(records: _Records, name: str) -> list[str]:
    values = records.values(name)
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise TrainingError(
                f"dataset {records.where} {records.label(index)}: field '{name}' = {value!r:.40} "
                f"({type(value).__name__}) is not a string.\n  fix: that field must hold text"
            )
    return values


def _pack(
    records: _Records, mode: str, fields: tuple[str, ...], tokenizer: Any, tokenizer_name: str, seq_len: int
) -> tuple[Any, Any]:
    """`[rows, seq_len]` input ids and labels (None for plain text: every token is a target).

    Plain text is one stream (each record ends with EOS when the tokenizer has one), cut into `seq_len`
    rows; the tail is dropped. Pairs are packed whole: a row takes pairs while they fit, a pair longer
    than `seq_len` is truncated, the rest of a row is padding; prompt and padding get no loss.
    """
    import torch

    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    if mode == "text":
        stream = [token for ids in tokenizer(_texts(records, fields[0]))["input_ids"] for token in [*ids, *eos]]
        if len(stream) < seq_len:
            raise TrainingError(
                f"dataset {records.where}: the text tokenizes to {len(stream)} tokens ({tokenizer_name} tokenizer), "
                f"fewer than seq_len={seq_len}, so not one training sequence can be made.\n"
                "  fix: more text, or a smaller seq_len"
            )
        count = len(stream) // seq_len
        return torch.tensor(stream[: count * seq_len], dtype=torch.long).reshape(count, seq_len), None
    prompts = tokenizer(_texts(records, fields[0]), add_special_tokens=True)["input_ids"]
    responses = tokenizer(_texts(records, fields[1]), add_special_tokens=False)["input_ids"]
    pad = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    rows: list[tuple[list[int], list[int]]] = [([], [])]
    for prompt, response in zip(prompts, responses, strict=True):
        ids = [*prompt, *response, *eos][:seq_len]
        labels = ([IGNORE_INDEX] * len(prompt) + [*response, *eos])[:seq_len]
        if len(rows[-1][0]) + len(ids) > seq_len:
            rows.append(([], []))
        rows[-1][0].extend(ids)
        rows[-1][1].extend(labels)
    kept = [(ids, labels) for ids, labels in rows if any(label != IGNORE_INDEX for label in labels[1:])]
    if not kept:
        raise TrainingError(
            f"dataset {records.where}: every prompt fills seq_len={seq_len} on its own, so no response token is "
            "left to learn.\n  fix: a larger seq_len, or shorter prompts"
        )
    ids_t = torch.tensor([ids + [pad] * (seq_len - len(ids)) for ids, _ in kept], dtype=torch.long)
    labels_t = torch.tensor([lab + [IGNORE_INDEX] * (seq_len - len(lab)) for _, lab in kept], dtype=torch.long)
    return ids_t, labels_t


def _token_data(packed: list[tuple[Any, Any]], name: str, seed: int) -> TokenData:
    """Train and validation rows: the data's own validation split, else a seeded 10% of the rows."""
    import torch

    from pytest_lora.model.training import TokenData

    if len(packed) == 2:
        (train, train_labels), (val, val_labels) = packed
        return TokenData(train, val, name, train_labels, val_labels)
    ids, labels = packed[0]
    if len(ids) < 2:
        raise TrainingError(
            f"dataset {name}: {len(ids)} sequence of seq_len tokens; at least 2 are needed (one to train on, one "
            "held out).\n  fix: more text, or a smaller seq_len"
        )
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, len(ids) // 10)
    train_rows, val_rows = perm[n_val:], perm[:n_val]
    if labels is None:
        return TokenData(ids[train_rows], ids[val_rows], name)
    return TokenData(ids[train_rows], ids[val_rows], name, labels[train_rows], labels[val_rows])
