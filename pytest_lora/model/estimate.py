"""LoRA parameter counts from a config alone: the base is built on the meta device, no weights read.

Checking a config before a production run should not need the 14 GB of a 7B model (or the 140 GB
of a 70B one). A meta-device model has every module with its real shape and no storage, so the
adapted modules, their in/out features and the base's total size are exact. The LoRA parameters
are then summed from those shapes, with PEFT's own target matching (`adapters.matched_modules`),
instead of instantiating PEFT layers: several times faster on large models, and the same count.
Configs using a feature the shape rule does not cover are counted by PEFT itself, on the meta model.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from pytest_lora.core.errors import AdapterConfigError, ModelLoadError
from pytest_lora.model.adapters import as_lora_config, matched_modules
from pytest_lora.model.counting import LoraModuleShape, ParamCount, count_parameters
from pytest_lora.model.quiet import library_warnings_silenced, silence_bitsandbytes_kernel_notice

# LoraConfig fields the shape rule accounts for; any other field away from its default is counted by PEFT.
_SHAPE_RULE_FIELDS = frozenset(
    {
        "task_type",
        "peft_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "r",
        "target_modules",
        "exclude_modules",
        "lora_alpha",
        "lora_dropout",
        "fan_in_fan_out",
        "bias",
        "use_rslora",
        "init_lora_weights",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "use_dora",
        "lora_bias",
        "megatron_core",
        "runtime_config",
        "qalora_group_size",
        "target_parameters",
    }
)
# Task types whose PeftModel class adds no trainable modules of its own (classification heads do).
_PLAIN_TASKS = (None, "CAUSAL_LM", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION")


def base_config(base: Any, *, trust_remote_code: bool = False) -> Any:
    """A transformers `PretrainedConfig` from a config, a mapping of config.json fields, a directory or a hub id.

    Only config.json is read (a hub id downloads that file alone), never weights.
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(base, PretrainedConfig):
        return base
    if isinstance(base, Mapping):
        fields_ = {k: v for k, v in base.items() if k != "architectures"}
        model_type = fields_.pop("model_type", None)
        if model_type is None:
            raise ModelLoadError(
                f"base config {sorted(base)!r} has no model_type, so its architecture is unknown.\n"
                "  fix: add model_type (e.g. 'llama'), or pass a transformers PretrainedConfig"
            )
        config = AutoConfig.for_model(model_type, **fields_)
        config.architectures = base.get("architectures")
        return config
    if isinstance(base, (str, os.PathLike)):
        location = os.fspath(base)
        try:
            return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(
                f"base model {location}: cannot read its config.json ({first}).\n"
                "  fix: give a directory holding config.json, a hub id (only config.json is downloaded), "
                "or a transformers PretrainedConfig"
            ) from exc
    raise ModelLoadError(
        f"base {type(base).__name__}: expected a transformers PretrainedConfig, a mapping of config.json fields, "
        "a model directory, a hub id or a model"
    )


def meta_model(base: Any, *, trust_remote_code: bool = False) -> Any:
    """The base model's architecture on the meta device: every module at its real shape, no memory for weights.

    The class is the config's first `architectures` entry, else a causal LM, a seq2seq LM or the bare model.
    """
    import torch
    import transformers

    config = base_config(base, trust_remote_code=trust_remote_code)
    named = _named_class(base, config)
    kwargs = {"trust_remote_code": trust_remote_code}
    with torch.device("meta"):
        if named is not None:
            return named(config)
        for auto in ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModel"):
            try:
                return getattr(transformers, auto).from_config(config, **kwargs)
            except ValueError:
                continue
    raise ModelLoadError(
        f"base model of type {config.model_type!r}: transformers {transformers.__version__} has no model class "
        "for it.\n  fix: set `architectures` in config.json, or pass the model itself"
    )


def _named_class(base: Any, config: Any) -> Any:
    """The model class `architectures[0]` names in transformers; None when it names none there (remote code, a
    newer release: the auto classes decide). Only a model class is ever called, never another attribute of the
    package, so `"architectures": ["pipeline"]` cannot make a config check run a pipeline."""
    import transformers

    architectures = getattr(config, "architectures", None) or []
    if not architectures:
        return None
    name = architectures[0]
    found = getattr(transformers, name, None) if isinstance(name, str) else None
    if found is None and isinstance(name, str):
        return None
    if isinstance(found, type) and issubclass(found, transformers.PreTrainedModel):
        return found
    where = f"base model {os.fspath(base)}: config.json" if isinstance(base, (str, os.PathLike)) else "base config:"
    if found is None:
        what = f"is {type(name).__name__}, not a class name"
    else:
        kind = "a class, but not a PreTrainedModel" if isinstance(found, type) else f"a {type(found).__name__}"
        what = f"names transformers.{name}, {kind}"
    raise ModelLoadError(
        f"{where} architectures[0] = {name!r} {what}: it cannot build the model.\n"
        '  fix: set architectures to the model\'s class, e.g. ["LlamaForCausalLM"], or remove the key'
    )


def _uses_only_shape_rule(config: Any) -> bool:
    from peft import LoraConfig

    defaults = LoraConfig()
    for field in fields(config):
        if field.name not in _SHAPE_RULE_FIELDS and getattr(config, field.name) != getattr(defaults, field.name):
            return False
    task = getattr(config.task_type, "value", config.task_type)
    return task in _PLAIN_TASKS and config.bias in ("none", "all")


def module_features(module: Any) -> tuple[int, int] | None:
    """Logical (in, out) features of a module LoRA can adapt by shape alone; None for other kinds.

    By type, as PEFT dispatches (subclasses such as FalconLinear included). A 4-bit weight's storage
    shape is packed, so linear layers answer from in/out_features; GPT-2's Conv1D stores its weight
    transposed, (in, out), which is what PEFT reads (`fan_in_fan_out`).
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        rows, cols = module.weight.shape
        return int(rows), int(cols)
    if isinstance(module, torch.nn.Linear):
        return int(module.in_features), int(module.out_features)
    if isinstance(module, torch.nn.Embedding):
        return int(module.num_embeddings), int(module.embedding_dim)
    return None


def planned_shapes(model: Any, config: Any) -> list[LoraModuleShape] | None:
    """The LoRA adapters `config` would create on `model`: name, logical in/out features, rank.

    The parameters PEFT adapts directly (`target_parameters`: the fused experts and router of a
    transformers-5 MoE model) come last, one adapter pair per expert. Validates the config either way;
    None when a matched module is of a kind the shape rule does not cover (e.g. a convolution).
    """
    from pytest_lora.model.target_parameters import as_peft_sees_it, parameter_targets

    names = matched_modules(model, config)
    shapes = []
    for name in names:
        features = module_features(model.get_submodule(name))
        if features is None:
            return None
        r = rank_setting(config, name)[1]
        shapes.append(LoraModuleShape(name, in_features=features[0], out_features=features[1], r=r))
    return shapes + parameter_targets(model, as_peft_sees_it(model, config), names)


def rank_setting(config: Any, name: str) -> tuple[str, int]:
    """The config key and rank PEFT uses for module `name`: its `rank_pattern` entry (PEFT's own lookup), else r."""
    if config.rank_pattern:
        from peft.utils.other import get_pattern_key

        key = get_pattern_key(list(config.rank_pattern), name)
        if key in config.rank_pattern:
            return f"rank_pattern[{key!r}]", config.rank_pattern[key]
    return "r", config.r


@library_warnings_silenced()
def attach_on_meta(model: Any, config: Any) -> Any:
    """`get_peft_model` on a meta-device base: real PEFT layers, no memory for any weight.

    `model` must be on the meta device already (see `meta_model`); it is wrapped in place.
    """
    from peft import get_peft_model

    config = copy.deepcopy(as_lora_config(config))
    config.inference_mode = False  # a saved adapter_config.json says true; the question is training
    config.base_model_name_or_path = None  # PEFT warns when it differs from the (meta) model's name
    try:
        return get_peft_model(model, config, low_cpu_mem_usage=True)
    except (ValueError, TypeError, NotImplementedError, RuntimeError) as exc:
        raise AdapterConfigError(f"PEFT cannot attach this LoraConfig to the model: {exc}") from exc


def _fresh_meta(base: Any, model: Any, trust_remote_code: bool) -> Any:
    """A meta model PEFT may wrap: the one built here, or a new one from a given model's config."""
    if model is not base:
        return model
    config = getattr(base, "config", None)
    if config is None:
        raise AdapterConfigError(
            f"this LoraConfig uses a feature counted by PEFT itself, which needs a transformers model, and "
            f"{type(base).__name__} has no `config`.\n  fix: pass the model's transformers config instead"
        )
    return meta_model(config, trust_remote_code=trust_remote_code)


def estimate_lora_parameters(base: Any, config: Any, *, trust_remote_code: bool = False) -> ParamCount:
    """Trainable and total parameters after `get_peft_model(base, config)`, without loading any weight.

    `base`: a transformers `PretrainedConfig`, a mapping of config.json fields, a local directory or hub id
    with a config.json, or a model (a real one is only read, never wrapped). `config`: a `LoraConfig` or
    a mapping of its fields. The total counts every weight unpacked (as a 16-bit model; a 4-bit one
    counts the same), adapters included, exactly as PEFT's `get_nb_trainable_parameters()` does.

    >>> estimate_lora_parameters("meta-llama/Llama-2-7b-hf", {"r": 8, "target_modules": ["q_proj", "v_proj"]})
    ParamCount(trainable=4194304, total=6742609920)
    """
    silence_bitsandbytes_kernel_notice()  # importing PEFT imports bitsandbytes
    config = as_lora_config(config)
    is_model = hasattr(base, "named_modules")
    if is_model and getattr(base, "peft_config", None):
        raise AdapterConfigError(
            f"{type(base).__name__} already carries LoRA adapters, so its count is not the base's.\n"
            "  fix: pass the base model (or its config) without adapters"
        )
    model = base if is_model else meta_model(base, trust_remote_code=trust_remote_code)
    shapes = planned_shapes(model, config)  # also validates what PEFT itself would count or refuse
    if shapes is None or not _uses_only_shape_rule(config):
        return count_parameters(attach_on_meta(_fresh_meta(base, model, trust_remote_code), config))
    adapters = sum(s.parameters for s in shapes)
    if config.use_dora:  # one magnitude per output feature
        adapters += sum(s.out_features for s in shapes)
    if config.lora_bias:  # lora_B gets a bias
        adapters += sum(s.out_features for s in shapes)
    base_count = count_parameters(model)
    biases = 0
    if config.bias == "all":  # PEFT trains every bias of the base too
        biases = sum(int(p.numel()) for n, p in model.named_parameters() if n == "bias" or n.endswith(".bias"))
    return ParamCount(trainable=adapters + biases, total=base_count.total + adapters)
