"""Counting on every model family of the zoo: the same numbers as PEFT, and the same refusals.

For each family and each kind of config a team writes (its q/v-style targets, all-linear, PEFT's default
targets, rank/alpha patterns, layers_to_transform, DoRA, modules_to_save, the bias modes), the static
estimate from the config alone (meta device) and the count of the real 4-bit model must equal PEFT's
`get_nb_trainable_parameters()`, and where PEFT refuses a config, pytest-lora refuses it too, with its
own message. The 4-bit models are loaded once per session.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
from peft import LoraConfig, get_peft_model

from pytest_lora import assert_adapter_shapes, count_parameters, estimate_memory
from pytest_lora.core.errors import AdapterConfigError
from pytest_lora.core.flops import step_flops
from pytest_lora.model.estimate import estimate_lora_parameters, meta_model
from pytest_lora.model.shapes import model_shape
from pytest_lora.model.zoo import ZOO, ZOO_NAMES, builtin_model_dir

# Each family's attention targets as its users write them, and its output head.
QV = {
    "tiny-llama": ["q_proj", "v_proj"],
    "tiny-qwen2": ["q_proj", "v_proj"],
    "tiny-mistral": ["q_proj", "v_proj"],
    "tiny-phi3": ["qkv_proj"],
    "tiny-gemma2": ["q_proj", "v_proj"],
    "tiny-gpt2": ["c_attn"],
    "tiny-opt": ["q_proj", "v_proj"],
    "tiny-falcon": ["query_key_value"],
    "tiny-mixtral": ["q_proj", "v_proj"],
    "tiny-t5": ["q", "v"],
    "tiny-bert-cls": ["query", "value"],
}
HEAD = {name: "classifier" if name == "tiny-bert-cls" else "lm_head" for name in ZOO_NAMES}
TASK = {"tiny-t5": "SEQ_2_SEQ_LM", "tiny-bert-cls": "SEQ_CLS"}


def variants(name: str) -> dict[str, dict[str, Any]]:
    """The configs of the matrix for one family (LoraConfig fields besides r, alpha and dropout)."""
    qv = QV[name]
    return {
        "qv": {"target_modules": qv},
        "all-linear": {"target_modules": "all-linear"},
        "default-targets": {"target_modules": None},
        "patterns": {"target_modules": qv, "rank_pattern": {qv[0]: 4}, "alpha_pattern": {qv[0]: 32}},
        "layers": {"target_modules": qv, "layers_to_transform": [1]},
        "dora": {"target_modules": qv, "use_dora": True},
        "modules_to_save": {"target_modules": qv, "modules_to_save": [HEAD[name]]},
        "bias-all": {"target_modules": qv, "bias": "all"},
        "bias-lora_only": {"target_modules": qv, "bias": "lora_only"},
        "task": {"target_modules": "all-linear", "task_type": TASK.get(name, "CAUSAL_LM")},
        "all-linear-dropout": {"target_modules": "all-linear", "lora_dropout": 0.05},
        **({"router": {"target_modules": ["gate"]}} if name == "tiny-mixtral" else {}),
    }


CASES = [(name, variant) for name in ZOO_NAMES for variant in variants(name)]


def lora(name: str, variant: str) -> LoraConfig:
    fields = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, **variants(name)[variant]}
    return LoraConfig(**fields)


def peft_attach(model: Any, config: LoraConfig) -> Any:
    """PEFT's own get_peft_model (`model` is wrapped in place), or the exception it raises."""
    meta = next(model.parameters()).is_meta
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return get_peft_model(model, copy.deepcopy(config), low_cpu_mem_usage=meta)
    except (ValueError, TypeError, RuntimeError) as exc:
        return exc


@pytest.mark.parametrize(("name", "variant"), CASES, ids=[f"{n}-{v}" for n, v in CASES])
def test_estimate_from_config_equals_peft_or_refuses_with_it(name: str, variant: str) -> None:
    """From config.json fields alone, on the meta device: PEFT's count, or a refusal where PEFT refuses."""
    config = ZOO[name].config
    peft_model = peft_attach(meta_model(config), lora(name, variant))
    if isinstance(peft_model, Exception):
        with pytest.raises(AdapterConfigError, match=r"(?s)fix:"):
            estimate_lora_parameters(config, lora(name, variant))
        return
    count = estimate_lora_parameters(config, lora(name, variant))
    assert (count.trainable, count.total) == peft_model.get_nb_trainable_parameters()


@pytest.fixture(scope="session")
def four_bit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Each family's checkpoint loaded once, in 4-bit (nf4, double quant, bf16 compute), by its own class.

    T5 and the BERT classifier are loaded through their architecture class directly (the plugin's
    loader takes causal LMs), with the same BitsAndBytesConfig.
    """
    import torch
    import transformers

    from pytest_lora.model.loading import prepare_base
    from pytest_lora.model.quiet import silence_bitsandbytes_kernel_notice
    from pytest_lora.model.zoo import quiet_progress

    silence_bitsandbytes_kernel_notice()
    cache = tmp_path_factory.getbasetemp() / "lora-model-cache"
    quant = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
    models = {}
    with quiet_progress():
        for name in ZOO_NAMES:
            cls = getattr(transformers, ZOO[name].architecture)
            model = cls.from_pretrained(builtin_model_dir(cache, name), quantization_config=quant, dtype=torch.bfloat16)
            prepare_base(model)
            models[name] = model
    return models


FOUR_BIT_VARIANTS = ("qv", "all-linear", "default-targets", "patterns", "dora", "modules_to_save", "bias-all", "task")
FOUR_BIT_CASES = [(name, variant) for name in ZOO_NAMES for variant in FOUR_BIT_VARIANTS]


@pytest.mark.parametrize(("name", "variant"), FOUR_BIT_CASES, ids=[f"{n}-{v}" for n, v in FOUR_BIT_CASES])
def test_4bit_model_counts_equal_peft_and_the_config_estimate(four_bit, name: str, variant: str) -> None:
    """On the loaded 4-bit model (a copy, so that the session's stays clean): count_parameters == PEFT == the
    estimate from the model == from config.json; the adapters have the shapes the config asks for; memory and
    FLOPs read the same adapters from the config and from the attached model (q/v and all-linear). Where PEFT
    refuses the config on the 4-bit model, pytest-lora refuses it too."""
    base = four_bit[name]
    config = lora(name, variant)
    peft_model = peft_attach(copy.deepcopy(base), config)
    if isinstance(peft_model, Exception):
        with pytest.raises(AdapterConfigError, match=r"(?s)fix:"):
            estimate_lora_parameters(base, config)
        return
    count = count_parameters(peft_model)
    assert (count.trainable, count.total) == peft_model.get_nb_trainable_parameters()
    assert estimate_lora_parameters(base, config) == count
    assert estimate_lora_parameters(ZOO[name].config, config) == count
    assert_adapter_shapes(peft_model)
    if variant in ("qv", "all-linear"):  # the layer kinds (Conv1D, FalconLinear, fused experts) differ here only
        planned = estimate_memory(base, config, batch_size=2, seq_len=16)
        assert estimate_memory(peft_model, batch_size=2, seq_len=16).lora_params == planned.lora_params > 0
        attached = step_flops(model_shape(peft_model), 16, batch_size=2)
        assert attached == step_flops(model_shape(base, config), 16, batch_size=2)


REFUSALS = {
    "dropout on the fused experts": (
        "tiny-mixtral",
        {"target_modules": "all-linear", "lora_dropout": 0.05},
        r"lora_dropout = 0\.05: PEFT refuses this on the parameters it adapts directly \(gate\.weight, "
        r"experts\.gate_up_proj, experts\.down_proj\)(?s:.*)fix: lora_dropout=0\.0, or target only linear layers",
    ),
    "DoRA on the fused experts": ("tiny-mixtral", {"target_modules": ["w2"], "use_dora": True}, r"use_dora = True"),
    "default targets on Mixtral": (
        "tiny-mixtral",
        {"target_modules": None},
        r"target_modules = None on a mixtral model: PEFT rewrites MoE configs(?s:.*)fix: name the targets",
    ),
    "w1 without w3": ("tiny-mixtral", {"target_modules": ["w1"]}, r"without also targeting w3(?s:.*)fix: target both"),
    "default targets on Phi-3": ("tiny-phi3", {"target_modules": None}, r"no default targets for model_type 'phi3'"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_peft_refusals_are_pytest_lora_errors_with_a_fix(case: str) -> None:
    """PEFT raises (a bare ValueError inside get_peft_model); pytest-lora refuses first, naming the cause and fix."""
    name, fields, message = REFUSALS[case]
    config = LoraConfig(r=8, lora_alpha=16, **fields)
    assert isinstance(peft_attach(meta_model(ZOO[name].config), config), ValueError)
    with pytest.raises(AdapterConfigError, match=message):
        estimate_lora_parameters(ZOO[name].config, config)


def test_mixtral_router_and_experts_are_counted_as_peft_counts_them() -> None:
    """`["gate"]` is the router (PEFT adapts its weight as a parameter), and all-linear on a Mixtral-8x7B shape
    adds the experts: 359,665,664 trainable at r=16, where the attention projections alone are 13,631,488."""
    config = ZOO["tiny-mixtral"].config
    router = estimate_lora_parameters(config, LoraConfig(r=8, target_modules=["gate"]))
    assert router.trainable == 2 * 8 * (64 + 4)  # 2 layers x r x (hidden + experts)
    mixtral_8x7b = {
        **config,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "vocab_size": 32000,
    }
    attention = 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024))
    experts = 32 * 8 * (4096 + 2 * 14336) + 16 * 8 * (14336 + 4096)  # gate_up_proj at 2r (w1 + w3), down_proj
    router = 16 * (4096 + 8)
    count = estimate_lora_parameters(mixtral_8x7b, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    assert count.trainable == 32 * (attention + experts + router) == 359_665_664
    assert 32 * attention == 13_631_488


def test_folded_expert_weights_kept_for_backward_are_in_the_memory_estimate() -> None:
    """PEFT folds B @ A into each adapted expert stack on every forward, and autograd keeps the folded copy for
    backward: the saved tensors of a real step hold exactly one copy per adapted stack and layer, as estimated
    (a router's folded copy is estimated too, but is as small as an activation here: not told apart)."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from pytest_lora.core.memory import folded_weight_bytes

    fields = {k: v for k, v in ZOO["tiny-mixtral"].config.items() if k not in ("architectures", "model_type")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = MixtralForCausalLM(MixtralConfig(**fields)).to(torch.bfloat16)
    model = peft_attach(base, LoraConfig(r=8, target_modules="all-linear"))
    shape = model_shape(model)
    folded = [linear for linear in shape.adapted if linear.folded]
    stacks = {linear.experts * linear.in_features * linear.out_features * 2 for linear in folded if linear.experts > 1}
    routers = sum(linear.in_features * linear.out_features * 2 for linear in folded if linear.experts == 1)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters and storage.nbytes() in stacks:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens = torch.randint(0, 256, (2, 16))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model(input_ids=tokens, labels=tokens)
    assert sum(saved.values()) == folded_weight_bytes(shape, gradient_checkpointing=False) - routers > 0
