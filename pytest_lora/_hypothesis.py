"""Hypothesis entry point: the ``lora-ci`` profile and a lazy ``LoraConfig`` strategy.

Hypothesis runs ``_hypothesis_setup_hook`` every time ``hypothesis`` is imported, which is every pytest
session. Importing peft there would cost seconds (it imports torch) in sessions that never draw a config,
so the strategy is registered only once peft itself is imported:

- peft already imported: register now;
- otherwise: a one-shot finder on ``sys.meta_path`` notices ``import peft``, lets the normal finders and
  loader do the work, and registers ``peft.LoraConfig`` right after the package finishes executing (then
  restores the original loader on the module, so nothing downstream sees the wrapper).

Anyone who can write ``st.from_type(LoraConfig)`` has imported peft, so the strategy is always in place by
then. The registered value is a function of the type, so ``pytest_lora.strategies`` is imported only when
Hypothesis first resolves ``LoraConfig``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Any

CI_PROFILE = "lora-ci"
"""Name of the settings profile for CI runs: ``pytest --hypothesis-profile=lora-ci``."""

CI_MAX_EXAMPLES = 25
"""Examples per test under ``lora-ci``: each may attach an adapter to the 4-bit base, so keep it bounded."""


def _register_profile() -> None:
    """Register ``lora-ci``: reproducible (derandomized), no deadline (first attach is slow), bounded."""
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        CI_PROFILE,
        derandomize=True,
        deadline=None,
        max_examples=CI_MAX_EXAMPLES,
        suppress_health_check=[HealthCheck.too_slow],
        print_blob=True,
    )


def _lora_config_strategy(thing: type) -> Any:
    """Strategy for ``st.from_type(LoraConfig)``: PEFT's option space, from ``lora_configs()``."""
    from pytest_lora.strategies import lora_configs

    return lora_configs()


def _register_lora_config(peft_module: types.ModuleType) -> None:
    from hypothesis import strategies as st

    st.register_type_strategy(peft_module.LoraConfig, _lora_config_strategy)


class _RegisterAfterExec(importlib.abc.Loader):
    """Wraps peft's loader: executes the package as usual, then registers ``LoraConfig``."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        try:
            self._loader.exec_module(module)
        finally:
            module.__loader__ = self._loader
            if module.__spec__ is not None:
                module.__spec__.loader = self._loader
        _register_lora_config(module)


class _PeftImportWatcher(importlib.abc.MetaPathFinder):
    """One-shot finder: on ``import peft``, find it with the other finders and wrap its loader."""

    def find_spec(self, fullname: str, path: Any, target: types.ModuleType | None = None) -> Any:
        if fullname != "peft":
            return None
        _uninstall_watcher()
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RegisterAfterExec(spec.loader)
        return spec


def _uninstall_watcher() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _PeftImportWatcher)]


def _hypothesis_setup_hook() -> None:
    """Entry point (group ``hypothesis``): profile now, ``LoraConfig`` strategy when peft is imported."""
    _register_profile()
    peft = sys.modules.get("peft")
    if peft is not None and hasattr(peft, "LoraConfig"):
        _register_lora_config(peft)
    elif not any(isinstance(finder, _PeftImportWatcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PeftImportWatcher())
