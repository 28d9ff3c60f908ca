"""pytest-lora: write your LoRA rank policy as tests, on a real 4-bit base model.

Importing this package imports no torch, transformers, peft or bitsandbytes: they load when a
LoRA fixture or a check first needs them.
"""

from pytest_lora.assertions import (
    LoraPolicyWarning,
    active_policy,
    assert_adapter_shapes,
    assert_alpha_ratio,
    assert_no_overfit,
    assert_no_plateau,
    assert_param_budget,
    assert_policy,
    use_policy,
)
from pytest_lora.counting import ParamCount, count_parameters
from pytest_lora.curves import (
    OverfitRule,
    OverfitVerdict,
    PlateauRule,
    PlateauVerdict,
    analyze_overfit,
    analyze_plateau,
)
from pytest_lora.data import ByteTokenizer, TextDataset
from pytest_lora.errors import (
    AdapterConfigError,
    BaseModelModifiedError,
    CurveError,
    LoraAssertionError,
    LoraError,
    ModelLoadError,
    PolicyError,
    SettingsError,
    TrainingError,
)
from pytest_lora.estimate import estimate_lora_parameters
from pytest_lora.memory import MemoryEstimate, estimate_memory
from pytest_lora.memory_check import assert_fits_memory
from pytest_lora.models import BUILTIN_MODEL
from pytest_lora.policy import Policy, SweepRule, load_policy
from pytest_lora.recipe import MemoryRecipe
from pytest_lora.training import TrainResult, synthetic_data

__all__ = [
    "BUILTIN_MODEL",
    "AdapterConfigError",
    "BaseModelModifiedError",
    "ByteTokenizer",
    "CurveError",
    "LoraAssertionError",
    "LoraError",
    "LoraPolicyWarning",
    "MemoryEstimate",
    "MemoryRecipe",
    "ModelLoadError",
    "OverfitRule",
    "OverfitVerdict",
    "ParamCount",
    "PlateauRule",
    "PlateauVerdict",
    "Policy",
    "PolicyError",
    "SettingsError",
    "SweepRule",
    "TextDataset",
    "TrainResult",
    "TrainingError",
    "active_policy",
    "analyze_overfit",
    "analyze_plateau",
    "assert_adapter_shapes",
    "assert_alpha_ratio",
    "assert_fits_memory",
    "assert_no_overfit",
    "assert_no_plateau",
    "assert_param_budget",
    "assert_policy",
    "count_parameters",
    "estimate_lora_parameters",
    "estimate_memory",
    "load_policy",
    "synthetic_data",
    "use_policy",
]
