"""Hypothesis entry point: the ``lora-ci`` profile and a lazy ``LoraConfig`` strategy.

Hypothesis runs ``_hypothesis_setup_hook`` every time ``hypothesis`` is imported, which is every pytest
session. Importing peft there would cost seconds (it imports torch) in sessions that never draw a config,
and ``st.register_type_strategy`` needs the class itself, so the strategy is registered once peft is imported:

- peft already imported: register now;
- otherwise: a one-shot finder on ``sys.meta_path`` notices ``import peft``, lets the normal finders and
  loader do the work, and registers ``peft.LoraConfig`` right after the package has executed (the module
  then gets its original loader back, so nothing downstream sees the wrapper).

Anyone who can write ``st.from_type(LoraConfig)`` has imported peft, so the strategy is in place by then.
The registered value is a function of the type, so ``pytest_lora.integrations.strategies`` is imported only when
Hypothesis first resolves ``LoraConfig``. (Hypothesis' own lazy table for numpy, ``_global_extra_lookup``,
would do the same but is private.)
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Callable
from typing import Any

from pytest_lora.integrations.hypothesis_profile import register_profile


def _lora_config_strategy(thing: type) -> Any:
    """Strategy for ``st.from_type(LoraConfig)``: PEFT's option space, from ``lora_configs()``."""
    from pytest_lora.integrations.strategies import lora_configs

    return lora_configs()


def _register_lora_config(peft: types.ModuleType) -> None:
    from hypothesis import strategies as st

    st.register_type_strategy(peft.LoraConfig, _lora_config_strategy)


class _CallbackLoader(importlib.abc.Loader):
    """Executes a module with its own loader, restores that loader on the module, then calls back."""

    def __init__(self, loader: importlib.abc.Loader, callback: Callable[[types.ModuleType], None]) -> None:
        self._loader = loader
        self._callback = callback

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        try:
            self._loader.exec_module(module)
        finally:
            module.__loader__ = self._loader
            if module.__spec__ is not None:
                module.__spec__.loader = self._loader
        self._callback(module)


class AfterImport(importlib.abc.MetaPathFinder):
    """One-shot finder: when top-level module `name` is first imported, call `callback(module)` after it ran."""

    def __init__(self, name: str, callback: Callable[[types.ModuleType], None]) -> None:
        self.name = name
        self.callback = callback

    def find_spec(self, fullname: str, path: Any, target: types.ModuleType | None = None) -> Any:
        if fullname != self.name:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _CallbackLoader(spec.loader, self.callback)
        return spec


def call_after_import(name: str, callback: Callable[[types.ModuleType], None]) -> None:
    """`callback(module)` now if `name` is imported, else right after its first import (once per name)."""
    module = sys.modules.get(name)
    if module is not None:
        callback(module)
    elif not any(isinstance(f, AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, AfterImport(name, callback))


def _hypothesis_setup_hook() -> None:
    """Entry point (group ``hypothesis``): the profile now, the ``LoraConfig`` strategy once peft is imported."""
    register_profile()
    call_after_import("peft", _register_lora_config)
