"""The rank guide's production step: sweep the ranks briefly, then pick one with evidence.

Each rank of the policy's `[sweep]` table is one test item (`-n 2` spreads them over workers or
GPUs): it trains for `sweep.steps` on `sweep.data_fraction` of the data and records the validation
loss and the training time. At the end of the session the terminal names the chosen rank (the
smallest reaching 95% of the best loss in at most 70% of the longest time) and `.lora-sweep/`
holds the JSON report with its provenance, a Markdown table and, with matplotlib, the plots.
"""

import math

import pytest
from peft import LoraConfig

pytestmark = pytest.mark.lora


def test_rank_sweep(lora_sweep):
    """One rank of the sweep: alpha = 2r keeps the effective learning rate equal across ranks."""
    config = LoraConfig(
        r=lora_sweep.rank,
        lora_alpha=2 * lora_sweep.rank,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.05,
        task_type="CAUSAL_LM",
    )
    val_loss = lora_sweep.run(config)
    assert math.isfinite(val_loss)
