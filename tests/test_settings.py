"""Unit tests of pytest_lora.core.settings: option specs, parsing rules, precedence, paths, marker overrides."""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import textwrap
from dataclasses import fields
from pathlib import Path

import pytest

from pytest_lora.core.errors import SettingsError
from pytest_lora.core.settings import (
    OPTIONS,
    Settings,
    argparse_type,
    read_pyproject,
    resolve_settings,
)

SPECS = {spec.name: spec for spec in OPTIONS}
NODE = "tests/test_x.py::test_y"


def parse(name: str, value: object) -> object:
    return SPECS[name].parse(value)


def parse_error(name: str, value: object) -> str:
    with pytest.raises(SettingsError) as info:
        parse(name, value)
    return str(info.value)


def test_modules_are_pure():
    """Importing the settings and the policy must not pull in the heavy stack (fast, fail-early config)."""
    code = (
        "import sys, pytest_lora.core.settings, pytest_lora.core.policy;"
        "heavy = {'pytest', 'torch', 'transformers', 'peft'} & set(sys.modules);"
        "assert not heavy, heavy"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stderr


def test_specs_match_settings_fields():
    names = [f.name for f in fields(Settings) if f.name != "sources"]
    assert [spec.name for spec in OPTIONS] == names
    defaults = Settings()
    for spec in OPTIONS:
        assert spec.default == getattr(defaults, spec.name)
        assert spec.flag == "--lora-" + spec.name.replace("_", "-")
        assert spec.ini == "lora_" + spec.name
        assert spec.help.endswith(")") and "(default: " in spec.help


def test_defaults():
    s = Settings()
    assert (s.model, s.task, s.device, s.require_gpu, s.load_in_4bit) == (None, "auto", "auto", False, True)
    assert (s.quant_type, s.compute_dtype, s.double_quant, s.seed) == ("nf4", "bfloat16", True, 0)
    assert s.trust_remote_code is s.allow_unsafe_pickle is s.verify_base is False
    assert s.policy is s.cache_dir is s.peak_tflops is s.report is s.sweep is None
    assert s.configs == () and dict(s.sources) == {}
    assert SPECS["device"].help.endswith("(default: auto)")
    assert SPECS["seed"].help.endswith("(default: 0)")
    assert SPECS["load_in_4bit"].help.endswith("(default: true)")
    assert SPECS["model"].help.endswith("(default: the built-in tiny model)")


def test_flag_and_marker_options():
    assert {s.name for s in OPTIONS if s.is_flag} == {
        "require_gpu",
        "trust_remote_code",
        "allow_unsafe_pickle",
        "verify_base",
        "gradient_checkpointing",
    }
    assert {s.name for s in OPTIONS if s.marker} == {
        "model",
        "task",
        "device",
        "load_in_4bit",
        "quant_type",
        "compute_dtype",
        "double_quant",
        "seed",
        "sweep",
        "gradient_checkpointing",
    }


def test_every_default_parses_to_itself():
    for spec in OPTIONS:
        if spec.default is not None:
            assert spec.parse(spec.default) == spec.default


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("False", False), ("1", True), ("0", False), ("yes", True), ("NO", False), (True, True)],
)
def test_bool_parsing(text, expected):
    assert parse("load_in_4bit", text) is expected


@pytest.mark.parametrize("value", ["maybe", "2", 1, 0, 1.0])
def test_bool_rejects(value):
    assert "expected true or false" in parse_error("verify_base", value)


def test_int_parsing():
    assert parse("seed", "42") == 42 and parse("seed", 7) == 7
    assert "seed = true is a boolean; expected an integer, e.g. 8." in parse_error("seed", True)
    assert "seed = -1 is out of range; use a value >= 0." in parse_error("seed", "-1")
    assert "seed = '4.5' is a string; expected an integer" in parse_error("seed", "4.5")
    assert "seed = 4.0 is a number" in parse_error("seed", 4.0)


def test_float_parsing():
    assert parse("peak_tflops", "312.5") == 312.5
    value = parse("peak_tflops", 989)
    assert value == 989.0 and type(value) is float
    assert "out of range: NaN and infinity are not allowed" in parse_error("peak_tflops", "nan")
    assert "out of range" in parse_error("peak_tflops", math.inf)
    assert "peak_tflops = 0.0 is out of range; use a value > 0" in parse_error("peak_tflops", 0)
    assert "is a boolean" in parse_error("peak_tflops", False)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_devices(device):
    assert parse("device", device) == device


@pytest.mark.parametrize("device", ["tpu", "cuda:", "cuda:x", "CPU", "mps"])
def test_bad_devices(device):
    message = parse_error("device", device)
    assert f"device = {device!r} is not a device; use auto, cpu, cuda or cuda:N" in message


def test_choices():
    assert parse("quant_type", "fp4") == "fp4"
    assert "quant_type = 'int8' is not one of nf4, fp4" in parse_error("quant_type", "int8")
    assert "is not one of bfloat16, float16, float32" in parse_error("compute_dtype", "fp16")


def test_sweep_parsing():
    assert parse("sweep", "4,8,16") == (4, 8, 16)
    assert parse("sweep", " 4, 8 ,") == (4, 8)
    assert parse("sweep", [2, 4]) == (2, 4)
    assert parse("sweep", "") is None
    assert "sweep = [4, 'x'] has item 1 = 'x' that is a string" in parse_error("sweep", "4,x")
    assert "sweep = [0] has rank 0" in parse_error("sweep", "0")
    assert "lists rank 4 twice" in parse_error("sweep", [4, 4])
    assert "sweep = [] is empty" in parse_error("sweep", ",")


def test_configs_and_paths():
    assert parse("configs", "a/*.json, b/*.yaml") == ("a/*.json", "b/*.yaml")
    assert parse("configs", ["x/*.json"]) == ("x/*.json",)
    assert parse("policy", Path("team.toml")) == "team.toml"
    assert parse("model", "") is None  # `lora_model =` means the built-in model
    assert "is an integer; expected a string" in parse_error("model", 3)


def test_parse_names_the_given_key():
    with pytest.raises(SettingsError, match=r"^here device = 'tpu'"):
        SPECS["device"].parse("tpu", "here device")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pytest")
    for spec in OPTIONS:
        if spec.is_flag:
            parser.add_argument(spec.flag, action="store_true", default=None)
        else:
            parser.add_argument(spec.flag, type=argparse_type(spec), default=None)
    return parser


def test_argparse_type_converts_and_reports_usage_errors(capsys):
    parser = make_parser()
    ns = parser.parse_args(["--lora-sweep", "4,8", "--lora-load-in-4bit", "no", "--lora-verify-base"])
    assert (ns.lora_sweep, ns.lora_load_in_4bit, ns.lora_verify_base, ns.lora_device) == (
        (4, 8),
        False,
        True,
        None,
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["--lora-device", "tpu"])
    assert "argument --lora-device: device = 'tpu' is not a device" in capsys.readouterr().err


def resolve(cli=None, pyproject=None, ini=None, path: str | None = "/proj/pyproject.toml") -> Settings:
    return resolve_settings(cli or {}, pyproject or {}, ini or {}, path)


@pytest.mark.parametrize(
    ("cli", "pyproject", "ini", "expected", "source"),
    [
        ("cuda", "cpu", "cuda:1", "cuda", "command line"),
        (None, "cpu", "cuda:1", "cpu", "/proj/pyproject.toml [tool.pytest_lora]"),
        (None, None, "cuda:1", "cuda:1", "ini"),
        (None, None, "", "auto", None),
        (None, None, None, "auto", None),
    ],
)
def test_precedence(cli, pyproject, ini, expected, source):
    settings = resolve({"device": cli}, {} if pyproject is None else {"device": pyproject}, {"device": ini})
    assert settings.device == expected
    assert settings.sources.get("device") == source


def test_resolve_parses_each_layer():
    settings = resolve(
        {"seed": "3"}, {"sweep": [4, 8], "load_in_4bit": False}, {"peak_tflops": "312", "verify_base": "yes"}
    )
    assert (settings.seed, settings.sweep, settings.load_in_4bit) == (3, (4, 8), False)
    assert (settings.peak_tflops, settings.verify_base) == (312.0, True)
    assert settings.quantization_label() == "16-bit (no quantization)"


def test_pyproject_errors_name_file_key_and_value():
    with pytest.raises(SettingsError) as info:
        resolve(pyproject={"devcie": "cpu"})
    message = str(info.value)
    assert message.startswith("/proj/pyproject.toml [tool.pytest_lora] unknown key 'devcie' = 'cpu'.")
    assert "Did you mean 'device'?" in message and "Valid keys: allow_unsafe_pickle, cache_dir," in message
    with pytest.raises(SettingsError, match=r"^/proj/pyproject.toml \[tool.pytest_lora\] seed = -3 is out of range"):
        resolve(pyproject={"seed": -3})
    with pytest.raises(SettingsError, match=r"^ini option lora_device = 'tpu' is not a device"):
        resolve(ini={"device": "tpu"})
    with pytest.raises(SettingsError, match=r"^--lora-seed = 'x' is a string"):
        resolve(cli={"seed": "x"})


def test_cli_and_ini_are_keyed_by_option_name():
    with pytest.raises(SettingsError, match=r"unknown option 'lora_model'.*Did you mean 'model'"):
        resolve(ini={"lora_model": "x"})


def test_relative_paths_from_pyproject_count_from_its_directory(tmp_path, monkeypatch):
    (tmp_path / "models" / "mine").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "models")
    pyproject = str(tmp_path / "pyproject.toml")
    table = {
        "policy": "team.toml",
        "cache_dir": ".cache",
        "report": "/abs/report.json",
        "model": "models/mine",
    }
    settings = resolve(pyproject=table, path=pyproject)
    assert settings.policy == str(tmp_path / "team.toml")
    assert settings.cache_dir == str(tmp_path / ".cache")
    assert settings.report == "/abs/report.json"
    assert settings.model == str(tmp_path / "models" / "mine")
    assert resolve(pyproject={"model": "org/hub-model"}, path=pyproject).model == "org/hub-model"
    # from the command line they stay as given: the cwd is theirs
    assert resolve(cli={"policy": "team.toml", "model": "mine"}, path=pyproject).policy == "team.toml"


def test_inline_policy_table_points_policy_at_the_pyproject():
    settings = resolve(pyproject={"policy": {"ranks": [8]}}, ini={"policy": "ini.toml"})
    assert settings.policy == os.path.abspath("/proj/pyproject.toml")
    assert resolve(cli={"policy": "cli.toml"}, pyproject={"policy": {"ranks": [8]}}).policy == "cli.toml"


def test_configs_list():
    assert resolve(pyproject={"configs": ["adapters/*.json", "b/*.json"]}).configs == (
        "adapters/*.json",
        "b/*.json",
    )


def write_pyproject(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pyproject.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_read_pyproject(tmp_path):
    path = write_pyproject(
        tmp_path,
        """
        [tool.pytest_lora]
        device = "cpu"
        [tool.pytest_lora.policy]
        ranks = [4]
        """,
    )
    assert read_pyproject(path) == {"device": "cpu", "policy": {"ranks": [4]}}
    assert read_pyproject(write_pyproject(tmp_path, "[project]\nname = 'x'\n")) == {}


def test_read_pyproject_errors(tmp_path):
    path = write_pyproject(tmp_path, "[tool.pytest_lora]\ndevice = \n")
    with pytest.raises(SettingsError) as info:
        read_pyproject(path)
    assert str(path) in str(info.value) and "not valid TOML" in str(info.value) and "line 2" in str(info.value)
    path = write_pyproject(tmp_path, "[tool]\npytest_lora = 3\n")
    with pytest.raises(SettingsError, match=r"tool.pytest_lora = 3 is an integer; it must be a table"):
        read_pyproject(path)
    with pytest.raises(SettingsError, match="does not exist"):
        read_pyproject(tmp_path / "missing.toml")


def test_marker_overrides():
    session = resolve({"device": "cpu"})
    test = session.with_overrides({"device": "cuda:1", "seed": 5, "sweep": "2,4"}, NODE)
    assert (test.device, test.seed, test.sweep) == ("cuda:1", 5, (2, 4))
    assert test.sources["device"] == test.sources["seed"] == f"marker on {NODE}"
    assert session.device == "cpu" and session.sources["device"] == "command line"  # unchanged
    assert session.with_overrides({}, NODE) == session


def test_marker_unknown_keyword():
    with pytest.raises(SettingsError) as info:
        Settings().with_overrides({"devise": "cpu"}, NODE)
    message = str(info.value)
    assert message.startswith(f"@pytest.mark.lora on {NODE}: unknown keyword 'devise' = 'cpu'.")
    assert "Did you mean 'device'?" in message
    assert (
        "Valid keywords: compute_dtype, device, double_quant, gradient_checkpointing, load_in_4bit, model, quant_type, "
        "seed, sweep, task." in message
    )


def test_marker_non_marker_option():
    with pytest.raises(SettingsError) as info:
        Settings().with_overrides({"trust_remote_code": True}, NODE)
    message = str(info.value)
    assert "trust_remote_code cannot be set per test" in message
    assert "--lora-trust-remote-code" in message and "Marker keywords: compute_dtype," in message


def test_marker_bad_value():
    with pytest.raises(SettingsError, match=rf"^@pytest.mark.lora on {NODE}: quant_type = 'int4' is not one of"):
        Settings().with_overrides({"quant_type": "int4"}, NODE)


@pytest.mark.parametrize(
    ("overrides", "label"),
    [
        ({}, "4-bit nf4, compute bfloat16, double quant"),
        (
            {"quant_type": "fp4", "double_quant": False, "compute_dtype": "float16"},
            "4-bit fp4, compute float16",
        ),
        ({"load_in_4bit": False}, "16-bit (no quantization)"),
        ({"load_in_4bit": False, "compute_dtype": "float32"}, "32-bit (no quantization)"),
    ],
)
def test_quantization_label(overrides, label):
    assert Settings().with_overrides(overrides, NODE).quantization_label() == label


def test_the_former_standalone_options_have_keys_and_the_same_precedence(tmp_path: Path):
    """--lora-check, --lora-resume-rank, --lora-sweep-dir and --lora-mlflow: CLI > pyproject > ini > default."""
    pyproject = str(tmp_path / "pyproject.toml")
    table = {"check": ["adapters/a", "/abs/b"], "resume_rank": 8, "sweep_dir": "reports", "mlflow": "sqlite:///t.db"}
    settings = resolve({}, table, {"resume_rank": "4", "mlflow": "file:///ini"}, pyproject)
    assert settings.check == (str(tmp_path / "adapters/a"), "/abs/b")  # relative to the pyproject
    assert (settings.resume_rank, settings.sweep_dir) == (8, str(tmp_path / "reports"))
    assert settings.mlflow == "sqlite:///t.db"
    cli = resolve({"check": ["x", "y,z"], "resume_rank": "16", "sweep_dir": "out"}, table, {}, pyproject)
    assert (cli.check, cli.resume_rank, cli.sweep_dir) == (("x", "y,z"), 16, "out")  # one path per flag, kept
    assert resolve({}, {}, {"check": "a, b", "resume_rank": "4"}).check == ("a", "b")
    defaults = resolve()
    assert (defaults.check, defaults.resume_rank, defaults.sweep_dir, defaults.mlflow) == ((), None, None, None)
    with pytest.raises(SettingsError, match=r"^--lora-resume-rank = 0 is out of range; use a value >= 1\.$"):
        resolve({"resume_rank": "0"})
    with pytest.raises(SettingsError, match=r"\[tool.pytest_lora\] mlflow = 1 is an integer; expected a string"):
        resolve({}, {"mlflow": 1})


@pytest.mark.parametrize(
    ("layers", "origin", "described"),
    [
        (({"model": "./m"}, {}, {}), "--lora-model", "--lora-model ./m"),
        (
            ({}, {"model": "org/m"}, {}),
            "/proj/pyproject.toml [tool.pytest_lora] model",
            "[tool.pytest_lora] model = 'org/m'",
        ),
        (({}, {}, {"model": "./m"}), "ini option lora_model", "ini option lora_model = ./m"),
        (({}, {}, {}), "default model", "model none (default)"),
    ],
)
def test_messages_name_where_a_value_came_from(layers, origin, described):
    settings = resolve(*layers)
    assert settings.origin("model") == origin
    assert settings.describe("model").endswith(described)
    marked = settings.with_overrides({"model": "./x"}, NODE)
    assert marked.origin("model") == f"@pytest.mark.lora(model=...) on {NODE}"
    assert marked.describe("model") == f"@pytest.mark.lora(model='./x') on {NODE}"
