"""The public API, listed in one place: a name that moves or disappears fails here, whatever moves inside.

Users import `pytest_lora` and the public modules beside it (`pytest_lora.strategies`); every other path is
private and free to move.
"""

from __future__ import annotations

import importlib

import pytest

PUBLIC = {
    "pytest_lora": {
        # fixtures' types
        "LoraModelFactory",
        "LoraTrain",
        "LoraBenchmark",
        "SweepRun",
        "SweepReport",
        "AdapterManager",
        "BaseModelPool",
        "Policy",
        "Settings",
        "TrainResult",
        # assertions and what they return
        "assert_adapter_shapes",
        "assert_alpha_ratio",
        "assert_fits_memory",
        "assert_no_overfit",
        "assert_no_plateau",
        "assert_param_budget",
        "assert_policy",
        "ParamCount",
        "count_parameters",
        "OverfitRule",
        "OverfitVerdict",
        "PlateauRule",
        "PlateauVerdict",
        "analyze_overfit",
        "analyze_plateau",
        # estimates, policy, data
        "estimate_lora_parameters",
        "estimate_memory",
        "MemoryEstimate",
        "MemoryRecipe",
        "SweepRule",
        "load_policy",
        "use_policy",
        "active_policy",
        "BUILTIN_MODEL",
        "ByteTokenizer",
        "TextDataset",
        "synthetic_data",
        # errors and warnings
        "LoraError",
        "SettingsError",
        "PolicyError",
        "ModelLoadError",
        "AdapterConfigError",
        "LoraAssertionError",
        "TrainingError",
        "BaseModelModifiedError",
        "CurveError",
        "LoraPolicyWarning",
    },
    "pytest_lora.strategies": {
        "LLAMA_TARGETS",
        "InvalidLoraValue",
        "config_repr",
        "invalid_lora_values",
        "lora_configs",
        "policy_configs",
    },
}


@pytest.mark.parametrize("module", list(PUBLIC))
def test_the_public_names_are_exactly_these_and_each_resolves(module: str) -> None:
    imported = importlib.import_module(module)
    assert set(imported.__all__) == PUBLIC[module]
    for name in PUBLIC[module]:
        assert getattr(imported, name) is not None, f"{module}.{name}"


def test_the_strategies_path_users_import_is_the_integrations_code() -> None:
    from pytest_lora.integrations import strategies as inside
    from pytest_lora.strategies import lora_configs

    assert lora_configs is inside.lora_configs
