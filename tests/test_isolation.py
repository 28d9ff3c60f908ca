"""The shared base behaves for every test as if freshly loaded, whatever the tests before it did.

Each leak scenario is a test that changes the shared base the way real tests do (a hook, the QLoRA
recipe by hand, `use_cache`, an in-place write, a forgotten adapter, a merge, a stray
`get_peft_model`), followed by a probe that compares the whole base with a second, fresh load
(tests/_probe.py). In every order, also under pytest-randomly, every probe passes and every leaky
test fails by name with the true diagnosis.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import lora_config

pytestmark = pytest.mark.lora

CONFIG = "from peft import LoraConfig\nCFG = LoraConfig(r=8, lora_alpha=16, target_modules=['q_proj', 'v_proj'])\n"
PROBE = (Path(__file__).parent / "_probe.py").read_text()

# name -> (the leaky test's body, the diagnosis line it must fail with)
LEAKS = {
    "hook": (
        "lora_base_model.model.layers[0].register_forward_hook(lambda *args: None)",
        "*hooks registered on the base were not removed*model.layers.0: 1 forward hook(s) added",
    ),
    "checkpointing": (
        "lora_base_model.gradient_checkpointing_enable()",
        "*gradient checkpointing was switched on*",
    ),
    "kbit_recipe": (
        "from peft import prepare_model_for_kbit_training\n    prepare_model_for_kbit_training(lora_base_model)",
        "*enable_input_require_grads() left its embedding hook*model.embed_tokens: * forward hook(s) added",
    ),
    "use_cache": (
        "lora_base_model.config.use_cache = False",
        "*the model config (or generation config) was changed: config: use_cache = False (was True)",
    ),
    "in_place": (
        "import torch\n    with torch.no_grad():\n        lora_base_model.model.norm.weight.mul_(2)",
        "*base tensors were written in place*model.norm.weight: written in place (1x)",
    ),
    "quant_state": (
        "import torch\n    with torch.no_grad():\n"
        "        lora_base_model.model.layers[0].self_attn.q_proj.weight.quant_state.absmax.mul_(2)",
        "*model.layers.0.self_attn.q_proj.weight.quant_state.absmax: written in place (1x)",
    ),
    "generation_config": (
        "lora_base_model.generation_config.max_new_tokens = 3",
        "*generation_config: max_new_tokens = 3 (was None)",
    ),
    "attach_no_detach": (
        "lora_adapters.attach(CFG)",
        "*an adapter attached with `lora_adapters.attach(config)` was still attached when the test ended",
    ),
    "merge": (
        "lora_model(CFG).merge_adapter()",
        "*merge_adapter() / merge_and_unload() wrote the adapter into the base's weights (8 layer(s)*",
    ),
    "stray_wrap": (
        "from peft import get_peft_model\n    get_peft_model(lora_base_model, CFG)",
        "*PEFT adapter layers were left on the base*",
    ),
}


def _leak_file(order: list[str], golden: list[float]) -> str:
    """Each leak followed by a probe, and a golden-loss test whose verdict must not depend on the order."""
    body = CONFIG + (
        f"\n\ndef test_golden_losses(lora_train):\n"
        f"    assert lora_train(CFG, steps=3, batch_size=4, seq_len=32).losses == {golden!r}\n"
    )
    for i, name in enumerate(order):
        code, _ = LEAKS[name]
        body += (
            f"\n\ndef test_{i:02d}_leak_{name}(lora_base_model, lora_adapters, lora_model, lora_train):\n    {code}\n"
            f"\n\ndef test_{i:02d}_probe_after_{name}(probe):\n    probe()\n"
        )
    return body


@pytest.fixture
def leak_pytester(lora_pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)  # the orders below are the test's to choose
    lora_pytester.makeconftest(PROBE)
    return lora_pytester


@pytest.fixture
def golden(lora_train) -> list[float]:
    """The losses of a short run on the clean base, from the outer session's own base."""
    return lora_train(lora_config(8), steps=3, batch_size=4, seq_len=32).losses


def _assert_each_leak_named(result: pytest.RunResult) -> None:
    result.assert_outcomes(passed=2 * len(LEAKS) + 1, errors=len(LEAKS))
    for name, (_, diagnosis) in LEAKS.items():
        result.stdout.fnmatch_lines([f"*ERROR at teardown of test_*_leak_{name}*", diagnosis])
    errors = [line for line in result.outlines if line.startswith("ERROR ")]
    assert len(errors) == len(LEAKS) and not any("probe" in line for line in errors), errors


@pytest.mark.parametrize("order", ["forward", "reversed"])
def test_each_leak_is_undone_and_named_in_both_orders(
    leak_pytester: pytest.Pytester, golden: list[float], order: str
) -> None:
    names = list(LEAKS) if order == "forward" else list(reversed(LEAKS))
    leak_pytester.makepyfile(_leak_file(names, golden))
    result = leak_pytester.runpytest("-p", "no:randomly")
    _assert_each_leak_named(result)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_each_leak_is_undone_under_random_orders(
    leak_pytester: pytest.Pytester, golden: list[float], seed: int
) -> None:
    pytest.importorskip("pytest_randomly", reason="needs pytest-randomly (the dev extra has it)")
    leak_pytester.makepyfile(_leak_file(list(LEAKS), golden))
    result = leak_pytester.runpytest("-p", "randomly", f"--randomly-seed={seed}")
    _assert_each_leak_named(result)


def test_qlora_recipe_gives_the_same_losses_and_is_undone(lora_session, lora_train) -> None:
    """Gradient checkpointing recomputes activations: same seed, same losses; the base is as before after."""
    manager = lora_session.manager()
    plain = lora_train(lora_config(8), steps=4, batch_size=4, seq_len=32)
    manager.detach()
    checkpointed = lora_train(lora_config(8), steps=4, batch_size=4, seq_len=32, gradient_checkpointing=True)
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-6, abs=1e-6)
    assert checkpointed.val_losses == pytest.approx(plain.val_losses, rel=1e-6, abs=1e-6)
    assert checkpointed.base_unchanged
    manager.detach()
    assert manager.clean.changes(manager.base) == []
    assert not manager.base.is_gradient_checkpointing and manager.base.config.use_cache


def test_qlora_recipe_by_marker_and_legit_changes_pass(leak_pytester: pytest.Pytester) -> None:
    """What fixtures do on purpose (bias and modules_to_save training, train mode, the recipe) is no leak."""
    leak_pytester.makepyfile(
        CONFIG
        + """
import pytest
import torch
from peft import LoraConfig

@pytest.mark.lora(gradient_checkpointing=True)
def test_recipe_by_marker(lora_train):
    seen = []
    model = lora_train(CFG, steps=1, batch_size=4, seq_len=32).model
    assert not model.get_base_model().is_gradient_checkpointing  # undone when the run ended

def test_bias_and_modules_to_save_train(lora_train):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], bias="all", modules_to_save=["lm_head"])
    result = lora_train(cfg, steps=2, batch_size=4, seq_len=32)
    result.model.train()
    assert result.changed_lora

@pytest.fixture(scope="module")
def shared_adapter(lora_adapters):
    with lora_adapters.attached(CFG) as model:
        yield model

def test_a_module_scoped_adapter_is_no_leak(shared_adapter):
    assert shared_adapter.get_nb_trainable_parameters()[0] == 7168

def test_and_survives_into_the_next_test(shared_adapter, lora_base_model):
    assert shared_adapter.get_nb_trainable_parameters()[0] == 7168
    shared_adapter(input_ids=torch.arange(8)[None], output_hidden_states=True, output_attentions=True)
    lora_base_model(input_ids=torch.arange(8)[None], output_hidden_states=True)

def test_with_attached_detaches(lora_adapters, lora_base_model):
    lora_base_model.train()
    with lora_adapters.attached(CFG) as model:
        assert model.get_nb_trainable_parameters()[0] == 7168

def test_probe(probe):
    probe()
"""
    )
    result = leak_pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=6)


@pytest.mark.parametrize(("model", "spelling"), [("tiny-qwen2", "space"), ("tiny-opt", "equals")])
def test_training_a_model_with_4bit_biases_leaves_the_base_clean(
    leak_pytester: pytest.Pytester, model: str, spelling: str
) -> None:
    """bitsandbytes casts a Linear4bit bias to the compute dtype on the first forward: settled at load time."""
    leak_pytester.makepyfile(
        CONFIG
        + """
def test_train(lora_train, lora_base_model):
    assert any(m.bias is not None for m in lora_base_model.modules() if type(m).__name__ == "Linear4bit")
    assert lora_train(CFG, steps=2, batch_size=4, seq_len=32).base_unchanged

def test_train_the_biases_too(lora_train):
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], bias="all")
    result = lora_train(cfg, steps=2, batch_size=4, seq_len=32)
    assert any("bias" in name for name in result.changed_lora)

def test_probe(probe):
    probe()
"""
    )
    option = ["--lora-model", f"builtin:{model}"] if spelling == "space" else [f"--lora-model=builtin:{model}"]
    result = leak_pytester.runpytest("-p", "no:randomly", *option)
    result.assert_outcomes(passed=3)


def test_training_fused_experts_through_target_parameters_is_no_write(leak_pytester: pytest.Pytester) -> None:
    """PEFT parametrizes `target_parameters` for every forward (`set_` of the tensor to itself): their
    version counters move without a write. Training them passes; a real write to them, after training or
    before the adapter is attached, still fails by name."""
    leak_pytester.makepyfile(
        """
import pytest, torch
from peft import LoraConfig
CFG = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=["experts.gate_up_proj"])

def test_train(lora_train):
    assert lora_train(CFG, steps=2, batch_size=4, seq_len=32).base_unchanged

def test_write_after_training(lora_model, lora_train):
    model = lora_model(CFG)
    lora_train(model, steps=2, batch_size=4, seq_len=32)
    with torch.no_grad():
        model.get_base_model().model.layers[1].mlp.experts.get_base_layer().gate_up_proj.mul_(2)

def test_probe(probe):
    probe()

def test_write_then_attach(lora_base_model, lora_model):
    with torch.no_grad():
        lora_base_model.model.layers[1].mlp.experts.gate_up_proj.mul_(2)
    lora_model(CFG)

def test_probe_again(probe):
    probe()
"""
    )
    result = leak_pytester.runpytest("-p", "no:randomly", "--lora-model=builtin:tiny-mixtral")
    result.assert_outcomes(passed=5, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_write_after_training*",
            "*base tensors were written in place*model.layers.1.mlp.experts.gate_up_proj: written in place*",
            "*ERROR at teardown of test_write_then_attach*",
            "*base tensors were written in place*model.layers.1.mlp.experts.gate_up_proj: written in place (1x)*",
        ]
    )
    assert "model.layers.0.mlp.experts" not in result.stdout.str()


# A framework release of the future, simulated: `train()` / `eval()` set an attribute pytest-lora has never seen
# (as transformers 5.25's `_kernels_mode` did), patched in before the inner session loads its base.
FUTURE_TRAIN = """
import transformers

_train = transformers.PreTrainedModel.train


def _future_train(self, mode=True):
    result = _train(self, mode)
    self._future_mode = "training" if mode else "inference"
    return result


@pytest.fixture(scope="session", autouse=True)
def future_upstream():
    transformers.PreTrainedModel.train = _future_train
    yield
    transformers.PreTrainedModel.train = _train
"""


def test_what_a_new_upstream_release_changes_in_normal_use_is_put_back_without_a_report(
    leak_pytester: pytest.Pytester,
) -> None:
    """A `train()` that sets a new attribute, and a parameter re-registered on the same storage (PEFT's
    MultiheadAttention restore), are the frameworks' doing: no test is blamed, and the original objects come
    back. The same attribute set by a test itself is still named."""
    leak_pytester.makeconftest(PROBE + FUTURE_TRAIN)
    leak_pytester.makepyfile(
        CONFIG
        + """
import torch

SEEN = {}

def test_train(lora_train, lora_base_model):
    assert lora_base_model._future_mode == "inference"
    assert lora_train(CFG, steps=2, batch_size=4, seq_len=32).base_unchanged

def test_benchmark(lora_benchmark):
    lora_benchmark(CFG, batch_size=2, seq_len=16, steps_per_round=1, rounds=1, warmup_rounds=0)

def test_train_mode_by_hand(lora_model, lora_base_model):
    lora_model(CFG).train()
    assert lora_base_model._future_mode == "training"

def test_a_parameter_rewrapped_on_its_storage(lora_base_model):
    norm = lora_base_model.model.norm
    SEEN["weight"] = weight = norm.weight
    del norm.weight
    norm.register_parameter("weight", torch.nn.Parameter(weight.data, requires_grad=weight.requires_grad))
    assert norm.weight is not weight

def test_the_original_objects_are_back(lora_base_model):
    assert lora_base_model.model.norm.weight is SEEN["weight"]
    assert lora_base_model._future_mode == "inference"

def test_probe(probe):
    probe()

def test_the_same_attribute_set_by_a_test_is_named(lora_base_model):
    lora_base_model.model.layers[0]._future_mode = "mine"

def test_probe_again(probe):
    probe()
"""
    )
    result = leak_pytester.runpytest("-p", "no:randomly", "--benchmark-disable")
    result.assert_outcomes(passed=8, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_the_same_attribute_set_by_a_test_is_named*",
            "*attributes of base modules were changed: model.layers.0: attribute '_future_mode' added",
        ]
    )
    errors = [line for line in result.outlines if line.startswith("ERROR ")]
    assert len(errors) == 1 and "test_the_same_attribute_set_by_a_test_is_named" in errors[0], errors
