"""Reading saved adapters without loading them: the config's fields, and the safetensors header only.

An adapter about to be resumed or shipped can be checked from what is on disk: `adapter_config.json`
(or a TOML file of the same LoraConfig fields) and the tensor shapes listed in the header of
`adapter_model.safetensors`, which is a few kilobytes whatever the adapter's size. A pickled
`adapter_model.bin` is never unpickled (unpickling runs arbitrary code): it is only reported.
Pure stdlib, except PEFT for building the `LoraConfig`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_lora.core.errors import AdapterConfigError
from pytest_lora.core.settings import read_toml, reject_unknown, show
from pytest_lora.model.counting import LoraModuleShape

ADAPTER_CONFIG = "adapter_config.json"
SAFETENSORS_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"
CONFIG_SUFFIXES = (".json", ".toml")
# A safetensors header is JSON of tensor names and shapes; anything this large is not one.
_MAX_HEADER_BYTES = 100 * 2**20
# Keys PEFT writes into an adapter's state dict, before the adapted module's name.
_SAVED_PREFIXES = ("base_model.model.", "base_model.")
# lora_A is (r, in_features), lora_B is (out_features, r); embeddings likewise, without `.weight`.
# Element sizes of safetensors' dtypes (its Dtype enum); sub-byte types are not used by PEFT adapters.
_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
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
    """Tensor name -> {"dtype", "shape", ...} from a safetensors file, reading its header and nothing else.

    The header is checked against the file as safetensors checks it before loading: each tensor's bytes
    (`data_offsets`) hold exactly its shape at its dtype, the tensors tile the data area without gaps, and
    the file ends where the data does. A truncated copy or a header edited over other data is corrupt.
    """
    try:
        with open(path, "rb") as stream:
            prefix = stream.read(8)
            size = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
            if not 0 < size <= _MAX_HEADER_BYTES:
                raise ValueError(f"header length field {size} is impossible")
            header = json.loads(stream.read(size))
            file_bytes = os.fstat(stream.fileno()).st_size
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise AdapterConfigError(
            f"{os.fspath(path)}: not a readable safetensors file ({exc}).\n"
            "  fix: re-save the adapter with save_pretrained (safetensors is the default)"
        ) from None
    tensors = {name: info for name, info in header.items() if name != "__metadata__"}
    problem = _layout_problem(tensors, 8 + size, file_bytes)
    if problem:
        raise AdapterConfigError(
            f"{os.fspath(path)}: corrupt safetensors file: {problem}.\n"
            "  safetensors itself refuses to load it (SafetensorError: incomplete metadata, or invalid shape, data "
            "type, or offset); its shapes say nothing about the rank the adapter was trained at.\n"
            "  fix: copy the file again (a copy or download cut short), or re-save the adapter with save_pretrained"
        )
    return tensors


def _layout_problem(tensors: Mapping[str, Any], data_start: int, file_bytes: int) -> str | None:
    """Why the header does not describe the file (None when it does), as safetensors' own validation."""
    spans = []
    for name, info in tensors.items():
        shape = info.get("shape") if isinstance(info, dict) else None
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        dtype = info.get("dtype") if isinstance(info, dict) else None
        itemsize = _DTYPE_BYTES.get(dtype) if isinstance(dtype, str) else None
        if (
            itemsize is None
            or not isinstance(shape, list)
            or not all(isinstance(n, int) and n >= 0 for n in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(n, int) for n in offsets)
        ):
            return f"tensor {name!r} has no valid dtype, shape and data_offsets ({_shown(info)})"
        declared = math.prod(shape) * itemsize
        if offsets[1] - offsets[0] != declared:
            return (
                f"tensor {name!r} is declared {info['dtype']} {tuple(shape)} ({declared:,} bytes), but its "
                f"data_offsets {offsets} span {offsets[1] - offsets[0]:,} bytes: the header was edited, or belongs "
                "to other data"
            )
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            return (
                f"tensor {name!r} starts at data byte {begin:,} where {end:,} was expected (the tensors must tile the "
                "data without gaps or overlaps)"
            )
        end = stop
    if data_start + end != file_bytes:
        return (
            f"the header's tensors need {end:,} data bytes after the {data_start:,}-byte header, so the file should "
            f"be {data_start + end:,} bytes; it is {file_bytes:,}"
            + (" (truncated)" if file_bytes < data_start + end else " (trailing bytes)")
        )
    return None


def _shown(info: Any) -> str:
    text = json.dumps(info)
    return text if len(text) <= 120 else text[:117] + "..."


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
