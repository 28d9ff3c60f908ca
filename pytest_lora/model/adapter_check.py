"""The policy check of an adapter config file or a saved adapter, statically: no weight is loaded.

The base model is built on the meta device from its config.json, the config is attached there by
PEFT itself, and the same assertions as in a training test judge it (rank, alpha ratio, dropout,
targets, parameter budget). A saved adapter's tensors are compared with its config from the
safetensors header alone; a planned resume is compared with the rank the adapter was saved at.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from pytest_lora.core.errors import AdapterConfigError, LoraAssertionError
from pytest_lora.core.policy import Policy
from pytest_lora.model.adapter_files import AdapterFiles, lora_config, read_adapter, safetensors_header, saved_shapes
from pytest_lora.model.adapters import matched_modules
from pytest_lora.model.assertions import assert_policy
from pytest_lora.model.counting import LoraModuleShape, ParamCount, count_parameters
from pytest_lora.model.estimate import attach_on_meta, meta_model, module_features, rank_setting
from pytest_lora.model.quiet import silence_bitsandbytes_kernel_notice
from pytest_lora.model.target_parameters import as_peft_sees_it, parameter_targets

_SHOWN = 5  # modules listed per problem before "... and N more"
_FIXED_SHAPES = (
    "  adapter shapes are fixed when the adapter is created: loading these tensors with another rank fails with "
    "'size mismatch for lora_A' (peft #276, #1710)."
)


@dataclass(frozen=True)
class CheckResult:
    """A passed check: what was read, the count PEFT would report, and notes that are not failures."""

    files: AdapterFiles
    count: ParamCount | None
    notes: list[str] = field(default_factory=list)


def check_adapter(
    path: str | os.PathLike[str],
    policy: Policy,
    base: Any,
    *,
    base_label: str | None = None,
    resume_rank: int | None = None,
    resume_source: str = "resume_rank",
    trust_remote_code: bool = False,
) -> CheckResult:
    """Check one adapter directory or config file against `policy` on the meta-device `base`.

    `base` is anything `estimate.meta_model` takes. Raises AdapterConfigError when the file cannot be
    read as a LoraConfig, LoraAssertionError listing every violation (file, key, value, fix) otherwise.
    """
    __tracebackhide__ = True
    silence_bitsandbytes_kernel_notice()  # importing PEFT imports bitsandbytes
    files = read_adapter(path)
    config = lora_config(files.fields, str(files.config_file))
    model = meta_model(base, trust_remote_code=trust_remote_code)
    problems: list[str] = []
    try:
        targeted = matched_modules(model, config)
    except AdapterConfigError as exc:
        targeted = None
        problems.append(str(exc))
    saved = saved_shapes(safetensors_header(files.weights)) if files.weights else None
    if saved is not None:
        problems += _tensor_problems(files, config, saved, model, targeted)
    if resume_rank is not None:
        problems += _resume_problems(resume_rank, resume_source, files, config, saved)
    adapted = None
    if targeted is not None:
        try:
            adapted = attach_on_meta(model, config)
        except AdapterConfigError as exc:
            problems.append(str(exc))
    try:
        assert_policy(adapted if adapted is not None else config, policy)
    except LoraAssertionError as exc:
        problems.append(str(exc))
    except (TypeError, ValueError):
        if not problems:  # only values already reported as invalid (r = "8") can break the comparisons
            raise
    if problems:
        label = base_label or str(base)
        lines = [
            f"{files.path} violates the LoRA policy ({policy.source}); "
            f"checked on base model {label}, built on the meta device (no weights loaded):",
        ]
        lines += [f"  - {problem}".replace("\n", "\n    ") for problem in problems]
        raise LoraAssertionError("\n".join(lines))
    notes = []
    if files.pickled is not None:
        notes.append(
            f"{files.pickled}: pickled weights, not read (unpickling can run arbitrary code); only "
            f"{files.config_file.name} was checked.\n  fix: save the adapter as safetensors "
            "(save_pretrained(..., safe_serialization=True), the default)"
        )
    return CheckResult(files=files, count=count_parameters(adapted) if adapted is not None else None, notes=notes)


def _tensor_problems(
    files: AdapterFiles, config: Any, saved: list[LoraModuleShape], model: Any, targeted: list[str] | None
) -> list[str]:
    """The saved tensors against the config (rank per module) and against the base (features, module names)."""
    weights = files.weights.name if files.weights else "weights"
    if not saved:
        return [f"{weights}: holds no lora_A / lora_B tensors, so it is not a LoRA adapter's weights"]
    modules = dict(model.named_modules())
    problems = []
    off_rank = []
    fused = _fused_adapters(model, config, targeted) if targeted is not None else {}
    for owner, pairs in fused.items():
        got = sorted((s.r, s.in_features, s.out_features) for s in saved if s.name.replace(".base_layer", "") == owner)
        if got != pairs:
            off_rank.append(
                f"{owner}: saved as (rows, in, out) {got}, {files.config_file.name} makes {pairs} "
                "(rows = rank x experts, one pair per adapted parameter)"
            )
    saved = [shape for shape in saved if shape.name.replace(".base_layer", "") not in fused]
    for shape in saved:
        key, want = rank_setting(config, shape.name)
        if shape.r != want:
            off_rank.append(f"{shape.name}: saved at rank {shape.r}, {files.config_file.name} says {key} = {want}")
    if off_rank:
        problems.append(
            "\n".join(
                [
                    f"{weights}: {len(off_rank)} module(s) saved at another rank than the config's",
                    *_listed(off_rank),
                    _FIXED_SHAPES,
                    "  fix: set r / rank_pattern back to the saved ranks to resume this adapter; to train at the new "
                    "rank, retrain from scratch (do not resume this checkpoint with a new rank)",
                ]
            )
        )
    foreign = []
    for shape in saved:
        module = modules.get(shape.name)
        features = module_features(module) if module is not None else None
        if module is None:
            foreign.append(f"{shape.name}: no such module in the base model")
        elif features is not None and (shape.in_features, shape.out_features) != features:
            foreign.append(
                f"{shape.name}: saved for in/out features {shape.in_features}/{shape.out_features}, "
                f"the base has {features[0]}/{features[1]}"
            )
    if foreign:
        problems.append(
            "\n".join(
                [
                    f"{weights}: {len(foreign)} module(s) do not fit the base model",
                    *_listed(foreign),
                    "  the adapter was trained on another base model (or another size of it).\n"
                    "  fix: check base_model in the policy against the adapter's base_model_name_or_path",
                ]
            )
        )
    if targeted is not None:
        names = {shape.name for shape in saved}
        missing = [name for name in targeted if name not in names]
        if missing:
            problems.append(
                "\n".join(
                    [
                        f"{weights}: no tensors for {len(missing)} of the {len(targeted)} module(s) the config targets",
                        *_listed(missing),
                        "  fix: the config's target_modules changed after saving; restore them, or retrain",
                    ]
                )
            )
    return problems


def _fused_adapters(model: Any, config: Any, targeted: list[str]) -> dict[str, list[tuple[int, int, int]]]:
    """Per module, the (rows, in, out) of the adapters PEFT puts on its parameters (fused MoE experts).

    PEFT nests one ParamWrapper per parameter (`experts`, `experts.base_layer`), in an order the saved names do
    not tell, so a module's saved adapters are compared as a whole.
    """
    expected: dict[str, list[tuple[int, int, int]]] = {}
    for shape in parameter_targets(model, as_peft_sees_it(model, config), targeted):
        owner = shape.name.rsplit(".", 1)[0]
        expected.setdefault(owner, []).append((shape.r * shape.experts, shape.in_features, shape.out_features))
    return {owner: sorted(pairs) for owner, pairs in expected.items()}


def _resume_problems(
    resume_rank: int, source: str, files: AdapterFiles, config: Any, saved: list[LoraModuleShape] | None
) -> list[str]:
    """A planned resume at `resume_rank` against the rank the adapter was saved at."""
    if resume_rank == config.r:
        return []
    evidence = f"{files.config_file.name} r = {config.r}"
    if saved:
        ranks = sorted({shape.r for shape in saved})
        evidence += f"; tensors saved at rank {', '.join(map(str, ranks))}"
    return [
        f"planned resume at r = {resume_rank} ({source}), but this adapter was saved at r = {config.r} ({evidence})\n"
        f"{_FIXED_SHAPES}\n"
        f"  fix: resume at r = {config.r}; to train at r = {resume_rank}, reload the base fresh and retrain from "
        "scratch (epoch 0), scaling lora_alpha with the rank"
    ]


def _listed(lines: list[str]) -> list[str]:
    shown = [f"    {line}" for line in lines[:_SHOWN]]
    if len(lines) > _SHOWN:
        shown.append(f"    ... and {len(lines) - _SHOWN} more")
    return shown
