"""The whole state of a shared base model, taken once and compared after every test.

A base loaded once per session is only a fair judge if every test sees it as freshly loaded.
Weights are not the only thing a test can leave behind: hooks, gradient checkpointing flags,
config attributes (`use_cache`), `requires_grad`, a `.data` cast (what
`prepare_model_for_kbit_training` does), a merged adapter, an in-place write. `BaseState`
records, per module, every instance attribute (hook dicts and the child / parameter / buffer
dicts by content) and, per tensor, an alias sharing its storage and version counter: torch
bumps `_version` on every in-place write, so `mul_` is caught without hashing a byte.

Restoring is exact where the original objects still exist (hooks, flags, attributes, replaced
tensors); a tensor written in place cannot be restored from the snapshot, and the caller reloads.

What the frameworks themselves change is not a test's doing: the attributes `train()` / `eval()` set
(`training`, and whatever a release adds, such as transformers 5.25's `_kernels_mode`) are learned by
switching the model both ways at snapshot time, put back without blame; a parameter re-registered on the
same storage (PEFT's `nn.Parameter(weight.data)`) is the same weight, put back without blame.
torch is never imported here at module level: only objects the caller passes in are touched.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Attributes that describe gradient checkpointing (transformers sets them on every decoder layer).
_CHECKPOINTING_ATTRS = ("gradient_checkpointing", "_gradient_checkpointing_func")
# `enable_input_require_grads()` keeps its hook handle here (transformers) and registers a forward hook.
_INPUT_GRADS_ATTRS = ("_require_grads_hook", "_require_grads_hooks")
# What `get_peft_model` leaves on the model it wraps.
_PEFT_ATTRS = ("peft_config", "_hf_peft_config_loaded")
_STRUCTURE = {"_modules": "module", "_parameters": "parameter", "_buffers": "buffer"}
_GLOBAL = "torch.nn (global module hooks)"
# Module attributes holding settings objects whose attributes a test may change in place.
_CONFIG_ATTRS = ("config", "generation_config")


@dataclass(frozen=True)
class Change:
    """One way the base differs from its clean state: what kind, where, and the detail."""

    kind: str  # one of EXPLAINED's keys
    where: str
    detail: str

    def __str__(self) -> str:
        return f"{self.where}: {self.detail}"


@dataclass
class _Tensor:
    obj: Any  # the Parameter / buffer object itself
    alias: Any  # `obj.detach()` at snapshot time: same storage, same version counter
    version: int
    requires_grad: bool

    @classmethod
    def of(cls, tensor: Any) -> _Tensor:
        return cls(tensor, tensor.detach(), tensor._version, bool(tensor.requires_grad))

    def data_replaced(self) -> bool:
        obj, alias = self.obj, self.alias
        return obj.data_ptr() != alias.data_ptr() or obj.dtype != alias.dtype or obj.shape != alias.shape

    def unchanged(self) -> bool:
        return (
            self.alias._version == self.version
            and self.obj.requires_grad == self.requires_grad
            and not self.data_replaced()
        )


@dataclass
class _Module:
    obj: Any
    attrs: dict[str, Any]  # shallow copy of vars(module), dict values copied by content
    tensors: dict[str, _Tensor]
    cls: type = object  # the module's class: a parametrization swaps it for a generated subclass
    # The fast path: after every test, one C-level tuple comparison per module instead of a loop.
    plain_keys: tuple[str, ...] = ()
    dict_keys: tuple[str, ...] = ()
    # The attributes `train()` / `eval()` set on this module (see `_mode_attributes`): not a test's doing.
    mode_keys: frozenset[str] = frozenset({"training"})

    def __post_init__(self) -> None:
        self.plain_keys = tuple(k for k, v in self.attrs.items() if not isinstance(v, dict) and k not in self.mode_keys)
        self.dict_keys = tuple(k for k, v in self.attrs.items() if isinstance(v, dict))
        self._plain = tuple(map(self.attrs.__getitem__, self.plain_keys))
        self._dicts = tuple(map(self.attrs.__getitem__, self.dict_keys))

    def unchanged(self) -> bool:
        """True when nothing differs; False means "look closer" (the slow path names what changed)."""
        now = vars(self.obj)
        try:
            same = (
                (now.keys() == self.attrs.keys() or (now.keys() ^ self.attrs.keys()) <= self.mode_keys)
                and tuple(map(now.__getitem__, self.plain_keys)) == self._plain
                and tuple(map(now.__getitem__, self.dict_keys)) == self._dicts
            )
        except Exception:  # a non-identical tensor value compares elementwise: not the same
            return False
        return same and type(self.obj) is self.cls and all(t.unchanged() for t in self.tensors.values())


@dataclass
class BaseState:
    """Snapshot of a model's modules, tensors, config and the global module hooks."""

    modules: dict[str, _Module]
    # Every config object the modules hold (the model's, T5's encoder/decoder stacks', generation_config),
    # by label, with a deep copy of its attributes.
    configs: dict[str, tuple[Any, dict[str, Any]]]
    global_hooks: dict[str, dict[Any, Any]] = field(default_factory=dict)

    @classmethod
    def take(cls, model: Any) -> BaseState:
        modules = {}
        configs: dict[str, tuple[Any, dict[str, Any]]] = {}
        seen: set[int] = set()
        mode_keys = _mode_attributes(model)
        for name, module in model.named_modules():
            attrs = {k: copy.copy(v) if isinstance(v, dict) else v for k, v in vars(module).items()}
            tensors = {}
            for kind in ("_parameters", "_buffers"):
                for key, tensor in vars(module)[kind].items():
                    if tensor is not None:
                        tensors[f"{kind}.{key}"] = _Tensor.of(tensor)
                        tensors.update(_quant_state_tensors(f"{kind}.{key}", tensor))
            modules[name] = _Module(module, attrs, tensors, type(module), mode_keys=mode_keys[id(module)])
            for attr in _CONFIG_ATTRS:
                value = vars(module).get(attr)
                if value is not None and id(value) not in seen and hasattr(value, "to_dict"):
                    seen.add(id(value))
                    configs[f"{name}.{attr}" if name else attr] = (value, copy.deepcopy(vars(value)))
        return cls(modules, configs, {k: dict(v) for k, v in _global_hooks().items()})

    # -- comparing ---------------------------------------------------------------------------------

    def changes(self, model: Any) -> list[Change]:
        """Every difference from the snapshot but the frameworks' own (`restore_framework` puts those back)."""
        import torch

        found: list[Change] = []
        # bitsandbytes' Params4bit routes every attribute read through __torch_function__: skip that.
        with torch._C.DisableTorchFunctionSubclass():
            for name, saved in self.modules.items():
                if not saved.unchanged():
                    found += _module_changes(name or type(model).__name__, saved)
        if any(c.kind == "input-grads" for c in found):
            found = _hooks_of_input_grads(model, found)
        for label, (config, saved_vars) in self.configs.items():
            found += _config_changes(label, config, saved_vars)
        for key, saved_hooks in self.global_hooks.items():
            if not _same_dict(saved_hooks, _global_hooks()[key]):
                found.append(Change("hook", _GLOBAL, f"{key} changed (torch.nn.modules.module.register_module_*)"))
        return found

    def written(self) -> list[str]:
        """Tensors written in place since the snapshot: the snapshot cannot undo those."""
        return [
            f"{name}.{key.split('.', 1)[1]}" if name else key.split(".", 1)[1]
            for name, saved in self.modules.items()
            for key, tensor in saved.tensors.items()
            if tensor.alias._version != tensor.version
        ]

    # -- restoring ---------------------------------------------------------------------------------

    def restore(self, model: Any) -> list[str]:
        """Put back everything the snapshot holds; return the tensors written in place (not restorable)."""
        for saved in self.modules.values():
            _restore_module(saved)
        for config, saved_vars in self.configs.values():
            live = vars(config)
            live.clear()
            live.update(copy.deepcopy(saved_vars))
        for key, saved_hooks in self.global_hooks.items():
            _refill(_global_hooks()[key], saved_hooks)
        return self.written()

    def restore_framework(self) -> None:
        """Put back, without blame, what the frameworks change in normal use: train/eval modes with every
        attribute `train()` / `eval()` set (`model.train()` on an adapter is normal use, not a leak), and the
        original parameter objects where one was re-registered on the same storage."""
        for saved in self.modules.values():
            live = vars(saved.obj)
            for key in saved.mode_keys:
                if key in saved.attrs:
                    live[key] = saved.attrs[key]
                else:
                    live.pop(key, None)
            for kind in ("_parameters", "_buffers"):
                held, now = saved.attrs.get(kind), live.get(kind)
                if held is not None and isinstance(now, dict) and not _same_dict(held, now):
                    for key, obj in held.items():
                        if key in now and now[key] is not obj and _same_entry(obj, now[key]):
                            now[key] = obj

    def unwritten(self, obj: Any) -> bool:
        """The tensor is one of the snapshot's and has not been written in place since."""
        return any(
            tensor.obj is obj and tensor.alias._version == tensor.version
            for saved in self.modules.values()
            for tensor in saved.tensors.values()
        )

    def accept(self, tensors: Iterable[Any]) -> None:
        """Take the current version of these tensors as clean (after a restore by copy)."""
        wanted = {id(t) for t in tensors}
        for saved in self.modules.values():
            for tensor in saved.tensors.values():
                if id(tensor.obj) in wanted:
                    tensor.version = tensor.alias._version


def _mode_attributes(model: Any) -> dict[int, frozenset[str]]:
    """Per module (by id), the attributes that `model.train()` and `model.eval()` set: `training`, and any a
    framework release adds (transformers 5.25's `_kernels_mode`). Learned by switching the model both ways;
    every module's attributes are then put back as they were, the same objects."""
    modules = list(model.modules())
    before = [dict(vars(module)) for module in modules]
    touched: list[set[str]] = [{"training"} for _ in modules]
    try:
        for mode in (True, False):
            model.train(mode)
            for keys, module, saved in zip(touched, modules, before, strict=True):
                now = vars(module)
                keys.update(
                    key
                    for key in now.keys() | saved.keys()
                    if not isinstance(saved.get(key, now.get(key)), dict)
                    and (key not in now or key not in saved or not _same_value(now[key], saved[key]))
                )
    finally:
        for module, saved in zip(modules, before, strict=True):
            live = vars(module)
            live.clear()
            live.update(saved)
    return {id(module): frozenset(keys) for module, keys in zip(modules, touched, strict=True)}


def _quant_state_tensors(key: str, tensor: Any) -> dict[str, _Tensor]:
    """A 4-bit weight's quantization constants (absmax, code, nested ones): written in place, they change
    every output as surely as the packed weight does."""
    found = {}
    state = getattr(tensor, "quant_state", None)
    for prefix, part in ((f"{key}.quant_state", state), (f"{key}.quant_state.state2", getattr(state, "state2", None))):
        for attr, value in (vars(part) if part is not None else {}).items():
            if hasattr(value, "_version") and hasattr(value, "data_ptr"):
                found[f"{prefix}.{attr}"] = _Tensor.of(value)
    return found


def _global_hooks() -> dict[str, dict[Any, Any]]:
    """torch's process-wide module hooks (`register_module_forward_hook`, ...): they reach every model."""
    import torch.nn.modules.module as torch_module

    return {
        name: value
        for name, value in vars(torch_module).items()
        if name.startswith("_global_") and "hook" in name and isinstance(value, dict)
    }


def _same_dict(a: Mapping[Any, Any], b: Mapping[Any, Any]) -> bool:
    return len(a) == len(b) and all(key in b and b[key] is value for key, value in a.items())


def _same_value(a: Any, b: Any) -> bool:
    return a is b or (type(a) is type(b) and type(a) in (int, float, str, bool) and a == b)


def _rewrapped(before: Any, now: Any) -> bool:
    """`now` is another tensor object over `before`'s storage, with its dtype, shape and layout (PEFT's
    `nn.Parameter(weight.data)` after a MultiheadAttention adapter re-registers the weight so)."""
    if before is now or type(before) is not type(now) or not hasattr(now, "data_ptr"):
        return False
    return (
        before.data_ptr() == now.data_ptr()
        and before.dtype == now.dtype
        and before.shape == now.shape
        and before.stride() == now.stride()
    )


def _same_entry(before: Any, now: Any) -> bool:
    """The same object, or the same weight re-registered unwritten with the same flags, which a restore puts
    back. `.data` starts a new version counter, so a write through the new object shows in its own counter."""
    return before is now or (
        _rewrapped(before, now) and now._version == 0 and before.requires_grad == now.requires_grad
    )


def _written_rewraps(where: str, before: Mapping[Any, Any], now: Mapping[Any, Any]) -> list[Change]:
    """Writes through a re-registered object: the snapshot's version counter never saw them."""
    return [
        Change(
            "in-place",
            f"{where}.{key}",
            f"written in place ({now[key]._version}x) through a tensor re-registered "
            "on its storage (`nn.Parameter(w.data)`)",
        )
        for key in before
        if key in now and _rewrapped(before[key], now[key]) and now[key]._version != 0
    ]


def _module_changes(where: str, saved: _Module) -> list[Change]:
    now = vars(saved.obj)
    found = []
    if type(saved.obj) is not saved.cls:
        found.append(Change("structure", where, f"class {type(saved.obj).__name__} instead of {saved.cls.__name__}"))
    for key in saved.attrs.keys() | now.keys():
        if key in saved.mode_keys:
            continue
        if key not in now:
            found.append(Change(_attr_kind(key), where, f"attribute {key!r} removed"))
        elif key not in saved.attrs:
            found.append(Change(_attr_kind(key), where, f"attribute {key!r} added"))
        elif isinstance(saved.attrs[key], dict):
            if not isinstance(now[key], dict) or not _same_dict(saved.attrs[key], now[key]):
                found += _dict_changes(where, key, saved.attrs[key], now[key])
        elif not _same_value(saved.attrs[key], now[key]):
            found.append(Change(_attr_kind(key), where, f"{key} = {_short(now[key])} (was {_short(saved.attrs[key])})"))
    for key, tensor in saved.tensors.items():
        label = key.split(".", 1)[1]
        obj, alias = tensor.obj, tensor.alias
        if tensor.data_replaced():
            found.append(
                Change(
                    "replaced",
                    f"{where}.{label}",
                    f"data replaced: {alias.dtype} -> {obj.dtype}"
                    if obj.dtype != alias.dtype
                    else "data replaced (`.data =` assignment)",
                )
            )
        if alias._version != tensor.version:
            found.append(
                Change("in-place", f"{where}.{label}", f"written in place ({alias._version - tensor.version}x)")
            )
        if bool(obj.requires_grad) != tensor.requires_grad:
            found.append(Change("requires-grad", f"{where}.{label}", f"requires_grad = {obj.requires_grad}"))
    return found


def _hooks_of_input_grads(model: Any, found: list[Change]) -> list[Change]:
    """The forward hook on the input embeddings is enable_input_require_grads()'s, not a stray one."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    where = next((name for name, module in model.named_modules() if module is embeddings), None)
    return [Change("input-grads", c.where, c.detail) if c.kind == "hook" and c.where == where else c for c in found]


def _dict_changes(where: str, key: str, before: Mapping[Any, Any], now: Any) -> list[Change]:
    if not isinstance(now, dict):
        return [Change("attribute", where, f"{key} replaced by a {type(now).__name__}")]
    added = [k for k in now if k not in before]
    removed = [k for k in before if k not in now]
    replaced = [k for k in before if k in now and not _same_entry(before[k], now[k])]
    if key in _STRUCTURE:
        noun = _STRUCTURE[key]
        found = _written_rewraps(where, before, now)
        written = {c.where.rsplit(".", 1)[-1] for c in found}
        replaced = [k for k in replaced if k not in written]
        found += [Change(_structure_kind(noun, None), where, f"{noun} {k!r} removed") for k in removed]
        found += [Change(_structure_kind(noun, now[k]), where, f"{noun} {k!r} added") for k in added]
        found += [
            Change(_structure_kind(noun, now[k]), where, f"{noun} {k!r} replaced by a {_class_name(now[k])}")
            for k in replaced
        ]
        return found
    if "hook" in key:
        detail = ", ".join(
            f"{n} {key.lstrip('_').replace('_', ' ')[:-1]}(s) {verb}"
            for verb, n in (("added", len(added)), ("removed", len(removed)), ("replaced", len(replaced)))
            if n
        )
        return [Change("hook", where, detail)]
    return [Change("attribute", where, f"{key} changed")]


def _structure_kind(noun: str, new: Any) -> str:
    if noun != "module":
        return "replaced"
    return "adapter" if _from_peft(new) else "structure"


def _from_peft(obj: Any) -> bool:
    return type(obj).__module__.startswith("peft.")


def _class_name(obj: Any) -> str:
    """PEFT's layers share names with the layers they wrap (Linear4bit): say which one."""
    cls = type(obj)
    return f"{cls.__module__}.{cls.__name__}" if _from_peft(obj) else cls.__name__


def _attr_kind(key: str) -> str:
    if key in _CHECKPOINTING_ATTRS:
        return "checkpointing"
    if key in _INPUT_GRADS_ATTRS:
        return "input-grads"
    if key in _PEFT_ATTRS:
        return "adapter"
    return "attribute"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"<{type(value).__name__}>"


def _config_changes(label: str, config: Any, saved_vars: Mapping[str, Any]) -> list[Change]:
    live = vars(config)
    found = []
    for key in saved_vars.keys() | live.keys():
        before, after = saved_vars.get(key, "<unset>"), live.get(key, "<unset>")
        try:
            same = bool(before == after)
        except Exception:  # objects whose == is not a bool (tensors): compare by identity
            same = before is after
        if not same:
            found.append(Change("config", label, f"{key} = {_short(after)} (was {_short(before)})"))
    return found


def _refill(live: dict[Any, Any], saved: Mapping[Any, Any]) -> None:
    """Put a dict's saved content back into the same dict object (hook handles hold it by weakref)."""
    if not _same_dict(saved, live):
        live.clear()
        live.update(saved)


def _restore_module(saved: _Module) -> None:
    if type(saved.obj) is not saved.cls:
        saved.obj.__class__ = saved.cls
    now = vars(saved.obj)
    for key in [k for k in now if k not in saved.attrs]:
        del now[key]
    for key, value in saved.attrs.items():
        if isinstance(value, dict):
            live = now.get(key)
            if not isinstance(live, dict):  # replaced wholesale: a fresh dict holds the saved content
                now[key] = live = copy.copy(value)
            _refill(live, value)
        elif key not in now or not _same_value(value, now[key]):
            now[key] = value
    for tensor in saved.tensors.values():
        obj = tensor.obj
        if tensor.data_replaced():
            obj.data = tensor.alias
        if bool(obj.requires_grad) != tensor.requires_grad:
            obj.requires_grad_(tensor.requires_grad)
        if getattr(obj, "grad", None) is not None and not tensor.requires_grad:
            obj.grad = None


_RECIPE_FIX = (
    "fix: ask for the recipe instead of applying it to the shared base: `lora_train(config, "
    "gradient_checkpointing=True)` or `@pytest.mark.lora(gradient_checkpointing=True)` applies what "
    "prepare_model_for_kbit_training does for that run and undoes it"
)
# kind -> (what happened, the fix); the order is the order of the diagnosis.
EXPLAINED: dict[str, tuple[str, str]] = {
    "adapter": (
        "PEFT adapter layers were left on the base: `get_peft_model(lora_base_model, ...)` wraps the shared "
        "base in place, so every later test would train stacked adapters",
        "fix: use the `lora_model(config)` factory, or `with lora_adapters.attached(config) as model:`, "
        "which detach when the test ends",
    ),
    "structure": (
        "modules of the base were added, removed or replaced",
        "fix: change a copy (`copy.deepcopy`) or a model you load yourself, not the shared base",
    ),
    "hook": (
        "hooks registered on the base were not removed, so they would run in every later test",
        "fix: keep the handle (`h = module.register_forward_hook(...)`) and call `h.remove()` in a `finally:` "
        "or a yield fixture",
    ),
    "checkpointing": ("gradient checkpointing was switched on (gradient_checkpointing_enable)", _RECIPE_FIX),
    "input-grads": ("enable_input_require_grads() left its embedding hook", _RECIPE_FIX),
    "config": (
        "the model config (or generation config) was changed",
        "fix: pass the value per call (`model(..., use_cache=False)`), or use `lora_train(..., "
        "gradient_checkpointing=True)`, which sets use_cache=False for its run only",
    ),
    "replaced": (
        "tensors of the base were added, removed, replaced or cast (a `.data =` assignment, a dtype cast such "
        "as prepare_model_for_kbit_training's fp32 upcast, weight_norm, resize_token_embeddings)",
        "fix: change a copy or a model you load yourself; for the QLoRA recipe use `lora_train(config, "
        "gradient_checkpointing=True)`",
    ),
    "requires-grad": (
        "requires_grad was changed on base parameters",
        "fix: let PEFT choose what trains (`modules_to_save`, `bias`), on the model `lora_model` returns",
    ),
    "attribute": (
        "attributes of base modules were changed",
        "fix: change a copy or a model you load yourself, not the shared base",
    ),
    "in-place": (
        "base tensors were written in place, so the loaded weights are gone",
        "fix: never write to the base's tensors; clone first (`w = module.weight.detach().clone()`)",
    ),
}


def explain(
    changes: list[Change], *, when: str, leaked: bool = False, merged: list[str] | None = None, reloaded: bool = False
) -> str:
    """The diagnosis of a test that left the shared base changed: what, where, what was done, the fix."""
    lines = [f"the shared base model was left changed ({when}):"]
    if leaked:
        lines += [
            "  an adapter attached with `lora_adapters.attach(config)` was still attached when the test ended",
            "    fix: `with lora_adapters.attached(config) as model:`, or the `lora_model` fixture; both detach "
            "when the test ends (pytest-lora detached it)",
        ]
    if merged:
        lines += [
            f"  merge_adapter() / merge_and_unload() wrote the adapter into the base's weights "
            f"({len(merged)} layer(s), e.g. {merged[0]!r})",
            "    fix: check merged outputs on a model you load yourself, or call `unmerge_adapter()` before the "
            "test ends",
        ]
    by_kind: dict[str, list[Change]] = {}
    for change in changes:
        by_kind.setdefault(change.kind, []).append(change)
    for kind, (what, fix) in EXPLAINED.items():
        found = by_kind.get(kind)
        if not found or (merged and kind == "replaced"):
            continue
        shown = "; ".join(str(c) for c in found[:3]) + (f"; and {len(found) - 3} more" if len(found) > 3 else "")
        lines += [f"  {what}: {shown}", f"    {fix}"]
    lines.append(
        "  the base was reloaded from its checkpoint, so the next test gets it as loaded"
        if reloaded
        else "  pytest-lora restored the base exactly, so the next test gets it as loaded"
    )
    return "\n".join(lines)
