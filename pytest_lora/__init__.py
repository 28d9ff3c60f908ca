"""pytest-lora: write your LoRA rank policy as tests, on a real 4-bit base model.

The package is in layers (see the folders): `core` (pure, stdlib only), `model` (torch, transformers,
PEFT and bitsandbytes, imported inside the functions), `plugin` (the only pytest importer) and
`integrations` (Hypothesis, MLflow, plots). The public names below resolve on first access, so loading
the plugin does not import the package: `from pytest_lora import assert_policy` imports what it needs then.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_WHERE = {
    "LoraPolicyWarning": "pytest_lora.core.errors",
    "active_policy": "pytest_lora.core.policy",
    "assert_adapter_shapes": "pytest_lora.model.assertions",
    "assert_alpha_ratio": "pytest_lora.model.assertions",
    "assert_no_overfit": "pytest_lora.model.assertions",
    "assert_no_plateau": "pytest_lora.model.assertions",
    "assert_param_budget": "pytest_lora.model.assertions",
    "assert_policy": "pytest_lora.model.assertions",
    "use_policy": "pytest_lora.core.policy",
    "ParamCount": "pytest_lora.model.counting",
    "count_parameters": "pytest_lora.model.counting",
    "OverfitRule": "pytest_lora.core.curves",
    "OverfitVerdict": "pytest_lora.core.curves",
    "PlateauRule": "pytest_lora.core.curves",
    "PlateauVerdict": "pytest_lora.core.curves",
    "analyze_overfit": "pytest_lora.core.curves",
    "analyze_plateau": "pytest_lora.core.curves",
    "ByteTokenizer": "pytest_lora.model.data",
    "TextDataset": "pytest_lora.model.data",
    "AdapterConfigError": "pytest_lora.core.errors",
    "BaseModelModifiedError": "pytest_lora.core.errors",
    "CurveError": "pytest_lora.core.errors",
    "LoraAssertionError": "pytest_lora.core.errors",
    "LoraError": "pytest_lora.core.errors",
    "ModelLoadError": "pytest_lora.core.errors",
    "PolicyError": "pytest_lora.core.errors",
    "SettingsError": "pytest_lora.core.errors",
    "TrainingError": "pytest_lora.core.errors",
    "estimate_lora_parameters": "pytest_lora.model.estimate",
    "MemoryEstimate": "pytest_lora.core.memory",
    "estimate_memory": "pytest_lora.model.memory",
    "assert_fits_memory": "pytest_lora.model.memory",
    "BUILTIN_MODEL": "pytest_lora.model.loading",
    "Policy": "pytest_lora.core.policy",
    "SweepRule": "pytest_lora.core.policy",
    "load_policy": "pytest_lora.core.policy",
    "MemoryRecipe": "pytest_lora.core.recipe",
    "TrainResult": "pytest_lora.model.training",
    "synthetic_data": "pytest_lora.model.training",
    # the fixtures' types, for annotating tests (`lora_train: LoraTrain`)
    "LoraModelFactory": "pytest_lora.plugin.fixture_types",
    "LoraTrain": "pytest_lora.plugin.fixture_types",
    "LoraBenchmark": "pytest_lora.plugin.fixture_types",
    "SweepRun": "pytest_lora.plugin.sweep",
    "SweepReport": "pytest_lora.plugin.sweep",
    "AdapterManager": "pytest_lora.model.adapters",
    "BaseModelPool": "pytest_lora.model.base_pool",
    "Settings": "pytest_lora.core.settings",
}

__all__ = sorted(_WHERE)

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time `__getattr__` resolves the same names
    from pytest_lora.core.curves import (
        OverfitRule as OverfitRule,
    )
    from pytest_lora.core.curves import (
        OverfitVerdict as OverfitVerdict,
    )
    from pytest_lora.core.curves import (
        PlateauRule as PlateauRule,
    )
    from pytest_lora.core.curves import (
        PlateauVerdict as PlateauVerdict,
    )
    from pytest_lora.core.curves import (
        analyze_overfit as analyze_overfit,
    )
    from pytest_lora.core.curves import (
        analyze_plateau as analyze_plateau,
    )
    from pytest_lora.core.errors import (
        AdapterConfigError as AdapterConfigError,
    )
    from pytest_lora.core.errors import (
        BaseModelModifiedError as BaseModelModifiedError,
    )
    from pytest_lora.core.errors import (
        CurveError as CurveError,
    )
    from pytest_lora.core.errors import (
        LoraAssertionError as LoraAssertionError,
    )
    from pytest_lora.core.errors import (
        LoraError as LoraError,
    )
    from pytest_lora.core.errors import (
        LoraPolicyWarning as LoraPolicyWarning,
    )
    from pytest_lora.core.errors import (
        ModelLoadError as ModelLoadError,
    )
    from pytest_lora.core.errors import (
        PolicyError as PolicyError,
    )
    from pytest_lora.core.errors import (
        SettingsError as SettingsError,
    )
    from pytest_lora.core.errors import (
        TrainingError as TrainingError,
    )
    from pytest_lora.core.memory import (
        MemoryEstimate as MemoryEstimate,
    )
    from pytest_lora.core.policy import (
        Policy as Policy,
    )
    from pytest_lora.core.policy import (
        SweepRule as SweepRule,
    )
    from pytest_lora.core.policy import (
        active_policy as active_policy,
    )
    from pytest_lora.core.policy import (
        load_policy as load_policy,
    )
    from pytest_lora.core.policy import (
        use_policy as use_policy,
    )
    from pytest_lora.core.recipe import (
        MemoryRecipe as MemoryRecipe,
    )
    from pytest_lora.core.settings import (
        Settings as Settings,
    )
    from pytest_lora.model.adapters import (
        AdapterManager as AdapterManager,
    )
    from pytest_lora.model.assertions import (
        assert_adapter_shapes as assert_adapter_shapes,
    )
    from pytest_lora.model.assertions import (
        assert_alpha_ratio as assert_alpha_ratio,
    )
    from pytest_lora.model.assertions import (
        assert_no_overfit as assert_no_overfit,
    )
    from pytest_lora.model.assertions import (
        assert_no_plateau as assert_no_plateau,
    )
    from pytest_lora.model.assertions import (
        assert_param_budget as assert_param_budget,
    )
    from pytest_lora.model.assertions import (
        assert_policy as assert_policy,
    )
    from pytest_lora.model.base_pool import (
        BaseModelPool as BaseModelPool,
    )
    from pytest_lora.model.counting import (
        ParamCount as ParamCount,
    )
    from pytest_lora.model.counting import (
        count_parameters as count_parameters,
    )
    from pytest_lora.model.data import (
        ByteTokenizer as ByteTokenizer,
    )
    from pytest_lora.model.data import (
        TextDataset as TextDataset,
    )
    from pytest_lora.model.estimate import (
        estimate_lora_parameters as estimate_lora_parameters,
    )
    from pytest_lora.model.loading import (
        BUILTIN_MODEL as BUILTIN_MODEL,
    )
    from pytest_lora.model.memory import (
        assert_fits_memory as assert_fits_memory,
    )
    from pytest_lora.model.memory import (
        estimate_memory as estimate_memory,
    )
    from pytest_lora.model.training import (
        TrainResult as TrainResult,
    )
    from pytest_lora.model.training import (
        synthetic_data as synthetic_data,
    )
    from pytest_lora.plugin.fixture_types import (
        LoraBenchmark as LoraBenchmark,
    )
    from pytest_lora.plugin.fixture_types import (
        LoraModelFactory as LoraModelFactory,
    )
    from pytest_lora.plugin.fixture_types import (
        LoraTrain as LoraTrain,
    )
    from pytest_lora.plugin.sweep import (
        SweepReport as SweepReport,
    )
    from pytest_lora.plugin.sweep import (
        SweepRun as SweepRun,
    )


def __getattr__(name: str) -> Any:
    """The value from the module that defines `name`, imported on first access.

    Not cached here: the value always comes from the module now in `sys.modules`, also after pytester's
    in-process runs dropped and re-imported it (a cached one would mix two copies of its classes)."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_lora' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
