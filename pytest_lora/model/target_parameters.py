"""PEFT's `target_parameters`: LoRA on bare parameters, such as the fused MoE experts of transformers 5.

transformers 5 stores a Mixtral layer's experts as two 3-D parameters (`experts.gate_up_proj`,
`experts.down_proj`), and its router is no longer an `nn.Linear`. Before attaching, PEFT 0.21 rewrites a
config written for the old layout (`convert_peft_config_for_transformers`): the expert and router names
become `target_parameters`, w1 + w3 (fused into gate_up_proj) get twice the rank and alpha, and
"all-linear" takes all of them. Each targeted parameter is wrapped by a `ParamWrapper` holding one
(r x in, out x r) pair per expert, which refuses dropout, DoRA, lora_bias and fan_in_fan_out.

Here the same rewrite runs on a copy of the config and the same shape rules give each adapter, so counts,
shapes, FLOPs and memory include the experts, and PEFT's refusals become AdapterConfigErrors with a fix
before anything is attached. torch, transformers and PEFT are imported inside the functions.
"""

from __future__ import annotations

import copy
from collections.abc import Collection
from typing import Any

from pytest_lora.core.errors import AdapterConfigError
from pytest_lora.model.counting import LoraModuleShape

# What PEFT's ParamWrapper refuses (peft/tuners/lora/layer.py), as (field, the value it needs).
_WRAPPER_NEEDS = (
    ("lora_dropout", 0.0),
    ("use_dora", False),
    ("lora_bias", False),
    ("fan_in_fan_out", False),
    ("velora_config", None),
    ("kasa_config", None),
)
_EXAMPLE_MODULES = "['q_proj', 'k_proj', 'v_proj', 'o_proj']"


def as_peft_sees_it(model: Any, config: Any) -> Any:
    """The config PEFT will attach to `model`: its transformers-5 MoE rewrite applied to a copy.

    Models whose layout did not change get `config` itself back. A rewrite PEFT would refuse, or one that
    leaves nothing to adapt (PEFT then fails without naming the cause), raises AdapterConfigError.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not _rewritten(model_type):
        return config
    from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers

    seen = copy.deepcopy(config)
    try:
        convert_peft_config_for_transformers(seen, model=model, conversions=None)
    except ValueError as exc:
        raise AdapterConfigError(
            f"LoraConfig.target_modules = {_show(config.target_modules)} on a {model_type} model: {exc}\n"
            "  transformers 5 stores these experts as one fused parameter, and PEFT adapts it whole.\n"
            "  fix: target both names that are fused together, or neither"
        ) from None
    if not seen.target_modules and not seen.target_parameters:
        raise AdapterConfigError(
            f"LoraConfig.target_modules = None on a {model_type} model: PEFT rewrites MoE configs for "
            "transformers 5 before it fills in its default targets, so None selects nothing and get_peft_model "
            "fails.\n"
            f"  fix: name the targets, e.g. target_modules={_EXAMPLE_MODULES}, or 'all-linear' (which also adapts "
            "the experts and the router, with lora_dropout=0)"
        )
    return seen


def _rewritten(model_type: str | None) -> bool:
    """Whether PEFT rewrites configs for this model type (a cheap test before copying the config)."""
    if model_type is None:
        return False
    from peft.utils.transformers_weight_conversion import _MODEL_TO_CONVERSION_PATTERN
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    return model_type in _MODEL_TO_CONVERSION_PATTERN and get_checkpoint_conversion_mapping(model_type) is not None


def parameter_targets(model: Any, config: Any, modules: Collection[str] = ()) -> list[LoraModuleShape]:
    """The parameters `config` (as PEFT sees it) adapts, with the shapes PEFT gives their adapters.

    Matching is PEFT's: a parameter's full name equals an entry or ends with `.entry`; layers_to_transform and
    exclude_modules do not apply to parameters. `modules` (the modules the config adapts) may not own a
    targeted parameter. Raises AdapterConfigError for what PEFT refuses (dropout, DoRA, ... on a
    ParamWrapper) and for an entry that matches no parameter.
    """
    entries = sorted(getattr(config, "target_parameters", None) or ())
    if not entries:
        return []
    from peft.utils.other import get_pattern_key

    found: list[LoraModuleShape] = []
    hits: set[str] = set()
    for module_name, module in model.named_modules():
        owner = module_name.replace(".base_layer", "")
        for param_name, param in module.named_parameters(recurse=False):
            key = f"{owner}.{param_name}"
            entry = next((e for e in entries if key == e or key.endswith(f".{e}")), None)
            if entry is None:
                continue
            hits.add(entry)
            if owner in modules:
                raise AdapterConfigError(
                    f"LoraConfig targets {owner!r} both as a module (target_modules) and through its parameter "
                    f"{key!r} (target_parameters): PEFT cannot wrap a parameter of an adapted layer.\n"
                    "  fix: drop one of the two"
                )
            experts, in_features, out_features = _wrapper_features(module, param, key)
            rank_key = get_pattern_key(list(config.rank_pattern or {}), key)
            r = (config.rank_pattern or {}).get(rank_key, config.r)
            found.append(LoraModuleShape(key, in_features, out_features, r, experts=experts))
    missing = [e for e in entries if e not in hits]
    if missing:
        raise AdapterConfigError(
            f"LoraConfig.target_parameters entry {missing[0]!r} matches no parameter of this model.\n"
            "  PEFT only warns when some other target matches, so the adapter would silently train less.\n"
            "  fix: use a parameter's name or its dotted suffix, e.g. 'mlp.experts.gate_up_proj'"
        )
    refused = [(name, need) for name, need in _WRAPPER_NEEDS if getattr(config, name, need) != need]
    if refused:
        settings = ", ".join(f"{name} = {_show(getattr(config, name))}" for name, _ in refused)
        needed = ", ".join(f"{name}={_show(need)}" for name, need in refused)
        shown = ", ".join(dict.fromkeys(".".join(shape.name.split(".")[-2:]) for shape in found))
        raise AdapterConfigError(
            f"LoraConfig {settings}: PEFT refuses this on the parameters it adapts directly ({shown}): its "
            "ParamWrapper raises ValueError ('lora.ParamWrapper does not work with ...').\n"
            "  on a transformers-5 MoE model the fused experts and the router are such parameters: 'all-linear' "
            "and their old names (w1, w2, w3, gate, ...) target them\n"
            f"  fix: {needed}, or target only linear layers, e.g. target_modules={_EXAMPLE_MODULES}"
        )
    return found


def _wrapper_features(module: Any, param: Any, key: str) -> tuple[int, int, int]:
    """(experts, in, out) as PEFT's ParamWrapper reads them: 2-D is (out, in); 3-D is (experts, out, in),
    or (experts, in, out) when the owning module says `is_transposed`."""
    shape = tuple(int(n) for n in param.shape)
    if len(shape) == 2:
        return 1, shape[1], shape[0]
    if len(shape) == 3:
        experts, first, second = shape
        return (experts, first, second) if getattr(module, "is_transposed", False) else (experts, second, first)
    raise AdapterConfigError(
        f"LoraConfig.target_parameters matches {key!r}, a {len(shape)}-D parameter {list(shape)}: PEFT adapts only "
        "2-D and 3-D parameters.\n  fix: target another parameter, or the module that holds it"
    )


def _show(value: Any) -> str:
    if isinstance(value, (set, frozenset)):
        value = sorted(value)
    return repr(value)
