"""Edges of the shared base, the settings check, config validation, warnings and threads, found by an adversarial
review of issue 18's changes: each test failed before its fix.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.lora

PROBE = (Path(__file__).parent / "_probe.py").read_text()
CONFIG = "from peft import LoraConfig\nCFG = LoraConfig(r=8, lora_alpha=16, target_modules=['q_proj', 'v_proj'])\n"


@pytest.fixture
def leak_pytester(lora_pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)
    lora_pytester.makeconftest(PROBE)
    return lora_pytester


# --- 1. isolation: a write through a parameter re-registered on the same storage -------------------------------


@pytest.mark.parametrize(
    "rewrap",
    [
        # PEFT's own spelling (MultiheadAttention's restore), then a write through the new object
        "norm.weight = torch.nn.Parameter(weight.data, requires_grad=weight.requires_grad)",
        # the same through register_parameter after a del, as tests/test_isolation.py does it
        "del norm.weight\n"
        "    norm.register_parameter('weight', torch.nn.Parameter(weight.data, requires_grad=weight.requires_grad))",
    ],
    ids=["setattr", "register_parameter"],
)
def test_a_write_through_a_parameter_rewrapped_on_its_storage_is_caught(
    leak_pytester: pytest.Pytester, rewrap: str
) -> None:
    """`nn.Parameter(w.data)` has a version counter of its own (`.data` does not share the original's): a write
    through the re-registered object is an in-place write all the same, named, and the weights reloaded."""
    leak_pytester.makepyfile(
        CONFIG
        + f"""
import torch

def test_rewrap_and_write(lora_base_model):
    norm = lora_base_model.model.norm
    weight = norm.weight
    {rewrap}
    with torch.no_grad():
        norm.weight.mul_(2)

def test_probe(probe):
    probe()
"""
    )
    result = leak_pytester.runpytest("-p", "no:randomly")
    # the write must fail its own test (in-place diagnosis, base reloaded), and the next test see a clean base
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_rewrap_and_write*", "*model.norm.weight*"])


def test_a_write_through_a_buffer_rewrapped_on_its_storage_is_caught(leak_pytester: pytest.Pytester) -> None:
    """The same for a buffer: `register_buffer(name, buf.data)` re-registers the rotary `inv_freq` on its storage;
    a write through it changes every logit and is caught."""
    leak_pytester.makepyfile(
        CONFIG
        + """
import torch

def test_rewrap_and_write(lora_base_model):
    rotary = lora_base_model.model.rotary_emb
    persistent = "inv_freq" not in rotary._non_persistent_buffers_set
    rotary.register_buffer("inv_freq", rotary.inv_freq.data, persistent=persistent)
    rotary.inv_freq.mul_(2)

def test_probe(probe):
    probe()
"""
    )
    result = leak_pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_rewrap_and_write*", "*inv_freq*"])


def test_a_parameter_rewrapped_and_trained_is_blamed_and_also_undone(leak_pytester: pytest.Pytester) -> None:
    """Re-wrapped with requires_grad=True and trained by an optimizer: blamed, and the trained values are undone
    by a reload (the original object's version counter never moved, so putting it back alone is not enough)."""
    leak_pytester.makepyfile(
        CONFIG
        + """
import torch

def test_train_the_norm_directly(lora_base_model):
    norm = lora_base_model.model.norm
    norm.weight = torch.nn.Parameter(norm.weight.data)
    optimizer = torch.optim.SGD([norm.weight], lr=1.0)
    lora_base_model(input_ids=torch.arange(8)[None], labels=torch.arange(8)[None]).loss.backward()
    optimizer.step()

def test_probe(probe):
    probe()
"""
    )
    result = leak_pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=2, errors=1)


# --- 2. the session model checked at configure ----------------------------------------------------------------

NON_LORA = "def test_plain():\n    assert 1 + 1 == 2\n"


@pytest.mark.parametrize(
    "args",
    [["-m", "not lora"], ["--help"], ["--collect-only", "-q"]],
    ids=["not-lora", "help", "collect-only"],
)
def test_a_session_model_missing_here_does_not_stop_runs_that_load_no_model(
    lora_pytester: pytest.Pytester, args: list[str]
) -> None:
    """A team's pyproject names its model directory (present on the GPU runner, absent on a laptop or the CPU
    runner): `pytest -m "not lora"`, `pytest --help` and IDE discovery (`--collect-only`) still work there; only a
    run with a LoRA test stops (exit 4)."""
    lora_pytester.makepyprojecttoml('[tool.pytest_lora]\nmodel = "./models/llama-3-8b"\n')
    lora_pytester.makepyfile(NON_LORA)
    result = lora_pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.OK, result.stderr.str()


def test_a_pyproject_relative_model_path_names_the_directory_it_counts_from(
    lora_pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`[tool.pytest_lora] model = "./models/x"` counts from the pyproject's directory, and the message says so
    when the directory is missing, also when pytest runs from a subdirectory."""
    lora_pytester.makepyprojecttoml('[tool.pytest_lora]\nmodel = "./models/x"\n')
    sub = lora_pytester.mkdir("tests")
    (sub / "test_lora.py").write_text("def test_it(lora_base_model):\n    pass\n")
    monkeypatch.chdir(sub)
    result = lora_pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert f"looked in {sub}" not in err, err
    assert f"looked in {lora_pytester.path / 'models'})" in err, err


# --- 3. config validation in every consumer -------------------------------------------------------------------


def test_a_dict_config_peft_refuses_is_a_clean_adapter_config_error(lora_pytester: pytest.Pytester) -> None:
    """The ValueErrors of `LoraConfig.__post_init__` (here: `layers_to_transform` with a string `target_modules`)
    are an AdapterConfigError with PEFT's reason, from lora_model and every assertion alike, without PEFT's frames."""
    lora_pytester.makepyfile(
        """
from pytest_lora import assert_alpha_ratio

BAD = {"r": 8, "lora_alpha": 16, "target_modules": "q_proj", "layers_to_transform": [0]}

def test_factory(lora_model):
    lora_model(BAD)

def test_assertion():
    assert_alpha_ratio(BAD)
"""
    )
    result = lora_pytester.runpytest()
    result.assert_outcomes(failed=2)
    out = result.stdout.str()
    assert out.count("AdapterConfigError") >= 2, out
    assert "site-packages/peft" not in out, out


# --- 5. library warnings while collecting ---------------------------------------------------------------------


def test_torchs_deprecations_from_a_conftest_importing_peft_are_dropped_too(
    pytester: pytest.Pytester,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A shared `CFG` in conftest.py (`from peft import LoraConfig`) is where many projects import peft first: the
    initial conftests load before collection, and torch's deprecations from that import are dropped too. A
    subprocess: they fire on the process's first import."""
    cache = tmp_path_factory.getbasetemp() / "lora-model-cache"
    pytester.makeini(f"[pytest]\naddopts = -p no:randomly\nlora_cache_dir = {cache}\n")
    pytester.makeconftest("from peft import LoraConfig\n\nCFG = LoraConfig(r=4, target_modules=['q_proj'])\n")
    pytester.makepyfile("def test_plain():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "script_method" not in result.stdout.str()


# --- 6. one torch thread, for the session ---------------------------------------------------------


def test_the_sessions_thread_count_is_given_back_when_the_session_ends(
    lora_pytester: pytest.Pytester,
) -> None:
    """A serial CPU session runs torch with one thread from its first base load to its end (the README says so);
    then the process gets its own count back: an in-process pytester run leaves its caller as it was."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        lora_pytester.makepyfile(
            """
import torch

def test_a_lora_test(lora_base_model):
    pass

def test_the_sessions_other_tests():
    assert torch.get_num_threads() == 1
"""
        )
        result = lora_pytester.runpytest("-p", "no:randomly")
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    result.assert_outcomes(passed=2)
    assert after == 2
