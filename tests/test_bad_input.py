"""Bad input meets a clear message naming the thing and the fix, never INTERNALERROR or a torch traceback.

Each case is a user's test file run under pytester; settings and policy errors (exit code 4) are
in test_plugin.py. The README's "What pytest-lora guards against" table lists these cases by id.
"""

from __future__ import annotations

import json
import re

import pytest

pytestmark = pytest.mark.lora

HEAD = """import torch
from peft import LoraConfig


def cfg(**kw):
    kw.setdefault("target_modules", ["q_proj", "v_proj"])
    return LoraConfig(**{"r": 8, "lora_alpha": 16, **kw})


"""

CONFIG_CASES = {
    "r-zero": (
        "lora_model(cfg(r=0))",
        "*AdapterConfigError: invalid LoraConfig:",
        "*r = 0: the rank must be an int >= 1*",
    ),
    "r-float": ("lora_model(cfg(r=2.5))", "*AdapterConfigError*", "*r = 2.5: the rank must be an int >= 1*"),
    "alpha-zero": (
        "lora_model(cfg(lora_alpha=0))",
        "*AdapterConfigError*",
        "*lora_alpha = 0: must be a finite number > 0*",
    ),
    "dropout-one": (
        "lora_model(cfg(lora_dropout=1.0))",
        "*AdapterConfigError*",
        "*lora_dropout = 1.0: must be in [[]0, 1)*",
    ),
    "target-typo": (
        "lora_model(cfg(target_modules=['q_proj', 'v_prj']))",
        "*entry 'v_prj' matches no module of this model. Did you mean 'v_proj'?",
        "*linear modules: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head",
    ),
    "targets-empty": ("lora_model(cfg(target_modules=[]))", "*AdapterConfigError*", "*target_modules = []: empty*"),
    "rank-pattern-typo": (
        "lora_model(cfg(rank_pattern={'vproj': 4}))",
        "*rank_pattern entry 'vproj' matches no module of this model. Did you mean 'v_proj'?",
        "*fix: use one of the names above",
    ),
    "alpha-inf": ("lora_model(cfg(lora_alpha=float('inf')))", "*AdapterConfigError*", "*lora_alpha = inf: must be*"),
    "bias-unknown": ("lora_model(cfg(bias='some'))", "*AdapterConfigError*", "*bias = 'some': must be one of 'none'*"),
    "target-not-a-string": (
        "lora_model(cfg(target_modules=['q_proj', 3]))",
        "*AdapterConfigError*",
        "*entry 3: must be*",
    ),
    "target-not-a-layer": (
        "lora_model(cfg(target_modules=['mlp']))",
        "*LoraConfig.target_modules matches 'model.layers.0.mlp', a LlamaMLP: LoRA can only wrap linear*",
        "*fix: target the linear layers inside it*",
    ),
    "init-rewrites-base": (
        "lora_model(cfg(init_lora_weights='olora'))",
        "*AdapterConfigError: invalid LoraConfig:",
        "*init_lora_weights = 'olora': it rewrites the base weights*use True (PEFT's default), False or 'gaussian'*",
    ),
    "rank-pattern-untargeted": (
        "lora_model(cfg(rank_pattern={'o_proj': 4}))",
        "*rank_pattern entry 'o_proj' names a module this config does not adapt, so it has no effect.",
        "*fix: add 'o_proj' to target_modules, or drop it from rank_pattern",
    ),
    "rank-pattern-bad-regex": (
        "lora_model(cfg(rank_pattern={'q_proj(': 4}))",
        "*AdapterConfigError*",
        "*not a valid regular expression*",
    ),
    "layers-out-of-range": (
        "lora_model(cfg(layers_to_transform=[7]))",
        "*layers_to_transform = [[]7] / exclude_modules = None leave none of them.",
        "*the model has 4 layers (indices 0 .. 3)",
    ),
    "nan-loss": (
        "m = lora_model(cfg())\n"
        "    h = m.get_base_model().lm_head.register_forward_hook(lambda mod, i, o: o * float('nan'))\n"
        "    try:\n        lora_train(m, steps=5)\n    finally:\n        h.remove()",
        "*TrainingError: loss is nan at step 1 of 5 (lr=0.01)*",
        "*fix: lower lr*",
    ),
    "dataset-empty": (
        "lora_train(cfg(), dataset=[])",
        "*TrainingError: dataset: no sequence has >= 64 tokens*",
        "*fix:*",
    ),
    "dataset-too-short": (
        "lora_train(cfg(), dataset=torch.zeros(20, 16, dtype=torch.long))",
        "*TrainingError: dataset: sequences have 16 tokens, shorter than seq_len=64.",
        "*fix: pass longer sequences, or a smaller seq_len",
    ),
    "dataset-out-of-vocab": (
        "lora_train(cfg(), dataset=torch.full((20, 64), 999))",
        "*TrainingError: dataset: the train split has token ids in [[]999, 999], but the model's vocabulary is*",
        "*fix: tokenize with the model's own tokenizer",
    ),
    "weight-decay-nan": (
        "lora_train(cfg(), steps=2, weight_decay=float('nan'))",
        "*TrainingError: lora_train: weight_decay=nan: must be a finite number >= 0 (e.g. 0.01)",
    ),
    "seed-beyond-64-bits": (
        "lora_train(cfg(), steps=2, seed=2**70)",
        "*TrainingError: lora_train: seed=1180591620717411303424: must be an int in [[]0, 2**63 - 1], as --lora-seed*",
    ),
    "seq-len-over-context": (
        "lora_train(cfg(), seq_len=1024)",
        "*TrainingError: lora_train: seq_len=1024 is longer than the model's context (max_position_embeddings=256).",
        "*fix: seq_len <= 256",
    ),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_or_training_input(lora_pytester: pytest.Pytester, case: str) -> None:
    body, *expected = CONFIG_CASES[case]
    lora_pytester.makepyfile(HEAD + f"def test_user(lora_model, lora_train):\n    {body}\n")
    result = lora_pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(expected)
    out = result.stdout.str()
    assert "INTERNALERROR" not in out and "site-packages/peft" not in out and "site-packages/torch" not in out


def test_run_arguments_are_checked_before_any_step() -> None:
    """Every bad argument in one message, before torch sees a NaN decay or a seed beyond its 64 bits."""
    from pytest_lora.core.errors import TrainingError
    from pytest_lora.model.training import check_run_args

    with pytest.raises(TrainingError) as info:
        check_run_args(steps=2, lr=1e-3, batch_size=2, n_train=8, seed=-1, weight_decay=float("inf"), eval_every=0)
    assert str(info.value) == (
        "lora_train: weight_decay=inf: must be a finite number >= 0 (e.g. 0.01); eval_every=0: must be an int >= 1, "
        "or None (8 evaluations per run); seed=-1: must be an int in [0, 2**63 - 1], as --lora-seed (e.g. 0)"
    )
    with pytest.raises(TrainingError, match=r"seed=True: must be an int"):
        check_run_args(steps=2, lr=1e-3, batch_size=2, n_train=8, seed=True)
    check_run_args(steps=2, lr=1e-3, batch_size=2, n_train=8, seed=2**63 - 1, weight_decay=0.01, eval_every=1)


def _pickled_model(path, cache_dir) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from pytest_lora.model.loading import builtin_model_dir

    model = AutoModelForCausalLM.from_pretrained(builtin_model_dir(cache_dir))
    path.mkdir()
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")


# Found from the path alone: the session stops once, before any test runs (exit 4).
START_CASES = {
    "model-missing": ("./no/such/dir", "--lora-model ./no/such/dir: no such directory"),
    "model-no-config": ("emptydir", "--lora-model emptydir: the directory has no config.json"),
    "model-a-file": ("pyproject.toml", "--lora-model pyproject.toml: is a file, not a model directory"),
    "model-unknown-builtin": ("builtin:nope", "--lora-model builtin:nope: no built-in model of that name"),
}
# Found when loading: each LoRA test errors with the diagnosis.
MODEL_CASES = {
    "model-unknown-architecture": (
        "alien",
        {},
        "*ModelLoadError: --lora-model alien: transformers * does not know this architecture*",
    ),
    "model-pickled-only": ("pickled", {}, "*ModelLoadError: --lora-model pickled: only pickled weights (*.bin) found*"),
    "model-hub-offline": (
        "some-org/some-model",
        {"HF_HUB_OFFLINE": "1"},
        "*ModelLoadError: --lora-model some-org/some-model: a hub id, but HF_HUB_OFFLINE*",
    ),
}


@pytest.fixture
def model_dirs(lora_pytester: pytest.Pytester, lora_session) -> pytest.Pytester:
    root = lora_pytester.path
    (root / "emptydir").mkdir()
    (root / "alien").mkdir()
    (root / "alien" / "config.json").write_text(json.dumps({"model_type": "nosuchmodel"}))
    _pickled_model(root / "pickled", lora_session.settings.cache_dir)
    return lora_pytester


@pytest.mark.parametrize("spelling", ["space", "equals"])
@pytest.mark.parametrize("case", list(START_CASES))
def test_a_model_that_cannot_exist_stops_the_session_once_at_start(
    model_dirs: pytest.Pytester, case: str, spelling: str
) -> None:
    model, expected = START_CASES[case]
    (model_dirs.path / "pyproject.toml").write_text("")
    model_dirs.makepyfile("def test_a(lora_base_model):\n    pass\n\ndef test_b(lora_model):\n    pass\n")
    option = ["--lora-model", model] if spelling == "space" else [f"--lora-model={model}"]
    result = model_dirs.runpytest(*option)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: pytest-lora: {expected}*", "*fix:*"])
    assert result.stderr.str().count(expected) == 1
    assert "Traceback" not in result.stderr.str() + result.stdout.str()
    assert "passed" not in result.stdout.str() and "error" not in result.stdout.str().lower()


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bad_model(model_dirs: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    model, env, expected = MODEL_CASES[case]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    model_dirs.makepyfile("def test_a(lora_base_model):\n    pass\n\ndef test_b(lora_model):\n    pass\n")
    result = model_dirs.runpytest("--lora-model", model)
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines([expected, "*fix:*"])
    assert "Traceback" not in result.stdout.str() and "INTERNALERROR" not in result.stdout.str()


def test_pickled_weights_load_when_the_risk_is_accepted(model_dirs: pytest.Pytester) -> None:
    model_dirs.makepyfile("def test_a(lora_base_model):\n    assert lora_base_model.config.vocab_size == 256\n")
    result = model_dirs.runpytest("--lora-model", "pickled", "--lora-allow-unsafe-pickle")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["lora: allow_unsafe_pickle=ON (pickled checkpoints may run code when loaded)"])


def test_trust_remote_code_is_off_by_default_and_shown_when_on(lora_pytester: pytest.Pytester) -> None:
    lora_pytester.makepyfile("def test_a(lora_settings):\n    assert lora_settings.trust_remote_code is False\n")
    off = lora_pytester.runpytest()
    off.assert_outcomes(passed=1)
    assert "trust_remote_code=ON" not in off.stdout.str()
    lora_pytester.makepyfile("def test_a(lora_settings):\n    assert lora_settings.trust_remote_code is True\n")
    on = lora_pytester.runpytest("--lora-trust-remote-code")
    on.assert_outcomes(passed=1)
    on.stdout.fnmatch_lines(["lora: trust_remote_code=ON (the model's own Python code will run)"])


def test_hub_kernels_stay_off(lora_base_model) -> None:
    """transformers >= 5.25 turns hub kernels on by default (code fetched at run time): pytest-lora loads without."""
    assert lora_base_model.use_kernels is False
    assert getattr(lora_base_model, "_kernels_mode", None) is None


def test_a_model_without_linear_layers_is_refused() -> None:
    import torch
    from peft import LoraConfig

    from pytest_lora import AdapterConfigError
    from pytest_lora.model.adapters import matched_modules

    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LayerNorm(4))
    with pytest.raises(AdapterConfigError, match="Sequential has no linear layers, so a LoRA adapter has nothing"):
        matched_modules(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"r": 0, "lora_alpha": 16}, "r = 0: the rank must be an int >= 1"),
        ({"r": 8, "lora_alpha": -8}, "lora_alpha = -8: must be a finite number > 0"),
        ({"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj'] = 0: must be an int >= 1"),
    ],
)
@pytest.mark.parametrize("check", ["assert_alpha_ratio", "assert_policy", "estimate_lora_parameters"])
def test_an_out_of_range_config_gets_the_message_lora_model_gives_in_every_check(
    lora_base_model, lora_model, check: str, fields: dict, message: str
) -> None:
    """r=0 once raised a ZeroDivisionError and a negative alpha read as "the value for r=-8"."""
    from peft import LoraConfig

    import pytest_lora

    config = LoraConfig(target_modules=["q_proj", "v_proj"], **fields)
    args = (lora_base_model, config) if check == "estimate_lora_parameters" else (config,)
    with pytest.raises(pytest_lora.AdapterConfigError, match=re.escape(message)) as raised:
        getattr(pytest_lora, check)(*args)
    with pytest.raises(pytest_lora.AdapterConfigError) as attached:
        lora_model(config)
    assert str(raised.value) == str(attached.value)
