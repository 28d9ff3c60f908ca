"""The built-in zoo: tiny random checkpoints of each model family, written once to a cache.

Each entry is a config dict and a seed; the checkpoint is generated from them (torch's global
RNG forked, so the caller's random state is untouched), saved with `save_pretrained` and then
loaded like any user model, through `from_pretrained` + `BitsAndBytesConfig`. So `--lora-model
builtin:tiny-gpt2` lets a team try a family before their real model is on the runner, and the
suite covers every family. Sizes: hidden 64, 2 layers (the Llama 4), vocabulary 256, every
weight a multiple of bitsandbytes' 64-value block, so each loads in 4-bit in a fraction of a
second.

The cache is derived data, so it heals itself: a checkpoint that is truncated or lacks a file
is rebuilt, temporary directories left by a killed writer are removed, and what is written is
readable by other users (a cache baked into a CI image), as the umask allows. torch and
transformers are imported only when a checkpoint has to be generated.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import secrets
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_lora.core.errors import ModelLoadError

BUILTIN_PREFIX = "builtin:"
DEFAULT_ZOO_NAME = "tiny-llama"

_LOG = logging.getLogger("pytest_lora.zoo")

# The default built-in model: Llama architecture (q/k/v/o, gate/up/down, grouped-query
# attention). Its generated weights are what README figures are measured on: keep it, and
# its seed, exactly as they are.
TINY_LLAMA_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-6,
}
TINY_LLAMA_SEED = 0

# Shared by the decoder-only entries; each family adds what makes it that family.
_DECODER = {"vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2, "max_position_embeddings": 256}
_GQA = {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 192}


@dataclass(frozen=True)
class ZooEntry:
    """One built-in checkpoint: its config (with `architectures` and `model_type`), seed and what it shows."""

    config: dict[str, Any]
    seed: int
    about: str

    @property
    def architecture(self) -> str:
        return str(self.config["architectures"][0])

    @property
    def causal_lm(self) -> bool:
        """Loadable with AutoModelForCausalLM (T5 and the BERT classifier need a task-specific loader)."""
        return self.architecture.endswith(("ForCausalLM", "LMHeadModel"))


ZOO: dict[str, ZooEntry] = {
    "tiny-llama": ZooEntry(TINY_LLAMA_CONFIG, TINY_LLAMA_SEED, "Llama: the default; no biases, grouped-query"),
    "tiny-qwen2": ZooEntry(
        {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **_DECODER, **_GQA},
        0,
        "Qwen2: biases on q/k/v",
    ),
    "tiny-mistral": ZooEntry(
        {"architectures": ["MistralForCausalLM"], "model_type": "mistral", **_DECODER, **_GQA, "sliding_window": 128},
        0,
        "Mistral: sliding-window attention",
    ),
    "tiny-phi3": ZooEntry(
        {
            "architectures": ["Phi3ForCausalLM"],
            "model_type": "phi3",
            **_DECODER,
            **_GQA,
            "original_max_position_embeddings": 256,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        0,
        "Phi-3: fused qkv_proj and gate_up_proj",
    ),
    "tiny-gemma2": ZooEntry(
        {
            "architectures": ["Gemma2ForCausalLM"],
            "model_type": "gemma2",
            **_DECODER,
            **_GQA,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 128,
        },
        0,
        "Gemma-2: scaled word embedding tied to the head, soft-capping",
    ),
    "tiny-gpt2": ZooEntry(
        {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": 256,
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": 256,
            "bos_token_id": 0,
            "eos_token_id": 0,
        },
        0,
        "GPT-2: Conv1D layers (transposed weights) with biases",
    ),
    "tiny-opt": ZooEntry(
        {
            "architectures": ["OPTForCausalLM"],
            "model_type": "opt",
            "vocab_size": 256,
            "hidden_size": 64,
            "word_embed_proj_dim": 64,
            "ffn_dim": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 256,
        },
        0,
        "OPT: biases on every linear layer",
    ),
    "tiny-falcon": ZooEntry(
        {
            "architectures": ["FalconForCausalLM"],
            "model_type": "falcon",
            "vocab_size": 256,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        0,
        "Falcon: FalconLinear (an nn.Linear subclass, left unquantized by transformers 5.24), multi-query",
    ),
    "tiny-mixtral": ZooEntry(
        {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            **_DECODER,
            **_GQA,
            "intermediate_size": 128,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "tie_word_embeddings": False,
        },
        0,
        "Mixtral: mixture of experts, fused into 3-D parameters by transformers 5, and a router",
    ),
    "tiny-t5": ZooEntry(
        {
            "architectures": ["T5ForConditionalGeneration"],
            "model_type": "t5",
            "vocab_size": 256,
            "d_model": 64,
            "d_kv": 16,
            "d_ff": 128,
            "num_layers": 2,
            "num_decoder_layers": 2,
            "num_heads": 4,
            "feed_forward_proj": "gated-gelu",
            "tie_word_embeddings": False,
            "decoder_start_token_id": 0,
        },
        0,
        "T5 (Flan-T5 / mT0 style): encoder-decoder, seq2seq",
    ),
    "tiny-bert-cls": ZooEntry(
        {
            "architectures": ["BertForSequenceClassification"],
            "model_type": "bert",
            "vocab_size": 256,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 256,
            "max_position_embeddings": 256,
            "num_labels": 2,
        },
        0,
        "BERT for sequence classification, 2 labels",
    ),
}
ZOO_NAMES: tuple[str, ...] = tuple(ZOO)


def zoo_entry(spec: str, where: str | None = None) -> tuple[str, ZooEntry]:
    """The entry for `builtin:NAME` (or a bare NAME); an unknown name is a ModelLoadError listing the names.

    `where` names the setting in messages (`Settings.describe("model")`), by default as the flag.
    """
    name = spec.removeprefix(BUILTIN_PREFIX)
    entry = ZOO.get(name)
    if entry is None:
        raise ModelLoadError(
            f"{where or f'--lora-model {spec}'}: no built-in model of that name.\n"
            f"  built-in models: {', '.join(BUILTIN_PREFIX + n for n in ZOO_NAMES)}\n"
            "  fix: pick one of those, or give a local model directory or a hub id"
        )
    return name, entry


def default_cache_dir() -> Path:
    """Per-user cache for the built-in models (XDG convention), overridable by `--lora-cache-dir`."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "pytest-lora"


def builtin_model_dir(cache_dir: str | os.PathLike[str] | None, name: str = DEFAULT_ZOO_NAME) -> Path:
    """The directory of a built-in checkpoint, generated and written once, rebuilt if found corrupt.

    The directory name hashes the config, the seed and the transformers version, so a change
    of any of them makes a new checkpoint rather than reusing a stale one. Writing goes through
    a temporary directory and an atomic rename: parallel workers never see half a model.
    """
    name, entry = zoo_entry(name)
    target = checkpoint_dir(cache_dir, name)
    root = target.parent
    try:
        problem = checkpoint_problem(target)
    except OSError as exc:
        raise ModelLoadError(_cache_error(target, "cannot be read", exc)) from exc
    _remove_leftovers(root)
    if problem is None:
        return target
    if problem != "absent":
        _LOG.warning("pytest-lora: rebuilding the built-in model %s: %s", target, problem)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(name), dir=root))
        try:
            write_checkpoint(entry, tmp)
            _make_readable(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _install(tmp, target, name)
    except OSError as exc:
        what = "cannot be written" if problem == "absent" else f"is corrupt ({problem}) and cannot be rebuilt"
        raise ModelLoadError(_cache_error(target, what, exc)) from exc
    return target


def checkpoint_dir(cache_dir: str | os.PathLike[str] | None, name: str) -> Path:
    """Where a built-in checkpoint lives: its name and a hash of config, seed and transformers version."""
    name, entry = zoo_entry(name)
    root = Path(cache_dir).expanduser().absolute() if cache_dir else default_cache_dir()
    key = json.dumps([entry.config, entry.seed, _transformers_version()], sort_keys=True)
    return root / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


@functools.cache
def _transformers_version() -> str:
    """Read once: the metadata lookup scans sys.path, and it runs for every built-in model name."""
    return importlib.metadata.version("transformers")


def write_checkpoint(entry: ZooEntry, directory: Path) -> None:
    """Generate the entry's model from its config and seed and save it (safetensors) into `directory`."""
    import torch
    import transformers

    fields = {key: value for key, value in entry.config.items() if key not in ("architectures", "model_type")}
    config = transformers.AutoConfig.for_model(entry.config["model_type"], **fields)
    model_class = getattr(transformers, entry.architecture)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(entry.seed)
        model = model_class(config)
    with quiet_progress():
        model.save_pretrained(directory)


@contextmanager
def quiet_progress() -> Iterator[None]:
    """transformers' progress bars (writing shards, loading weights) are noise in test output."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def checkpoint_problem(directory: Path) -> str | None:
    """What makes a cached checkpoint unusable ("absent", a truncated file, ...), or None if intact.

    Checks what a power loss or a killed copy leaves behind, without reading the weights: every
    JSON file parses, config.json is there, and each safetensors file is as long as its header
    says. A file that cannot be opened for lack of permission raises (that is not corruption).
    """
    try:
        names = sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):  # the latter also when a parent is a file
        return "not a directory" if os.path.lexists(directory) else "absent"
    if "config.json" not in names:
        return "config.json is missing"
    weights = [name for name in names if name.endswith(".safetensors")]
    if not weights:
        return "no *.safetensors file"
    for name in names:
        if name.endswith(".json"):
            try:
                json.loads((directory / name).read_bytes())
            except ValueError:
                return f"{name} is not valid JSON"
    for name in weights:
        problem = _safetensors_problem(directory / name)
        if problem:
            return f"{name} {problem}"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is 8 bytes of header length, the JSON header, then the data it indexes."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"is truncated ({size} bytes)"
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            return f"is truncated ({size:,} bytes, shorter than its {header_len:,}-byte header)"
        try:
            tensors = json.loads(handle.read(header_len))
            data_end = max((t["data_offsets"][1] for k, t in tensors.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "has a corrupt header"
    expected = 8 + header_len + data_end
    if size != expected:
        return f"is {size:,} bytes, its header says {expected:,} (truncated or overwritten)"
    return None


def _make_readable(directory: Path) -> None:
    """Give the new checkpoint the modes a plain mkdir/open would: 0755/0644 under the usual umask 022.

    mkdtemp creates 0700 and safetensors writes 0600, and the rename keeps those: a cache that
    another user (a CI image, a shared runner) prepared would then be unreadable.
    """
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod((0o777 & ~umask) | 0o700)
    for path in directory.iterdir():
        path.chmod((0o666 & ~umask) | 0o600)


def _install(tmp: Path, target: Path, name: str) -> None:
    """Rename the finished checkpoint into place; a corrupt one there is moved aside first.

    Another worker may finish first: its copy is identical, so ours is dropped. A corrupt
    target is checked again just before it is moved aside, so a good copy another worker has
    installed meanwhile is kept.
    """
    try:
        os.replace(tmp, target)
        return
    except OSError:
        if checkpoint_problem(target) is None:
            shutil.rmtree(tmp, ignore_errors=True)
            return
    trash = target.parent / f"{_temp_prefix(name)}{secrets.token_hex(4)}"
    with suppress(FileNotFoundError):  # another worker moved it
        os.replace(target, trash)
    try:
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if checkpoint_problem(target) is not None:  # not a lost race: the cache cannot take it
            raise
    finally:
        _discard(trash)


# Temporary directories are named .NAME-HOST-PID-RANDOM, so that their writer can be checked for life.
STALE_AFTER_S = 15 * 60  # a checkpoint takes about a second to write


def _host() -> str:
    return re.sub(r"[^\w.]", "_", socket.gethostname()) or "host"


def _temp_prefix(name: str) -> str:
    return f".{name}-{_host()}-{os.getpid()}-"


def _writer(filename: str) -> tuple[str, int] | None:
    """(host, pid) of the writer of a temporary directory of ours; ("", 0) for an older unnamed one."""
    for name in ZOO_NAMES:
        if filename.startswith(f".{name}-"):
            parts = filename[len(name) + 2 :].split("-")
            if len(parts) == 3 and parts[1].isdigit():
                return parts[0], int(parts[1])
            if len(parts) == 1:
                return "", 0
    return None


def _remove_leftovers(root: Path) -> None:
    """Remove temporary directories of writers that died (killed run, power loss).

    A writer on this host is dead when its pid is gone; one from another host (a shared cache
    on a network disk) or an older version, when its directory is older than STALE_AFTER_S.
    Best effort: a cache the user cannot write is left as it is.
    """
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    host, now = _host(), time.time()
    for item in entries:
        writer = _writer(item.name)
        if writer is None:
            continue
        try:
            old = now - item.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
        except OSError:
            continue
        if old or (writer[0] == host and not _alive(writer[1])):
            _discard(Path(item.path))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def _discard(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(OSError):
            path.unlink()


def _cache_error(target: Path, what: str, exc: OSError) -> str:
    why = ""
    if isinstance(exc, PermissionError):
        why = "  a cache that another user (a CI image, a shared runner) wrote with private modes reads like this.\n"
    return (
        f"built-in model cache {target} {what}: {type(exc).__name__}: {exc}\n{why}"
        "  it is generated data (a few MB): any directory you can write serves.\n"
        "  fix: pass --lora-cache-dir DIR (or lora_cache_dir = DIR in the ini file) with a directory you can write, "
        f"or give yourself read and write access to {target.parent}"
    )
