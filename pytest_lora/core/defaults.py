"""pytest-lora's defaults: of a training run (shared by `lora_train`, `lora_benchmark` and the rank sweep), and the
name the built-in policy goes by (the report header says it without building that policy)."""

from __future__ import annotations

DEFAULT_STEPS = 40
DEFAULT_LR = 1e-2  # AdamW on the adapters of a tiny model: learns in a few dozen steps, stays finite
DEFAULT_BATCH_SIZE = 8
DEFAULT_SEQ_LEN = 64
DEFAULT_POLICY_SOURCE = "<defaults>"  # `Policy.source` of the built-in policy
