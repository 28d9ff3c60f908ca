"""Settings of pytest-lora: every option declared once, for the CLI, pyproject.toml, ini keys and the marker.

`OPTIONS` is the single source of truth: the plugin registers `--lora-*` flags and `lora_*` ini keys from
it, `resolve_settings` merges the layers (command line > `[tool.pytest_lora]` > ini > default) and
`Settings.with_overrides` applies `@pytest.mark.lora(...)` keywords. This module is pure (stdlib only) so
that a bad value stops the session with one clear message before any model is loaded.

It also holds the small validation helpers `pytest_lora.core.policy` shares (`check_value`, `reject_unknown`,
`read_toml`, ...), so that both report type errors, unknown keys and bad TOML the same way.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import reprlib
import sys
import types
import typing
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Protocol

from pytest_lora.core.errors import LoraError, SettingsError

PYPROJECT_TABLE = "tool.pytest_lora"
# The model tasks pytest-lora loads and trains, by PEFT's `TaskType` names (what `LoraConfig.task_type` takes).
TASKS = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS")

# --- validation helpers shared with pytest_lora.core.policy -----------------------------------------------


class _TomlRepr(reprlib.Repr):
    """reprlib, elided as usual, but values read as TOML (true, [4, 8]) and huge ints print safely."""

    def repr_bool(self, value: bool, level: int) -> str:
        return str(value).lower()

    def repr_tuple(self, value: tuple[object, ...], level: int) -> str:
        return self.repr_list(list(value), level)

    def repr_int(self, value: int, level: int) -> str:
        try:
            return super().repr_int(value, level)
        except ValueError:  # beyond sys.get_int_max_str_digits()
            return f"<{value.bit_length()}-bit integer>"


_REPR = _TomlRepr()
_REPR.maxstring = 60
_REPR.maxother = 60

_KINDS: dict[type, str] = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    tuple: "a list",
    dict: "a table",
    type(None): "None",
}
# What a field type accepts, in words and as a TOML example, for the "expected ..." part of messages.
_SCALARS: dict[type, tuple[str, str]] = {
    bool: ("true or false", "true"),
    int: ("an integer", "8"),
    float: ("a number", "0.5"),
    str: ("a string", '"text"'),
}
_LISTS: dict[type, tuple[str, str]] = {
    int: ("a list of integers", "[4, 8, 16]"),
    str: ("a list of strings", '["q_proj", "v_proj"]'),
}
_INT64 = (-(2**63), 2**63 - 1)
_BOOL_WORDS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def show(value: object) -> str:
    """A short TOML-like repr for messages: long strings and deep tables are elided."""
    return _REPR.repr(value)


def _kind(value: object) -> str:
    return _KINDS.get(type(value), f"a {type(value).__name__}")


def _unwrap_optional(hint: object) -> object:
    """`X | None` -> X; any other hint unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return hint


class _Mismatch(Exception):
    """Internal: a value does not fit its field type; `check_value` turns it into the caller's error."""


def _scalar(value: object, hint: object) -> object:
    if hint not in _SCALARS:
        raise TypeError(f"unsupported field type {hint!r}")  # a programming error, not a user error
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)  # TOML `x = 1` is a fine float
        except OverflowError:
            raise _Mismatch("is out of range: too large for a float") from None
    if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
        raise _Mismatch(f"is {_kind(value)}")
    if hint is float and not math.isfinite(value):  # type: ignore[arg-type]
        raise _Mismatch("is out of range: NaN and infinity are not allowed")
    if hint is int and not _INT64[0] <= value <= _INT64[1]:  # type: ignore[operator]
        raise _Mismatch("is out of range: TOML integers are 64-bit")
    return hint(value)  # normalise subclasses (tomlkit items, IntEnum ...) to the plain type


def _item(index: int, item: object, hint: object) -> object:
    try:
        return _scalar(item, hint)
    except _Mismatch as exc:
        raise _Mismatch(f"has item {index} = {show(item)} that {exc}") from None


def check_value(value: object, hint: object, key: str, error: type[LoraError] = SettingsError) -> object:
    """Return `value` normalised to the field type `hint`, or raise `error` naming `key` and the value.

    One rule set for TOML, ini, CLI and marker values, so a policy and a setting fail alike: a TOML int is
    a valid float, a bool is never a number, a string is never a list (no list of characters), NaN and
    infinity are out of range. `hint` is bool, int, float, str or tuple[int | str, ...], optionally `| None`.
    """
    inner = _unwrap_optional(hint)
    if value is None and inner is not hint:
        return None
    item_hint = typing.get_args(inner)[0] if typing.get_origin(inner) is tuple else None
    try:
        if item_hint is None:
            return _scalar(value, inner)
        if item_hint not in _LISTS:
            raise TypeError(f"unsupported field type {hint!r}")
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(f"is {_kind(value)}")
        return tuple(_item(index, item, item_hint) for index, item in enumerate(value))
    except _Mismatch as exc:
        expected, example = _LISTS[item_hint] if item_hint else _SCALARS[inner]  # type: ignore[index]
        raise error(f"{key} = {show(value)} {exc}; expected {expected}, e.g. {example}.") from None


def range_problem(
    value: float, low: float, high: float | None = None, *, low_open: bool = False, high_open: bool = False
) -> str | None:
    """Why `value` is outside the interval (NaN never passes), or None; the caller names the key."""
    above = value > low if low_open else value >= low
    below = high is None or (value < high if high_open else value <= high)
    if above and below:
        return None
    if high is None:
        interval = f"{'>' if low_open else '>='} {low}"
    else:
        interval = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    return f"is out of range; use a value {interval}"


def check_ranks(ranks: tuple[int, ...]) -> str | None:
    """Why `ranks` is not a usable list of LoRA ranks (empty, non-positive, repeated), or None."""
    if not ranks:
        return "is empty; list at least one rank, e.g. [4, 8, 16]"
    bad = [rank for rank in ranks if rank <= 0]
    if bad:
        return f"has rank {show(bad[0])}; LoRA ranks are integers >= 1"
    repeated = [rank for rank, count in Counter(ranks).items() if count > 1]
    if repeated:
        return f"lists rank {show(repeated[0])} twice; list each rank once"
    return None


def reject_unknown(
    table: Mapping[typing.Any, object],
    valid: Collection[str],
    where: str,
    error: type[LoraError] = SettingsError,
    *,
    prefix: str = "",
    noun: str = "key",
) -> None:
    """Raise `error` for the first key of `table` not in `valid`, with a did-you-mean and the valid keys.

    `prefix` ("plateau.") is prepended to the keys shown, so nested tables read as dotted TOML keys.
    """
    for key, value in table.items():
        if isinstance(key, str) and key in valid:
            continue
        listing = ", ".join(prefix + name for name in sorted(valid))
        if not isinstance(key, str):
            raise error(f"{where} {noun} {show(key)} is not a string. Valid {noun}s: {listing}.")
        import difflib  # on the error path only

        close = difflib.get_close_matches(key, list(valid), n=1)
        guess = f" Did you mean {prefix + close[0]!r}?" if close else ""
        shown = f"{show(prefix + key)} = {show(value)}"
        raise error(f"{where} unknown {noun} {shown}.{guess} Valid {noun}s: {listing}.")


def read_toml(path: str | os.PathLike[str], error: type[LoraError], what: str, fix: str) -> dict[str, object]:
    """Parse a TOML file; a missing file, an unreadable one or bad TOML becomes `error` naming the file."""
    if sys.version_info >= (3, 11):  # imported here: a project without TOML files pays nothing for the parser
        import tomllib
    else:  # pragma: no cover - exercised on Python 3.10 only
        import tomli as tomllib

    name = os.fspath(path)
    try:
        with open(path, "rb") as stream:
            return tomllib.load(stream)
    except FileNotFoundError:
        raise error(f"{what} {name} does not exist; {fix}.") from None
    except OSError as exc:
        raise error(f"{what} {name} cannot be read ({exc.strerror}); {fix}.") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{what} {name} is not valid TOML: {exc}. Fix the syntax there.") from None
    except RecursionError:
        raise error(f"{what} {name} is not valid TOML: nested too deeply to parse. Fix the syntax there.") from None


def tool_table(
    data: Mapping[str, object], path: str | os.PathLike[str], error: type[LoraError] = SettingsError
) -> dict[str, object]:
    """The `[tool.pytest_lora]` table of parsed pyproject data, {} when absent."""
    tool = data.get("tool")
    table = tool.get("pytest_lora") if isinstance(tool, dict) else None
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise error(
            f"{os.fspath(path)} {PYPROJECT_TABLE} = {show(table)} is {_kind(table)}; "
            f"it must be a table: write a [{PYPROJECT_TABLE}] section."
        )
    return table


def read_pyproject(path: str | os.PathLike[str], error: type[LoraError] = SettingsError) -> dict[str, object]:
    """The `[tool.pytest_lora]` table of a pyproject.toml ({} when absent); bad TOML raises `error`."""
    data = read_toml(path, error, "pyproject file", "check the path")
    return tool_table(data, path, error)


# --- settings ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Worker:
    """A pytest-xdist worker, as the plugin reads it from xdist: its index (gw3 -> 3) and how many there are.

    The model side takes it as an argument (GPU index mod count, CPU threads shared); None is a serial run.
    """

    index: int
    count: int


@dataclass(frozen=True)
class Settings:
    """The resolved pytest-lora settings of a session, or of one test after marker overrides.

    One field per `OptionSpec` in `OPTIONS` (same names; the defaults here are the specs' defaults);
    see each spec's `help`. `sources` maps each explicitly set field to where it came from:
    "command line", "<pyproject> [tool.pytest_lora]", "ini" or "marker on <nodeid>".
    """

    model: str | None = None
    task: str = "auto"
    device: str = "auto"
    require_gpu: bool = False
    load_in_4bit: bool = True
    quant_type: str = "nf4"
    compute_dtype: str = "bfloat16"
    double_quant: bool = True
    policy: str | None = None
    seed: int = 0
    cache_dir: str | None = None
    trust_remote_code: bool = False
    allow_unsafe_pickle: bool = False
    verify_base: bool = False
    gradient_checkpointing: bool = False
    peak_tflops: float | None = None
    report: str | None = None
    sweep: tuple[int, ...] | None = None
    configs: tuple[str, ...] = ()
    check: tuple[str, ...] = ()
    resume_rank: int | None = None
    sweep_dir: str | None = None
    mlflow: str | None = None
    sources: Mapping[str, str] = field(default_factory=lambda: types.MappingProxyType({}))

    def with_overrides(self, overrides: Mapping[str, object], where: str) -> Settings:
        """These settings with `@pytest.mark.lora(...)` keywords applied; `where` is the test's node id.

        Only options with `marker=True` may change per test: the others (GPU requirement, trust, report)
        are session-wide, and a per-test value would be silently ignored or unsafe.
        """
        specs = {spec.name: spec for spec in OPTIONS}
        allowed = [spec.name for spec in OPTIONS if spec.marker]
        label = f"@pytest.mark.lora on {where}:"
        for key in overrides:
            spec = specs.get(key)
            if spec is not None and not spec.marker:
                raise SettingsError(
                    f"{label} {key} cannot be set per test; set it for the whole session with "
                    f"{spec.flag} or `{key} = ...` in [{PYPROJECT_TABLE}]. "
                    f"Marker keywords: {', '.join(sorted(allowed))}."
                )
        reject_unknown(overrides, allowed, label, noun="keyword")
        # each value parsed to its field's type by the field's spec, which mypy cannot follow through `replace`
        values: dict[str, typing.Any] = {
            key: specs[key].parse(value, f"{label} {key}") for key, value in overrides.items()
        }
        sources = {**self.sources, **dict.fromkeys(values, f"marker on {where}")}
        return replace(self, **values, sources=types.MappingProxyType(sources))

    def origin(self, name: str) -> str:
        """Where setting `name` was set, for messages: `--lora-model`, `@pytest.mark.lora(model=...) on t.py::test`,
        `/p/pyproject.toml [tool.pytest_lora] model`, `ini option lora_model`, or `default model`."""
        origin = self.sources.get(name)
        if origin is None:
            return f"default {name}"
        if origin == "command line":
            return "--lora-" + name.replace("_", "-")
        if origin == "ini":
            return f"ini option lora_{name}"
        if origin.startswith("marker on "):
            return f"@pytest.mark.lora({name}=...) on {origin.removeprefix('marker on ')}"
        return f"{origin} {name}"

    def describe(self, name: str, shown: object = None) -> str:
        """`origin` with the value, as it was written there: `--lora-model ./m`, `@pytest.mark.lora(model='./m') on
        t.py::test`, `... [tool.pytest_lora] model = "./m"`, `ini option lora_model = ./m`, `model ./m (default)`.
        `shown` replaces the value (e.g. the model's label when the setting is None)."""
        value = getattr(self, name) if shown is None else shown
        origin = self.sources.get(name, "")
        if origin.startswith("marker on "):
            return f"@pytest.mark.lora({name}={value!r}) on {origin.removeprefix('marker on ')}"
        if origin == "command line":
            return f"{self.origin(name)} {_shown(value)}"
        if origin == "ini":
            return f"{self.origin(name)} = {_shown(value)}"
        if origin:
            return f"{self.origin(name)} = {show(value)}"
        return f"{name} {_shown(value)} (default)"

    def quantization_label(self) -> str:
        """How the base model is loaded, in words, for the report header and diagnoses."""
        if not self.load_in_4bit:
            bits = 32 if self.compute_dtype == "float32" else 16
            return f"{bits}-bit (no quantization)"
        double = ", double quant" if self.double_quant else ""
        return f"4-bit {self.quant_type}, compute {self.compute_dtype}{double}"


class Parser(Protocol):
    """`OptionSpec.parse`: the CLI string form or the TOML/marker python form -> the setting's value."""

    def __call__(self, value: object, key: str | None = None) -> object: ...


@dataclass(frozen=True, eq=False)  # registry entries, looked up by name, never compared
class OptionSpec:
    """One setting: its CLI flag, ini key, `[tool.pytest_lora]` key, parser, default and help.

    `parse(value, key=None)` raises `SettingsError` naming `key` (default: the option name), the bad
    value and what is allowed. `is_flag` options are store_true flags (register them with default None
    so "not given" stays distinguishable); every `boolean` one also gets `negative_flag`; a `repeat`
    option is given once per value on the command line (`--lora-check A --lora-check B`);
    `marker` options may be overridden per test; `path` says
    how a relative value from pyproject.toml resolves: "" not a path, "always" against the pyproject's
    directory, "if_dir" only when that directory exists (model: a hub id or a local directory).
    """

    name: str
    parse: Parser
    default: object
    help: str
    is_flag: bool = False
    marker: bool = False
    path: str = ""
    boolean: bool = False
    repeat: bool = False

    @property
    def flag(self) -> str:
        """The command line flag, e.g. --lora-model."""
        return "--lora-" + self.name.replace("_", "-")

    @property
    def negative_flag(self) -> str:
        """The flag that turns a boolean off, e.g. --no-lora-verify-base (a store_false of the same dest)."""
        return "--no-" + self.flag.removeprefix("--")

    @property
    def ini(self) -> str:
        """The ini key, e.g. lora_model."""
        return "lora_" + self.name


def _from_text(text: str, hint: object) -> object:
    """The python form of a CLI/ini string; left as is when it does not convert, so check_value says why."""
    inner = _unwrap_optional(hint)
    text = text.strip()
    if not text and inner is not hint:
        return None  # `lora_model =` in an ini file means unset
    if typing.get_origin(inner) is tuple:
        item_hint = typing.get_args(inner)[0]
        return [_from_text(part, item_hint) for part in text.split(",") if part.strip()]
    if inner is bool:
        return _BOOL_WORDS.get(text.lower(), text)
    if inner in (int, float):
        try:
            return inner(text)
        except ValueError:
            return text
    return text


def _parser(name: str, hint: object, check: Callable[[typing.Any], str | None] | None) -> Parser:
    def parse(value: object, key: str | None = None) -> object:
        key = key or name
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if isinstance(value, str):
            value = _from_text(value, hint)
        value = check_value(value, hint, key)
        problem = check(value) if check is not None and value is not None else None
        if problem:
            raise SettingsError(f"{key} = {show(value)} {problem}.")
        return value

    return parse


def _one_of(*choices: str) -> Callable[[str], str | None]:
    return lambda value: None if value in choices else f"is not one of {', '.join(choices)}; use one of those"


def _device(value: str) -> str | None:
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        return None
    return "is not a device; use auto, cpu, cuda or cuda:N (N = GPU index, e.g. cuda:0)"


def _no_empty(paths: tuple[str, ...]) -> str | None:
    """`--lora-check=` would check the current directory as a saved adapter: an empty entry is a typo."""
    return "has an empty entry; name a file, directory or pattern there, or leave it out" if "" in paths else None


def _shown(default: object) -> str:
    """A default as a user would type it: none, true, 4,8,16."""
    if default is None or default == ():
        return "none"
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, tuple):
        return ",".join(map(str, default))
    return str(default)


_HINTS = typing.get_type_hints(Settings)
_DEFAULTS = {f.name: f.default for f in fields(Settings)}


def _option(
    name: str,
    help: str,
    check: Callable[[typing.Any], str | None] | None = None,
    *,
    shown_default: str | None = None,
    is_flag: bool = False,
    marker: bool = False,
    path: str = "",
    repeat: bool = False,
) -> OptionSpec:
    default = _DEFAULTS[name]
    return OptionSpec(
        name=name,
        parse=_parser(name, _HINTS[name], check),
        default=default,
        help=f"{help} (default: {shown_default or _shown(default)})",
        is_flag=is_flag,
        marker=marker,
        path=path,
        boolean=_unwrap_optional(_HINTS[name]) is bool,
        repeat=repeat,
    )


OPTIONS: tuple[OptionSpec, ...] = (
    _option(
        "model",
        "Base model: a Hugging Face hub id, a local directory or builtin:NAME (the built-in zoo)",
        shown_default="the built-in tiny model",
        marker=True,
        path="if_dir",
    ),
    _option(
        "task",
        "What the base model is loaded and trained for: auto (from the checkpoint's architectures), "
        + ", ".join(TASKS),
        _one_of("auto", *TASKS),
        marker=True,
    ),
    _option("device", "Device for the base model: auto, cpu, cuda or cuda:N", _device, marker=True),
    _option("require_gpu", "Fail instead of skipping GPU-only tests when no GPU is usable", is_flag=True),
    _option("load_in_4bit", "Load the base model in 4 bits with bitsandbytes (QLoRA)", marker=True),
    _option("quant_type", "4-bit quantization type: nf4 or fp4", _one_of("nf4", "fp4"), marker=True),
    _option(
        "compute_dtype",
        "Compute dtype: bfloat16, float16 or float32",
        _one_of("bfloat16", "float16", "float32"),
        marker=True,
    ),
    _option("double_quant", "Quantize the 4-bit quantization constants too (double quant)", marker=True),
    _option(
        "policy",
        "Team LoRA policy TOML file",
        shown_default="[tool.pytest_lora.policy] of pyproject.toml, else built-in defaults",
        path="always",
    ),
    _option(
        "seed",
        "Random seed for adapters and training runs (an integer >= 0)",
        lambda v: range_problem(v, 0),
        marker=True,
    ),
    _option(
        "cache_dir",
        "Directory where the built-in tiny model is written",
        shown_default="a per-user cache directory",
        path="always",
    ),
    _option(
        "trust_remote_code",
        "Run the model repository's own Python code (trust_remote_code=True); only for repos you trust",
        is_flag=True,
    ),
    _option(
        "allow_unsafe_pickle",
        "Allow loading pickled .bin checkpoints, which can run arbitrary code; safetensors need no flag",
        is_flag=True,
    ),
    _option(
        "verify_base",
        "Also hash the base weights after every test (catches writes through `param.data`, which torch's "
        "version counter misses), and at the session's end",
        is_flag=True,
    ),
    _option(
        "gradient_checkpointing",
        "Train with the QLoRA recipe (gradient checkpointing, input grads, use_cache off), undone after each run",
        is_flag=True,
        marker=True,
    ),
    _option(
        "peak_tflops",
        "Peak TFLOPS of the accelerator, for utilisation figures (a number > 0)",
        lambda v: range_problem(v, 0, low_open=True),
    ),
    _option("report", "Write a JSON report of the LoRA checks to this file", path="always"),
    _option("sweep", "Ranks for rank sweeps, comma separated, e.g. 4,8,16", check_ranks, marker=True),
    _option("configs", "Glob patterns of adapter config files to check, comma separated", _no_empty),
    _option(
        "check",
        "Check an adapter_config.json, an adapter directory or a TOML file of LoraConfig fields against the "
        "policy, without loading weights; repeat the flag for several (a list in [tool.pytest_lora])",
        _no_empty,
        path="always",
        repeat=True,
    ),
    _option(
        "resume_rank",
        "Rank a checked adapter is about to be resumed at; a saved adapter of another rank fails",
        lambda v: range_problem(v, 1),
        shown_default="resume_rank of the policy, else no check",
    ),
    _option(
        "sweep_dir",
        "Directory for rank sweep reports (JSON, Markdown, PNG)",
        shown_default=".lora-sweep in the rootdir",
        path="always",
    ),
    _option(
        "mlflow",
        "Log each rank sweep to this MLflow tracking URI, e.g. sqlite:///mlflow.db: one run per rank plus the "
        "decision (needs pytest-lora[mlflow])",
        shown_default="off",
    ),
)


def argparse_type(spec: OptionSpec) -> Callable[[str], object]:
    """`type=` for argparse: a bad `--lora-*` value becomes a usage error instead of a traceback."""

    def convert(text: str) -> object:
        try:
            return spec.parse(text)
        except SettingsError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _resolve_path(spec: OptionSpec, value: object, base: Path) -> object:
    """A relative path from pyproject.toml or the ini file counts from its directory (a hub id stays a hub id)."""
    if spec.path and isinstance(value, tuple):
        return tuple(_resolve_path(spec, item, base) for item in value)
    if not spec.path or not isinstance(value, str):
        return value
    value = os.path.expanduser(value)
    candidate = base / value  # an absolute value replaces base
    explicit = value.startswith(("./", "../"))  # a path, not a hub id, even while it does not exist
    return str(candidate) if spec.path == "always" or explicit or candidate.is_dir() else value


def _unset_if_empty(value: object) -> object:
    """An ini key written as `lora_model =` reads as "": not set."""
    return None if value == "" else value


def resolve_settings(
    cli: Mapping[str, object | None],
    pyproject: Mapping[str, object],
    ini: Mapping[str, object | None],
    pyproject_path: str | None,
    ini_path: str | None = None,
) -> Settings:
    """Merge the layers into Settings: command line > `[tool.pytest_lora]` > ini > default.

    `cli` and `ini` are keyed by option name ("model"); a None value (or an empty ini string) means not
    set. `pyproject` is the `[tool.pytest_lora]` table (see `read_pyproject`). An inline
    `[tool.pytest_lora.policy]` table sets `policy` to the pyproject file itself, which `load_policy`
    reads that table from, so the precedence holds for it too. A relative path counts from the file it is
    written in (`pyproject_path`, the config file `ini_path`, as pytest's own path options), so
    `cd tests && pytest` finds the same files; one from the command line counts from the current directory.
    """
    names = [spec.name for spec in OPTIONS]
    reject_unknown(cli, names, "command line values:", noun="option")
    reject_unknown(ini, names, "ini values:", noun="option")
    table = f"{pyproject_path or 'pyproject.toml'} [{PYPROJECT_TABLE}]"
    reject_unknown(pyproject, names, table)
    pyproject = dict(pyproject)
    if isinstance(pyproject.get("policy"), Mapping):
        pyproject["policy"] = os.path.abspath(pyproject_path) if pyproject_path else None
    base = Path(pyproject_path).parent if pyproject_path else Path.cwd()
    bases = {table: base, **({"ini": Path(ini_path).parent} if ini_path else {})}

    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    for spec in OPTIONS:
        layers = (
            (cli.get(spec.name), spec.flag, "command line"),
            (pyproject.get(spec.name), f"{table} {spec.name}", table),
            (_unset_if_empty(ini.get(spec.name)), f"ini option {spec.ini}", "ini"),
        )
        for raw, key, origin in layers:
            if raw is not None:
                value = spec.parse(raw, key)
                values[spec.name] = _resolve_path(spec, value, bases[origin]) if origin in bases else value
                sources[spec.name] = origin
                break
    return Settings(**values, sources=types.MappingProxyType(sources))  # type: ignore[arg-type]
