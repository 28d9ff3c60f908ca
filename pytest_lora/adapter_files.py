"""Reading saved adapters without loading them: the config's fields, and the safetensors header only.

An adapter about to be resumed or shipped can be checked from what is on disk: `adapter_config.json`
(or a TOML file of the same LoraConfig fields) and the tensor shapes listed in the header of
`adapter_model.safetensors`, which is a few kilobytes whatever the adapter's size. A pickled
`adapter_model.bin` is never unpickled (unpickling runs arbitrary code): it is only reported.
Pure stdlib, except PEFT for building the `LoraConfig`.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_lora.counting import LoraModuleShape
from pytest_lora.errors import AdapterConfigError
from pytest_lora.settings import read_toml, reject_unknown, show

ADAPTER_CONFIG = "adapter_config.json"
SAFETENSORS_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"
CONFIG_SUFFIXES = (".json", ".toml")
# A safetensors header is JSON of tensor names and shapes; anything this large is not one.
_MAX_HEADER_BYTES = 100 * 2**20
# Keys PEFT writes into an adapter's state dict, before the adapted module's name.
_SAVED_PREFIXES = ("base_model.model.", "base_model.")
# lora_A is (r, in_features), lora_B is (out_features, r); embeddings likewise, without `.weight`.
_A_TENSORS = ("lora_A.weight", "lora_embedding_A")
_B_TENSORS = ("lora_B.weight", "lora_embedding_B")


@dataclass(frozen=True)
class AdapterFiles:
    """What a checked path holds: its config's fields and, for an adapter directory, its weight files."""

    path: Path
    config_file: Path
    fields: dict[str, Any]
    weights: Path | None = None
    pickled: Path | None = None


def read_adapter(path: str | os.PathLike[str]) -> AdapterFiles:
    """Read an adapter directory, an `adapter_config.json` (or any JSON) or a TOML file of LoraConfig fields.

    An `adapter_config.json` stands for its directory, so weights saved next to it are checked too.
    Raises AdapterConfigError naming the file for a missing file, bad JSON/TOML or a non-table top level.
    """
    path = Path(path)
    if not path.exists():
        raise AdapterConfigError(f"{path} does not exist; check the path.")
    if path.is_dir() or path.name == ADAPTER_CONFIG:
        folder = path if path.is_dir() else path.parent
        config_file = folder / ADAPTER_CONFIG
        if not config_file.is_file():
            raise AdapterConfigError(
                f"{folder}: a directory without {ADAPTER_CONFIG}, so it is not a saved adapter.\n"
                f"  fix: point at the directory `save_pretrained` wrote, or at a {' / '.join(CONFIG_SUFFIXES)} file"
            )
        weights, pickled = folder / SAFETENSORS_WEIGHTS, folder / PICKLED_WEIGHTS
        return AdapterFiles(
            path=path,
            config_file=config_file,
            fields=_read_fields(config_file),
            weights=weights if weights.is_file() else None,
            pickled=pickled if pickled.is_file() else None,
        )
    if path.suffix not in CONFIG_SUFFIXES:
        raise AdapterConfigError(
            f"{path}: not an adapter directory nor a {' / '.join(CONFIG_SUFFIXES)} file of LoraConfig fields.\n"
            f"  fix: name an {ADAPTER_CONFIG}, a TOML file with keys such as r, lora_alpha, target_modules, "
            "or the adapter's directory"
        )
    return AdapterFiles(path=path, config_file=path, fields=_read_fields(path))


def _read_fields(path: Path) -> dict[str, Any]:
    if path.suffix == ".toml":
        return read_toml(path, AdapterConfigError, "adapter config", "check the path")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AdapterConfigError(f"adapter config {path} cannot be read ({exc}); check the file.") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AdapterConfigError(f"adapter config {path} is not valid JSON: {exc}. Fix the syntax there.") from None
    if not isinstance(data, dict):
        raise AdapterConfigError(
            f"adapter config {path}: the top level is {show(data)}, not an object of LoraConfig fields; "
            'write e.g. {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}.'
        )
    return data


def lora_config(fields: Mapping[str, Any], where: str) -> Any:
    """A `LoraConfig` from a file's fields; an unknown key, another PEFT method or a rejected value names `where`."""
    from peft import LoraConfig

    peft_type = fields.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterConfigError(
            f"{where}: peft_type = {show(peft_type)}, but pytest-lora checks LoRA adapters only.\n"
            '  fix: check a LoRA adapter (peft_type "LORA"), or remove this file from the checked configs'
        )
    known = [name for name in LoraConfig.__dataclass_fields__ if LoraConfig.__dataclass_fields__[name].init]
    reject_unknown(fields, known, f"{where}:", AdapterConfigError, noun="LoraConfig field")
    try:
        return LoraConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise AdapterConfigError(f"{where}: PEFT rejects this LoraConfig: {exc}") from None


def safetensors_header(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Tensor name -> {"dtype", "shape", ...} from a safetensors file, reading its header and nothing else."""
    try:
        with open(path, "rb") as stream:
            prefix = stream.read(8)
            size = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
            if not 0 < size <= _MAX_HEADER_BYTES:
                raise ValueError(f"header length field {size} is impossible")
            header = json.loads(stream.read(size))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise AdapterConfigError(
            f"{os.fspath(path)}: not a readable safetensors file ({exc}).\n"
            "  fix: re-save the adapter with save_pretrained (safetensors is the default)"
        ) from None
    return {name: info for name, info in header.items() if name != "__metadata__" and isinstance(info, dict)}


def saved_shapes(header: Mapping[str, Mapping[str, Any]]) -> list[LoraModuleShape]:
    """The adapted modules of a saved adapter, with the rank and features its tensors were created with."""
    ranks: dict[str, tuple[int, int]] = {}
    outs: dict[str, int] = {}
    for key, info in header.items():
        shape = [int(n) for n in info.get("shape") or []]
        if len(shape) < 2:
            continue
        for tensor in _A_TENSORS:
            if key.endswith("." + tensor):
                ranks[_module_name(key[: -len(tensor) - 1])] = (shape[0], shape[1])
        for tensor in _B_TENSORS:
            if key.endswith("." + tensor):
                outs[_module_name(key[: -len(tensor) - 1])] = shape[0]
    return [
        LoraModuleShape(name=name, in_features=in_features, out_features=outs.get(name, 0), r=r)
        for name, (r, in_features) in ranks.items()
    ]


def _module_name(key: str) -> str:
    """The base model's module name of a saved adapter key (PEFT prefixes it with `base_model.model.`)."""
    for prefix in _SAVED_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key
