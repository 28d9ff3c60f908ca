"""Adapter configs as test items (pytester): collection, node ids, policy failures, saved tensors, broken files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pytest_lora.core.errors import AdapterConfigError
from pytest_lora.model.adapter_files import read_adapter, safetensors_header, saved_shapes
from pytest_lora.model.loading import TINY_LLAMA_CONFIG
from pytest_lora.plugin.adapter_check import CHECK_OPTION, RESUME_OPTION

pytestmark = pytest.mark.lora

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "adapters"
# A policy for the built-in tiny model (hidden size 64): adapters are a few percent of it.
TINY_POLICY = """
[tool.pytest_lora.policy]
ranks = [4, 8, 16]
min_trainable_pct = 1.0
max_trainable_pct = 10.0
required_targets = ["q_proj", "v_proj"]
max_dropout = 0.2
"""
GOOD = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.05}


def _save_adapter(folder: Path, **fields) -> Path:
    """A real PEFT adapter of the built-in model's architecture (16-bit, CPU), saved as PEFT saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in TINY_LLAMA_CONFIG.items() if k != "architectures"})
    get_peft_model(LlamaForCausalLM(config), LoraConfig(**{**GOOD, **fields})).save_pretrained(folder)
    return folder


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_example_adapters_good_passes_bad_fails_with_a_diagnosis(lora_pytester: pytest.Pytester) -> None:
    """The shipped example: a Llama-2-7b-shaped base from its config.json alone, a good and a bad config."""
    shutil.copytree(EXAMPLES, lora_pytester.path / "adapters")
    result = lora_pytester.runpytest(
        "adapters",
        "--lora-policy=adapters/policy.toml",
        f"{CHECK_OPTION}=adapters/good",
        f"{CHECK_OPTION}=adapters/bad.toml",
        "-v",
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*collected 2 items",
            "adapters/good PASSED*",
            "adapters/bad.toml FAILED*",
            "*adapters/bad.toml violates the LoRA policy (adapters/policy.toml); checked on base model llama-2-7b*",
            "*r = 4 not in the policy's ranks [[]8, 16, 32]",
            "*lora_dropout = 0.3 outside [[]0, 0.1]",
            "*lora_alpha / r = 4 / 4 = 1, policy wants 2*",
            "*LoRA parameter budget not met: 0.03111% < 0.05% (min)",
            "*trainable        2,097,152*",
            "*fix: r >= 7 on these targets (now r=4); the smallest policy rank that fits is r=8*",
        ]
    )


def test_pyproject_globs_marker_node_ids_and_selection(lora_pytester: pytest.Pytester) -> None:
    lora_pytester.makepyprojecttoml(
        TINY_POLICY + '\n[tool.pytest_lora]\nconfigs = ["adapters/*.json", "nowhere/*.toml"]\n'
    )
    folder = lora_pytester.mkdir("adapters")
    (folder / "qv.json").write_text(json.dumps(GOOD))
    (folder / "all.json").write_text(json.dumps({**GOOD, "r": 4, "lora_alpha": 8, "target_modules": "all-linear"}))
    lora_pytester.makepyfile("def test_plain():\n    pass\n")
    result = lora_pytester.runpytest("-v")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*collected 4 items",
            "test_pyproject_globs_marker_node_ids_and_selection.py::test_plain PASSED*",
            "adapters/all.json PASSED*",
            "adapters/qv.json PASSED*",
            "nowhere/*.toml FAILED*",
            "*AdapterConfigError: *pyproject.toml [[]tool.pytest_lora[]] configs: 'nowhere/*.toml' matches no file.",
        ]
    )
    lora_pytester.runpytest("-m", "lora", "-k", "qv").assert_outcomes(passed=1, deselected=3)
    # An explicit path narrows the run: the configs globs apply to runs without path arguments, like testpaths.
    lora_pytester.runpytest("test_pyproject_globs_marker_node_ids_and_selection.py").assert_outcomes(passed=1)


@pytest.mark.parametrize(
    ("args", "ini", "origin"),
    [
        (["--lora-configs", "nowhere/*.toml"], "", "--lora-configs"),
        (["--lora-configs=nowhere/*.toml"], "", "--lora-configs"),
        ([], "lora_configs = nowhere/*.toml", "ini option lora_configs"),
    ],
    ids=["flag value", "flag=value", "ini"],
)
def test_a_glob_is_named_where_it_was_written(
    lora_pytester: pytest.Pytester, args: list[str], ini: str, origin: str
) -> None:
    """A `configs` pattern from the command line or the ini file is not reported as a pyproject key."""
    lora_pytester.makepyprojecttoml(TINY_POLICY)
    if ini:
        tox = lora_pytester.path / "tox.ini"
        tox.write_text(tox.read_text() + f"\n{ini}\n")
    lora_pytester.makepyfile("def test_plain():\n    pass\n")
    result = lora_pytester.runpytest(*args)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([f"AdapterConfigError: {origin}: 'nowhere/[*].toml' matches no file."])
    assert "[tool.pytest_lora] configs" not in result.stdout.str()


def test_broken_files_fail_alone_and_the_others_are_still_checked(lora_pytester: pytest.Pytester) -> None:
    lora_pytester.makepyprojecttoml(TINY_POLICY)
    (lora_pytester.path / "broken.json").write_text('{"r": 8,, "lora_alpha": 16}')
    (lora_pytester.path / "broken.toml").write_text("r = 8\nlora_alpha = \n")
    (lora_pytester.path / "typo.json").write_text(json.dumps({**GOOD, "lora_aplha": 16}))
    (lora_pytester.path / "targets.toml").write_text('r = 8\nlora_alpha = 16\ntarget_modules = ["q_proj", "v_prj"]\n')
    (lora_pytester.path / "values.toml").write_text(
        'r = "8"\nlora_dropout = 2\ntarget_modules = ["q_proj", "v_proj"]\n'
    )
    (lora_pytester.path / "good.toml").write_text('r = 8\nlora_alpha = 16\ntarget_modules = ["q_proj", "v_proj"]\n')
    names = ["broken.json", "broken.toml", "typo.json", "targets.toml", "values.toml", "good.toml", "missing.json"]
    result = lora_pytester.runpytest(*(f"{CHECK_OPTION}={name}" for name in names))
    result.assert_outcomes(passed=1, failed=6)
    result.stdout.fnmatch_lines_random(
        [
            "AdapterConfigError: adapter config */broken.json is not valid JSON: Expecting property name enclosed "
            "in double quotes: line 1 column 9 (char 8). Fix the syntax there.",
            "AdapterConfigError: adapter config */broken.toml is not valid TOML: *. Fix the syntax there.",
            "AdapterConfigError: */typo.json: unknown LoraConfig field 'lora_aplha' = 16. Did you mean 'lora_alpha'?*",
            "LoraAssertionError: */targets.toml violates the LoRA policy*",
            "AdapterConfigError: */missing.json does not exist; check the path.",
        ]
    )
    result.stdout.fnmatch_lines(
        ["*LoraConfig.target_modules entry 'v_prj' matches no module of this model. Did you mean 'v_proj'?"]
    )


def test_saved_tensors_at_another_rank_than_the_config(lora_pytester: pytest.Pytester) -> None:
    """The guide's warning: adapter shapes are fixed at init; a changed r cannot resume the checkpoint."""
    lora_pytester.makepyprojecttoml(TINY_POLICY)
    folder = _save_adapter(lora_pytester.path / "run-1", rank_pattern={"layers.0.self_attn.q_proj": 4})
    _edit_config(folder, r=16, lora_alpha=32)
    result = lora_pytester.runpytest(f"{CHECK_OPTION}=run-1")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*adapter_model.safetensors: 7 module(s) saved at another rank than the config's",
            "*model.layers.0.self_attn.v_proj: saved at rank 8, adapter_config.json says r = 16",
            "*... and 2 more",
            "*adapter shapes are fixed when the adapter is created*size mismatch for lora_A*",
            "*retrain from scratch (do not resume this checkpoint with a new rank)",
        ]
    )
    assert "layers.0.self_attn.q_proj: saved at rank" not in result.stdout.str()  # its rank_pattern entry fits


def test_saved_adapter_consistent_passes_and_a_planned_resume_is_checked(lora_pytester: pytest.Pytester) -> None:
    lora_pytester.makepyprojecttoml(TINY_POLICY)
    _save_adapter(lora_pytester.path / "run-1")
    lora_pytester.runpytest(f"{CHECK_OPTION}=run-1/adapter_config.json").assert_outcomes(passed=1)
    result = lora_pytester.runpytest(f"{CHECK_OPTION}=run-1", f"{RESUME_OPTION}=16")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*planned resume at r = 16 (--lora-resume-rank), but this adapter was saved at r = 8 "
            "(adapter_config.json r = 8; tensors saved at rank 8)",
            "*fix: resume at r = 8; to train at r = 16, reload the base fresh and retrain from scratch*",
        ]
    )
    lora_pytester.makepyprojecttoml(TINY_POLICY + "resume_rank = 8\n")
    lora_pytester.runpytest(f"{CHECK_OPTION}=run-1").assert_outcomes(passed=1)
    # both as [tool.pytest_lora] keys: the file checked, and the message says where the rank came from
    lora_pytester.makepyprojecttoml('[tool.pytest_lora]\ncheck = ["run-1"]\nresume_rank = 16\n' + TINY_POLICY)
    result = lora_pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*planned resume at r = 16 (*pyproject.toml [[]tool.pytest_lora] resume_rank), but*"])


def test_adapter_for_another_base_is_caught_from_the_header(lora_pytester: pytest.Pytester) -> None:
    lora_pytester.makepyprojecttoml(TINY_POLICY)
    folder = _save_adapter(lora_pytester.path / "wide")
    header = safetensors_header(folder / "adapter_model.safetensors")
    assert {s.r for s in saved_shapes(header)} == {8}
    lora_pytester.makepyprojecttoml(
        TINY_POLICY.replace("[tool.pytest_lora.policy]", "[tool.pytest_lora.policy]\nbase_model = 'other'")
    )
    other = lora_pytester.mkdir("other")
    (other / "config.json").write_text(json.dumps({**TINY_LLAMA_CONFIG, "hidden_size": 128, "intermediate_size": 256}))
    result = lora_pytester.runpytest(f"{CHECK_OPTION}=wide")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*checked on base model other*",
            "*8 module(s) do not fit the base model",
            "*model.layers.0.self_attn.q_proj: saved for in/out features 64/64, the base has 128/128",
        ]
    )


def test_pickled_weights_are_reported_never_unpickled(lora_pytester: pytest.Pytester) -> None:
    lora_pytester.makepyprojecttoml(TINY_POLICY)
    folder = lora_pytester.mkdir("legacy")
    (folder / "adapter_config.json").write_text(json.dumps(GOOD))
    (folder / "adapter_model.bin").write_bytes(b"not a pickle: unpickling this would raise")
    result = lora_pytester.runpytest(f"{CHECK_OPTION}=legacy")
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(
        ["*LoraPolicyWarning: */legacy/adapter_model.bin: pickled weights, not read (unpickling can run arbitrary*"]
    )


def test_read_adapter_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(AdapterConfigError, match="top level is"):
        read_adapter(tmp_path / "list.json")
    with pytest.raises(AdapterConfigError, match=r"directory without adapter_config\.json"):
        read_adapter(tmp_path)
    (tmp_path / "notes.txt").write_text("r = 8")
    with pytest.raises(AdapterConfigError, match="not an adapter directory"):
        read_adapter(tmp_path / "notes.txt")
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(AdapterConfigError, match="not a readable safetensors file"):
        safetensors_header(tmp_path / "bad.safetensors")


def test_globs_stay_inside_the_project_and_survive_a_symlink_loop(
    lora_pytester: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`**` over a symlink loop ends; patterns (or symlinks) reaching outside fail by name; --lora-check may."""
    outside = tmp_path_factory.mktemp("elsewhere")
    (outside / "stray.json").write_text(json.dumps(GOOD))
    real = lora_pytester.mkdir("loop") / "real"
    real.mkdir()
    (real / "adapter_config.json").write_text(json.dumps(GOOD))
    (real / "up").symlink_to("..")  # loop/real/up/real/up/... without end for a glob that follows links
    (lora_pytester.path / "loop" / "self").symlink_to(".")
    (lora_pytester.path / "linked").symlink_to(outside)
    escape = f"../{outside.name}/*.json"
    patterns = ["loop/**/adapter_config.json", escape, f"{outside}/*.json", "*/stray.json"]
    lora_pytester.makepyprojecttoml(TINY_POLICY + f"\n[tool.pytest_lora]\nconfigs = {json.dumps(patterns)}\n")
    # pytest's own directory walk follows links too: keep it out of the loop (a real project has testpaths)
    result = lora_pytester.runpytest("-v", "-o", "norecursedirs=*")
    result.assert_outcomes(passed=1, failed=3)
    table = f"{lora_pytester.path / 'pyproject.toml'} [[]tool.pytest_lora[]] configs"
    result.stdout.fnmatch_lines_random(
        [
            "loop/real/adapter_config.json PASSED*",
            f"AdapterConfigError: {table}: '{escape}' reaches outside the project directory {lora_pytester.path} "
            f"(it starts at {outside}).",
            f"AdapterConfigError: {table}: '{outside}/[*].json' reaches outside the project directory *",
            f"AdapterConfigError: {table}: '[*]/stray.json' matches 1 path(s) outside the project directory "
            f"{lora_pytester.path}, e.g. {lora_pytester.path}/linked/stray.json -> {outside}/stray.json (through a "
            "symlink or '..'); they are not checked.",
        ]
    )
    assert (
        result.stdout.str().count(
            f"  fix: correct the pattern, or name a file outside the project explicitly with {CHECK_OPTION} PATH"
        )
        == 3
    )
    explicit = lora_pytester.runpytest(f"{CHECK_OPTION}={outside / 'stray.json'}", "-v", "-o", "norecursedirs=*")
    explicit.assert_outcomes(passed=2, failed=3)  # the same three patterns refused, the named file checked
    explicit.stdout.fnmatch_lines([f"{outside}/stray.json PASSED*"])


def test_a_glob_that_walks_too_far_fails_by_name(lora_pytester: pytest.Pytester, monkeypatch) -> None:
    from pytest_lora.core import globs

    monkeypatch.setattr(globs, "MAX_ENTRIES", 3)
    for name in "abcde":
        lora_pytester.mkdir(name)
    lora_pytester.makepyprojecttoml(TINY_POLICY + '\n[tool.pytest_lora]\nconfigs = ["**/*.json"]\n')
    result = lora_pytester.runpytest()
    result.assert_outcomes(failed=1)
    assert "matches no file" not in result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "AdapterConfigError: *configs: '[*][*]/[*].json': the search stopped after reading 3 directory entries, "
            "so its matches are incomplete.",
            "  fix: narrow the pattern, e.g. adapters/[*][*]/adapter_config.json instead of [*][*]/[*].json",
        ]
    )


def _rewrite(path: Path, edit) -> None:
    """Rewrite a safetensors file's header with `edit(header)`, keeping its data bytes as they are."""
    import struct

    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size :])


def _cut(path: Path, keep) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: keep(data)])


def _header_end(data: bytes) -> int:
    import struct

    return 8 + struct.unpack("<Q", data[:8])[0]


def _set_shape(name: str, shape: list[int]):
    def edit(header: dict) -> None:
        header[name]["shape"] = shape

    return edit


def _set_offsets(name: str, offsets: list[int]):
    def edit(header: dict) -> None:
        header[name]["data_offsets"] = offsets

    return edit


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
DAMAGES = {
    "truncated after its header": (lambda path: _cut(path, _header_end), r"it is [\d,]+ \(truncated\)"),
    "cut to half its size": (lambda path: _cut(path, lambda data: len(data) // 2), r"\(truncated\)"),
    "trailing bytes": (lambda path: path.write_bytes(path.read_bytes() + b"\0" * 64), r"\(trailing bytes\)"),
    "a shape edited in the header": (
        lambda path: _rewrite(path, _set_shape(Q_A, [16, 64])),
        rf"tensor '{Q_A}' is declared F32 \(16, 64\) \(4,096 bytes\), but its data_offsets \[\d+, \d+\] span 2,048",
    ),
    "overlapping offsets": (
        lambda path: _rewrite(path, _set_offsets(Q_A, [2048, 4096])),
        r"starts at data byte 2,048 where 0 was expected",
    ),
}


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_adapter(tmp_path_factory.mktemp("saved") / "run")


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_safetensors_file_is_corrupt_as_safetensors_says(saved_adapter: Path, tmp_path, damage) -> None:
    """Checked from the header and the file's length alone; safetensors itself refuses each of these files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = tmp_path / "adapter_model.safetensors"
    shutil.copyfile(saved_adapter / "adapter_model.safetensors", path)
    assert {s.r for s in saved_shapes(safetensors_header(path))} == {8}  # intact: read as saved
    harm, message = DAMAGES[damage]
    harm(path)
    with pytest.raises(SafetensorError):
        load_file(path)
    with pytest.raises(
        AdapterConfigError, match=rf"(?s)corrupt safetensors file: .*{message}.*fix: copy the file again"
    ):
        safetensors_header(path)


def test_damaged_weights_are_reported_as_corrupt_not_as_another_rank(lora_pytester: pytest.Pytester) -> None:
    lora_pytester.makepyprojecttoml(TINY_POLICY)
    edited = _save_adapter(lora_pytester.path / "edited")
    _rewrite(edited / "adapter_model.safetensors", _set_shape(Q_A, [16, 64]))
    truncated = _save_adapter(lora_pytester.path / "truncated")
    _cut(truncated / "adapter_model.safetensors", lambda data: len(data) // 2)
    result = lora_pytester.runpytest(f"{CHECK_OPTION}=edited", f"{CHECK_OPTION}=truncated")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines_random(
        [
            f"*edited/adapter_model.safetensors: corrupt safetensors file: tensor '{Q_A}' is declared F32 (16, 64)*",
            "*truncated/adapter_model.safetensors: corrupt safetensors file: the header's tensors need * data bytes*",
        ]
    )
    assert "saved at rank" not in result.stdout.str()


def test_a_saved_moe_adapter_is_read_per_expert_stack(tmp_path: Path) -> None:
    """PEFT saves a fused expert stack's adapter as one (r x experts, in) / (out, r x experts) pair per parameter,
    nested (`experts`, `experts.base_layer`): a consistent Mixtral adapter passes, a changed r is caught there."""
    import dataclasses

    from peft import LoraConfig, get_peft_model
    from transformers import MixtralConfig, MixtralForCausalLM

    from pytest_lora.core.errors import LoraAssertionError
    from pytest_lora.core.policy import Policy
    from pytest_lora.model.adapter_check import check_adapter
    from pytest_lora.model.zoo import ZOO

    config = ZOO["tiny-mixtral"].config
    fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    get_peft_model(MixtralForCausalLM(MixtralConfig(**fields)), lora).save_pretrained(tmp_path / "moe")
    policy = dataclasses.replace(Policy(), ranks=(8, 16), max_trainable_pct=100.0)
    assert check_adapter(tmp_path / "moe", policy, config).count.trainable == 61_504
    _edit_config(tmp_path / "moe", r=16, lora_alpha=32)
    with pytest.raises(LoraAssertionError) as failure:
        check_adapter(tmp_path / "moe", policy, config)
    # the saved config keeps PEFT's rank_pattern for the fused gate_up_proj (w1 + w3 at 2r = 16): only down_proj moves
    assert (
        "model.layers.0.mlp.experts: saved as (rows, in, out) [(32, 128, 64), (64, 64, 256)], adapter_config.json "
        "makes [(64, 64, 256), (64, 128, 64)]" in str(failure.value)
    )
    router = "model.layers.0.mlp.gate: saved as (rows, in, out) [(8, 64, 4)], adapter_config.json makes [(16, 64, 4)]"
    assert router in str(failure.value)
