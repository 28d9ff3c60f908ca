"""The probe of the isolation tests: the shared base against a second, fresh load of the same model.

Written into pytester's inner conftest (see tests/test_isolation.py). Independent of pytest-lora's
own BaseState on purpose: it compares two distinct models by value (module types, attributes,
hooks, config, every tensor and 4-bit quantization state, and the logits of a fixed input), so a
blind spot of the snapshot cannot hide in the test that checks it.
"""

import pytest
import torch
import torch.nn.modules.module as torch_module

from pytest_lora.model.loading import load_base_model

_SIMPLE = (bool, int, float, str, type(None))


@pytest.fixture(scope="session")
def fresh_base(lora_session):
    """A second load of the session's model, never handed to a test."""
    return load_base_model(lora_session.settings).model


def _tensor_differences(name, a, b):
    if a.dtype != b.dtype or a.shape != b.shape or a.requires_grad != b.requires_grad:
        return [f"{name}: {a.dtype} {tuple(a.shape)} rg={a.requires_grad} vs {b.dtype} {tuple(b.shape)}"]
    if not torch.equal(a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8)):
        return [f"{name}: values differ"]
    qa, qb = getattr(a, "quant_state", None), getattr(b, "quant_state", None)
    if (qa is None) != (qb is None):
        return [f"{name}: quant_state present on one side only"]
    if qa is not None:
        da, db = qa.as_dict(packed=True), qb.as_dict(packed=True)
        if da.keys() != db.keys() or not all(torch.equal(da[k], db[k]) for k in da):
            return [f"{name}: quant_state differs"]
    return []


def state_differences(base, fresh):
    """Everything that tells the shared base from a fresh load, as readable lines (empty: identical)."""
    found = []
    mods, fresh_mods = dict(base.named_modules()), dict(fresh.named_modules())
    if list(mods) != list(fresh_mods):
        found.append(f"modules differ: {sorted(set(mods) ^ set(fresh_mods))[:3]}")
    for name, module in mods.items():
        other = fresh_mods.get(name)
        if type(module) is not type(other):
            found.append(f"{name}: {type(module).__name__} vs {type(other).__name__}")
            continue
        mine, theirs = vars(module), vars(other)
        if mine.keys() != theirs.keys():
            found.append(f"{name}: attributes {sorted(mine.keys() ^ theirs.keys())}")
        for key, value in mine.items():
            if "hook" in key and isinstance(value, dict) and len(value) != len(theirs.get(key, {})):
                found.append(f"{name}: {len(value)} {key}")
            elif isinstance(value, _SIMPLE) and value != theirs.get(key):
                found.append(f"{name}.{key} = {value!r} vs {theirs.get(key)!r}")
    tensors = dict([*fresh.named_parameters(), *fresh.named_buffers()])
    for name, tensor in [*base.named_parameters(), *base.named_buffers()]:
        found += _tensor_differences(name, tensor, tensors[name]) if name in tensors else [f"{name}: added"]
    if base.config.to_dict() != fresh.config.to_dict():
        a, b = base.config.to_dict(), fresh.config.to_dict()
        found.append(f"config differs: {sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))}")
    hooks = {k: len(v) for k, v in vars(torch_module).items() if k.startswith("_global_") and isinstance(v, dict)}
    found += [f"global {k}: {n}" for k, n in hooks.items() if n and "hooks" in k]
    ids = torch.arange(16).reshape(2, 8) % base.config.vocab_size
    with torch.no_grad():
        if not torch.equal(base(input_ids=ids).logits, fresh(input_ids=ids).logits):
            found.append("logits of a fixed input differ")
    return found


@pytest.fixture
def probe(lora_base_model, fresh_base):
    """Call it to assert the shared base is exactly as freshly loaded."""

    def check():
        __tracebackhide__ = True
        differences = state_differences(lora_base_model, fresh_base)
        assert not differences, "\n".join(differences)

    return check
