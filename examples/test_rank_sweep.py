"""The rank guide's production step: sweep the ranks briefly, then pick one with evidence.

Each rank of the policy's `[sweep]` table is one test item (`-n 2` spreads them over workers or
GPUs): it trains for `sweep.steps` and records the validation loss and the training cost (model
FLOPs, with the measured time beside it). At the end of the session the terminal names the chosen
rank (the smallest reaching 95% of the best loss in at most 70% of the most FLOPs) and
`.lora-sweep/` holds the JSON report with its provenance, a Markdown table and, with matplotlib,
the plots.

The data is the sweep's default, `builtin:planted-rank-8`: text sampled from this very base model
plus a rank-8 update of its output head, so the right answer is known. The summary says whether the
sweep found r=8: a calibration of the whole pipeline (model, quantization, device, training budget,
the rule) before it is trusted on real data (pass `dataset=` then).
"""

import math

import pytest
from peft import LoraConfig

pytestmark = pytest.mark.lora


def test_rank_sweep(lora_sweep):
    """One rank of the calibration sweep: alpha = 2r keeps the effective learning rate equal across ranks.

    The planted update lives on lm_head, so the calibration adapts it (the team's production
    adapters stay on q_proj, v_proj: the policy forbids lm_head there).
    """
    config = LoraConfig(
        r=lora_sweep.rank,
        lora_alpha=2 * lora_sweep.rank,
        target_modules=["lm_head"],
        task_type="CAUSAL_LM",
    )
    val_loss = lora_sweep.run(config, lr=3e-2, batch_size=32, seq_len=32)
    assert math.isfinite(val_loss)
