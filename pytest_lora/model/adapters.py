"""Attaching LoRA adapters to the shared base model, and putting the base back exactly.

The base model is loaded once per session and shared by every test, so an adapter that
outlives its test, a base weight a test trained, or a stray `get_peft_model` in a user's
test would leak into every later test. The manager attaches one adapter at a time,
validates its config against the real module names first (PEFT only complains when
*nothing* matches), and restores the base on detach: same module objects, same tensors,
same `requires_grad` and train/eval flags.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import math
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pytest_lora.core.errors import AdapterConfigError, BaseModelModifiedError
from pytest_lora.core.values import is_int, is_real
from pytest_lora.model.base_state import BaseState, Change, explain
from pytest_lora.model.loading import check_task_type
from pytest_lora.model.quiet import library_warnings_silenced

_BIAS_MODES = ("none", "all", "lora_only")
# Inits that leave the base untouched and need no data: others (PiSSA, OLoRA, CorDA, LoftQ, EVA, ...)
# rewrite the base weights at attach time, which a shared base cannot survive.
_SHARED_BASE_INITS = (True, False, "gaussian")
# Submodules that PEFT adds inside an adapted layer: never targets themselves.
_INTERNAL = re.compile(r"\.(lora_[A-Za-z_]+|base_layer|modules_to_save|original_module)(\.|$)")


def as_lora_config(config: Any) -> Any:
    """Accept a `LoraConfig` or a mapping of its fields (e.g. from TOML), with r, alpha, dropout and the
    patterns in range: every consumer (counts, ratios, estimates) divides by them."""
    from peft import LoraConfig

    if isinstance(config, Mapping):
        try:
            config = LoraConfig(**config)
        except (TypeError, ValueError) as exc:  # an unknown field; a combination PEFT refuses (its reason is all)
            raise AdapterConfigError(f"LoraConfig({dict(config)!r}): {exc}") from None
    elif not isinstance(config, LoraConfig):
        raise AdapterConfigError(f"expected a peft.LoraConfig or a dict of its fields, got {type(config).__name__}")
    _raise_problems(_value_problems(config))
    return config


def linear_types() -> tuple[type, ...]:
    """What PEFT's "all-linear" selects, by type as PEFT tests it: `nn.Linear` and its subclasses
    (bitsandbytes' Linear4bit / Linear8bitLt, FalconLinear, ...) and transformers' `Conv1D` (GPT-2)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, Conv1D)


def lora_layer_types() -> tuple[type, ...]:
    """What PEFT's LoRA can wrap (its dispatch tests these with isinstance, so subclasses such as Gemma-2's
    scaled word embedding count); matching anything else (a norm, a whole block) fails deep inside PEFT."""
    import torch

    nn = torch.nn
    return (*linear_types(), nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)


def base_layer(module: Any) -> Any:
    """The layer a PEFT wrapper stands for (a LoRA layer's base, a modules_to_save original); else the module."""
    if hasattr(module, "get_base_layer"):
        return module.get_base_layer()
    return getattr(module, "original_module", module)


def linear_module_names(model: Any) -> dict[str, list[str]]:
    """Linear layers by their last name component (`q_proj` -> full names): what targets can match.

    On a model carrying adapters, an adapted layer counts by the layer it wraps.
    """
    kinds = linear_types()
    found: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if name and isinstance(base_layer(module), kinds) and not _INTERNAL.search(name):
            found.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    return found


def _raise_problems(problems: list[str]) -> None:
    if problems:
        raise AdapterConfigError("invalid LoraConfig:\n  " + "\n  ".join(problems))


def _value_problems(config: Any) -> list[str]:
    """r, lora_alpha, lora_dropout and the rank / alpha patterns out of range."""
    problems = []
    r = config.r
    if not is_int(r) or r <= 0:
        problems.append(f"r = {r!r}: the rank must be an int >= 1 (typical: 4, 8, 16)")
    alpha = config.lora_alpha
    if not is_real(alpha) or not 0 < alpha < math.inf:
        problems.append(f"lora_alpha = {alpha!r}: must be a finite number > 0 (the usual heuristic is 2 * r)")
    dropout = config.lora_dropout
    if not is_real(dropout) or not 0 <= dropout < 1:
        problems.append(f"lora_dropout = {dropout!r}: must be in [0, 1) (typical: 0.05 - 0.1)")
    for key, value in (config.rank_pattern or {}).items():
        if not is_int(value) or value <= 0:
            problems.append(f"rank_pattern[{key!r}] = {value!r}: must be an int >= 1")
    for key, value in (config.alpha_pattern or {}).items():
        if not is_real(value) or not value > 0:
            problems.append(f"alpha_pattern[{key!r}] = {value!r}: must be > 0")
    return problems


def _check_values(config: Any) -> None:
    """The value checks, and what an adapter on a shared base needs: targets, bias, init, pattern keys."""
    problems = _value_problems(config)
    targets = config.target_modules
    if targets is not None and not isinstance(targets, str):
        if len(targets) == 0 and not getattr(config, "target_parameters", None):
            problems.append("target_modules = []: empty, so no module would be adapted (e.g. ['q_proj', 'v_proj'])")
        problems += [
            f"target_modules entry {t!r}: must be a module name (str)" for t in targets if not isinstance(t, str)
        ]
    if config.bias not in _BIAS_MODES:
        problems.append(f"bias = {config.bias!r}: must be one of {', '.join(map(repr, _BIAS_MODES))}")
    init = config.init_lora_weights
    if init not in _SHARED_BASE_INITS:
        reason = (
            "it rewrites the base weights (or needs data / a 16-bit base): a base shared by every test cannot allow it"
            if isinstance(init, str)
            else "not an init PEFT knows"
        )
        problems.append(
            f"init_lora_weights = {init!r}: {reason}; use True (PEFT's default), False or 'gaussian' "
            "(test data-driven inits such as PiSSA or OLoRA on a model loaded by hand)"
        )
    for field_name in ("rank_pattern", "alpha_pattern"):
        for key in getattr(config, field_name) or {}:
            try:
                re.compile(key)
            except (re.error, TypeError) as exc:
                problems.append(f"{field_name} key {key!r}: not a valid regular expression ({exc})")
    _raise_problems(problems)


def _matcher(config: Any, entry: str | None) -> Any:
    """PEFT's own test of whether a module name is adapted, for the whole config or one target entry."""
    from peft.tuners.tuners_utils import check_target_module_exists

    probe = copy.copy(config)
    if entry is not None:
        probe.target_modules = {entry}

    def matches(key: str) -> bool:
        found = check_target_module_exists(probe, key)
        return bool(found) and type(found).__name__ != "_ExcludedModule"

    return matches


def matched_modules(model: Any, config: Any) -> list[str]:
    """Full names of the modules `config` adapts, by PEFT's own matching rule.

    Every `target_modules` entry and every `rank_pattern` / `alpha_pattern` key must match at
    least one module: PEFT accepts a list with one typo as long as another entry matches. The config is
    read as PEFT will attach it (on a transformers-5 MoE model, the fused experts and the router move to
    `target_parameters`: see `target_parameters.py`), and what PEFT refuses there is refused here.
    """
    from pytest_lora.model.target_parameters import as_peft_sees_it, parameter_targets

    _check_values(config)
    config = as_peft_sees_it(model, config)
    linear = linear_module_names(model)
    if not linear:
        raise AdapterConfigError(
            f"{type(model).__name__} has no linear layers, so a LoRA adapter has nothing to attach to.\n"
            "  fix: load a model with nn.Linear / bitsandbytes Linear4bit layers"
        )
    keys = [name for name, _ in model.named_modules() if name]
    targets = config.target_modules
    if targets is None:
        targets = _default_targets(model)
    if isinstance(targets, str) and targets.lower() == "all-linear":
        from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

        # PEFT's own selection: every linear layer but the output head (or a classifier head under SEQ_CLS)
        selected: Any = _maybe_include_all_linear_layers(copy.copy(config), model)
        names = sorted(selected.target_modules)
        probe = copy.copy(config)
        probe.target_modules = set(names)
        matches = _matcher(probe, None)
        matched = dict.fromkeys(k for k in names if matches(k))
        if not matched:
            raise AdapterConfigError(_selection_message("target_modules", "all-linear", config, linear))
    else:
        entries = [targets] if isinstance(targets, str) else sorted(targets)
        matched = {}
        for entry in entries:
            matches = _matcher(config, None if isinstance(targets, str) else entry)
            hits = [k for k in keys if matches(k)]
            if not hits:
                raise AdapterConfigError(_no_match_message("target_modules", entry, config, linear, keys))
            matched.update(dict.fromkeys(hits))
    kinds = lora_layer_types()
    unsupported = [k for k in matched if not isinstance(base_layer(model.get_submodule(k)), kinds)]
    if unsupported:
        raise AdapterConfigError(_unsupported_message(model, unsupported[0], linear))
    adapted = [*matched, *(shape.name for shape in parameter_targets(model, config, matched))]
    for field_name in ("rank_pattern", "alpha_pattern"):
        for key in getattr(config, field_name) or {}:
            if not any(re.match(rf"(.*\.)?({key})$", name) for name in adapted):
                raise AdapterConfigError(_no_match_message(field_name, key, config, linear, adapted))
    _check_trainable_copies(model, config)
    return list(matched)


def _check_trainable_copies(model: Any, config: Any) -> None:
    """PEFT trains a copy of each `modules_to_save` module (and of a classifier head under SEQ_CLS /
    TOKEN_CLS); a quantized one cannot train, and PEFT fails with a bare RuntimeError."""
    names = list(config.modules_to_save or [])
    if getattr(config.task_type, "value", config.task_type) in ("SEQ_CLS", "TOKEN_CLS"):
        names += ["classifier", "score"]  # what PEFT's PeftModelFor{Sequence,Token}Classification adds
    if not names:
        return
    for key, module in model.named_modules():
        if not any(key.endswith(name) for name in names):  # PEFT's own rule (_set_trainable)
            continue
        packed = {type(p).__name__ for p in module.parameters() if type(p).__name__ in ("Params4bit", "Int8Params")}
        if packed:
            leaf = key.rsplit(".", 1)[-1]
            raise AdapterConfigError(
                f"LoraConfig makes {key!r} ({type(module).__name__}) fully trainable (modules_to_save, or the "
                "classifier head of a classification task), but its weights are quantized "
                f"({', '.join(sorted(packed))}): PEFT fails with 'only Tensors of floating point dtype can require "
                "gradients'.\n"
                f"  fix: keep it unquantized when loading (BitsAndBytesConfig(llm_int8_skip_modules=[{leaf!r}])), "
                "or leave it out of modules_to_save"
            )


def _unsupported_message(model: Any, name: str, linear: Mapping[str, list[str]]) -> str:
    """A target that is no layer LoRA can wrap: its linear layers, or its own weight as a parameter target."""
    module = model.get_submodule(name)
    weight = getattr(module, "weight", None)
    leaf = name.rsplit(".", 1)[-1]
    own = (
        f", or adapt its weight directly with target_parameters=['{leaf}.weight'] (and {leaf!r} out of target_modules)"
        if getattr(weight, "ndim", 0) in (2, 3) and not list(module.children())
        else ""
    )
    return (
        f"LoraConfig.target_modules matches {name!r}, a {type(module).__name__}: LoRA can only wrap linear, "
        f"embedding, convolution or attention layers.\n  linear modules: {', '.join(linear)}\n"
        f"  fix: target the linear layers inside it (e.g. 'gate_proj' rather than 'mlp'){own}"
    )


def _default_targets(model: Any) -> list[str]:
    """PEFT's per-architecture default `target_modules`, used when a config leaves it None."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in defaults:
        raise AdapterConfigError(
            f"LoraConfig.target_modules is None and PEFT has no default targets for model_type {model_type!r}.\n"
            "  fix: set target_modules explicitly, e.g. ['q_proj', 'v_proj'] or 'all-linear'"
        )
    return list(defaults[model_type])


def _no_match_message(
    field_name: str, entry: str, config: Any, linear: Mapping[str, list[str]], candidates: list[str]
) -> str:
    """Why an entry selects nothing: a typo, a real module the config does not target, or a filter."""
    exists = any(k == entry or k.endswith(f".{entry}") for group in linear.values() for k in group)
    if exists and field_name != "target_modules":
        return (
            f"LoraConfig.{field_name} entry {entry!r} names a module this config does not adapt, so it has no "
            f"effect.\n  adapted modules: {_short_names(candidates)}\n"
            f"  fix: add {entry!r} to target_modules, or drop it from {field_name}"
        )
    if exists:
        return _selection_message(field_name, entry, config, linear)
    close = difflib.get_close_matches(entry.rsplit(".", 1)[-1], list(linear), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    example = next(iter(linear.values()))[0]
    return (
        f"LoraConfig.{field_name} entry {entry!r} matches no module of this model.{hint}\n"
        f"  linear modules: {', '.join(linear)}\n"
        f"  (full names look like {example!r})\n"
        "  PEFT itself only fails when no entry matches at all, so a typo here would silently train fewer modules.\n"
        "  fix: use one of the names above"
    )


def _selection_message(field_name: str, entry: str, config: Any, linear: Mapping[str, list[str]]) -> str:
    """The entry names real modules, but layers_to_transform / exclude_modules filter all of them out."""
    layers = getattr(config, "layers_to_transform", None)
    excluded = getattr(config, "exclude_modules", None)
    n_layers = len({k.split(".layers.")[1].split(".")[0] for g in linear.values() for k in g if ".layers." in k})
    return (
        f"LoraConfig.{field_name} entry {entry!r} names modules of this model, but "
        f"layers_to_transform = {layers!r} / exclude_modules = {excluded!r} leave none of them.\n"
        f"  the model has {n_layers} layers (indices 0 .. {n_layers - 1})\n"
        "  fix: pick layer indices that exist, or exclude fewer modules"
    )


def _short_names(names: list[str]) -> str:
    return ", ".join(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names)) or "(none)"


def weights_digest(model: Any) -> str:
    """SHA-256 of every parameter and buffer, 4-bit quantization constants included."""
    digest = hashlib.sha256()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(name.encode())
        _update(digest, tensor)
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            for key, value in sorted(state.as_dict(packed=True).items()):
                digest.update(key.encode())
                _update(digest, value)
    return digest.hexdigest()


def parametrized_targets(model: Any) -> list[Any]:
    """The base tensors PEFT adapts through `target_parameters` (its ParamWrapper layers).

    PEFT parametrizes them for every forward and back, and torch's parametrize does `set_` of the
    tensor to itself: their version counter moves with no write, so only their bytes can tell.
    """
    import torch

    return [
        param
        for module in model.modules()
        if isinstance(name := getattr(module, "parameter_name", None), str)
        and isinstance(param := getattr(module.get_base_layer(), name, None), torch.Tensor)
    ]


def tensor_digest(tensor: Any) -> str:
    """SHA-256 of one tensor's bytes."""
    digest = hashlib.sha256()
    _update(digest, tensor)
    return digest.hexdigest()


def _update(digest: Any, tensor: Any) -> None:
    digest.update(tensor.detach().cpu().contiguous().view(-1).view(dtype=_byte_dtype()).numpy().tobytes())


def _byte_dtype() -> Any:
    import torch

    return torch.uint8


def strip_adapters(model: Any) -> int:
    """Replace every PEFT layer and wrapper by the module it wraps; return how many were removed.

    Used on every detach (exact, unlike `PeftModel.unload()`), and as the repair when a test left
    adapters behind (a stray `get_peft_model`): the next test gets the base as loaded.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    wrappers = (BaseTunerLayer, AuxiliaryTrainingWrapper)
    removed = 0
    while True:
        outermost: list[tuple[str, Any]] = []
        for name, module in model.named_modules():
            if name and isinstance(module, wrappers) and not any(name.startswith(f"{o}.") for o, _ in outermost):
                outermost.append((name, module))
        if not outermost:
            break
        for name, module in outermost:  # stacked adapters unwrap one level per pass
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            inner = module.original_module if isinstance(module, AuxiliaryTrainingWrapper) else module.get_base_layer()
            setattr(parent, child, inner)
        removed += len(outermost)
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in vars(model):
            delattr(model, attr)
    return removed


_UNSEEN_WRITE = Change(
    "in-place",
    "weights",
    "their hash changed with no version-counter bump (a write through `param.data`), found by --lora-verify-base",
)


@dataclass
class _Attachment:
    peft_model: Any
    adapted: list[str]  # the base's module names the adapter wraps
    # Base parameters PEFT made trainable (bias, modules_to_save), with a copy of their loaded values. By
    # object, not name: a name seen through the adapter ("q_proj.base_layer.bias") is gone once it is removed.
    saved_base_params: list[tuple[Any, Any]] = field(default_factory=list)
    owner: object = None  # who detaches it: a fixture's token, or None for direct `attach()` calls
    # Base parameters adapted through `target_parameters` (see `parametrized_targets`), with a digest of
    # their loaded bytes: detaching checks the bytes instead of the version counter.
    parametrized: list[tuple[Any, str]] = field(default_factory=list)


class AdapterManager:
    """One adapter at a time on a shared base, and the guard that keeps the base as loaded.

    `detach` undoes what attaching and training did (adapter layers, trained `modules_to_save` /
    bias weights, flags). `check` runs after every test: whatever else the test left on the base
    (hooks, checkpointing, config, casts, merges, in-place writes, a forgotten adapter) is put
    back, or the weights are reloaded through `reload`, and the test fails with the diagnosis.
    """

    def __init__(
        self, base: Any, seed: int = 0, reload: Callable[[], Any] | None = None, verify_weights: bool = False
    ) -> None:
        self.base = base
        self.seed = seed
        self._reload = reload
        self.clean = BaseState.take(base)
        # Writes through `param.data` bypass torch's version counter: only hashing the weights sees them.
        self._digest = weights_digest(base) if verify_weights else None
        self._active: _Attachment | None = None
        self._merged: list[str] = []  # adapted layers that were merged when their adapter was detached

    @property
    def active(self) -> Any | None:
        return self._active.peft_model if self._active else None

    @library_warnings_silenced()
    def attach(self, config: Any, seed: int | None = None, owner: object = None) -> Any:
        """Validate `config` against the base, detach any previous adapter, attach, return the PeftModel.

        The adapter's random init (lora_A) is seeded (default: the manager's seed), so the same
        config gives the same model. `owner` is the fixture that detaches it at teardown; a direct
        call (None) must detach it itself, or the end-of-test check reports the leak.
        """
        import torch
        from peft import get_peft_model

        config = as_lora_config(config)
        self.detach()
        self._refuse_foreign_adapters()
        adapted = matched_modules(self.base, config)
        check_task_type(self.base, config)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed if seed is None else seed)
                peft_model = get_peft_model(self.base, copy.deepcopy(config))
        except BaseException:
            self.clean.restore(self.base)  # PEFT may have wrapped part of the base before failing
            raise
        saved = [
            (param, param.detach().clone())
            for name, param in self.base.named_parameters()
            if param.requires_grad and "lora_" not in name and "modules_to_save" not in name
        ]
        # Only a tensor unwritten since the clean snapshot may be vouched for by its bytes now.
        parametrized = [(p, tensor_digest(p)) for p in parametrized_targets(peft_model) if self.clean.unwritten(p)]
        self._active = _Attachment(peft_model, adapted, saved, owner, parametrized)
        return peft_model

    def detach(self, owner: object = None) -> None:
        """Remove the active adapter, if any, and undo what it and its training did to the base.

        With `owner`, only an adapter that owner attached: a fixture's teardown never hides an
        adapter the test attached directly and forgot.
        """
        import torch
        from peft.tuners.tuners_utils import BaseTunerLayer

        attachment = self._active
        if attachment is None or (owner is not None and attachment.owner is not owner):
            return
        self._active = None
        merged = [
            name for name, module in self.base.named_modules() if isinstance(module, BaseTunerLayer) and module.merged
        ]
        # merge_and_unload() leaves no adapter layer behind, only the adapted layers' new weights.
        merged += [name for name in attachment.adapted if self._weight_rewritten(name)]
        self._merged = list(dict.fromkeys([*self._merged, *merged]))
        # Not PeftModel.unload(): for modules_to_save it swaps in the *trained* copy, which would
        # leak one test's training into the next. Putting back the wrapped originals is exact.
        strip_adapters(self.base)
        with torch.no_grad():
            for param, saved in attachment.saved_base_params:
                param.copy_(saved)
        self.clean.accept(param for param, digest in attachment.parametrized if tensor_digest(param) == digest)
        self._restore_own_flags([param for param, _ in attachment.saved_base_params])

    def _weight_rewritten(self, name: str) -> bool:
        saved = self.clean.modules.get(name)
        if saved is None or "weight" not in saved.attrs.get("_parameters", {}):
            return False
        weight = saved.tensors["_parameters.weight"]
        return vars(saved.obj)["_parameters"].get("weight") is not weight.obj or weight.alias._version != weight.version

    def _restore_own_flags(self, trained: list[Any]) -> None:
        """requires_grad of what PEFT unfroze (bias, modules_to_save) and train/eval modes, as loaded."""
        self.clean.accept(trained)
        for param in trained:
            param.requires_grad_(False)
            param.grad = None
        self.clean.restore_framework()

    def _refuse_foreign_adapters(self) -> None:
        """A `get_peft_model` on the base earlier in this test would stack under the new adapter."""
        changes = [c for c in self.clean.changes(self.base) if c.kind == "adapter"]
        if changes:
            self.clean.restore(self.base)
            raise BaseModelModifiedError(explain(changes, when="before attaching a new adapter"))

    @contextmanager
    def attached(self, config: Any) -> Iterator[Any]:
        """`with manager.attached(config) as model:` for code (e.g. Hypothesis examples, or a module-scoped
        fixture sharing one adapter between tests) without function-scoped fixtures."""
        owner = object()
        model = self.attach(config, owner=owner)
        try:
            yield model
        finally:
            self.detach(owner)

    def assert_clean(self, when: str) -> None:
        """Fail, after putting the base back, when it is not exactly as loaded (no adapter may be active).

        An adapter held by a `with attached(...)` block (a wider-scoped fixture) is not a leak: the check
        waits until the block releases it. One from a bare `attach()` is.
        """
        if self._active is not None and self._active.owner is not None:
            return
        leaked = self._active is not None
        self.detach()
        changes = self.clean.changes(self.base)
        merged, self._merged = self._merged, []
        self.clean.restore_framework()
        if self._digest is not None and not changes and weights_digest(self.base) != self._digest:
            changes = [_UNSEEN_WRITE]
        if not (changes or leaked or merged):
            return
        reload = bool(self.clean.restore(self.base)) or any(change.kind == "in-place" for change in changes)
        if reload:
            self._reload_weights()
        raise BaseModelModifiedError(explain(changes, when=when, leaked=leaked, merged=merged, reloaded=reload))

    def _reload_weights(self) -> None:
        """Weights written in place cannot be undone from the snapshot: load them again, into the same modules.

        The module objects stay (tests and fixtures hold references to the base); everything else
        they hold (parameters, buffers, quantization state, flags, config) becomes the fresh load's,
        and the clean state is taken anew.
        """
        if self._reload is None:
            raise BaseModelModifiedError(
                "base tensors were written in place and this base has no way to reload them.\n"
                "  fix: never write to the base's tensors; clone first"
            )
        fresh = dict(self._reload().named_modules())
        for name, saved in self.clean.modules.items():
            state = vars(saved.obj)
            children = state["_modules"]
            state.clear()
            state.update(vars(fresh[name]), _modules=children)
        self.clean = BaseState.take(self.base)
        if self._digest is not None:
            self._digest = weights_digest(self.base)
