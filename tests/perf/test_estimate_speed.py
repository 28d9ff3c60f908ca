"""Counting a Llama-2-70b-shaped LoRA from its config: time against PEFT's own meta-device count, and memory.

The estimate sums LoRA shapes of the meta model instead of instantiating PEFT layers. The ratio
(estimate / PEFT, both from the same config, both building the meta model) goes to `extra_info`;
the target is <= 0.5. The memory claim (a fresh process stays under 600 MB) is asserted: it is a
resource bound, not a timing.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import median_seconds

from pytest_lora.counting import ParamCount, count_parameters
from pytest_lora.estimate import estimate_lora_parameters, meta_model

pytestmark = pytest.mark.lora

LLAMA_2_70B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
}
ALL_LINEAR_R64 = {"r": 64, "lora_alpha": 128, "target_modules": "all-linear"}
TRAINABLE = 828_375_040
MAX_RSS_MB = 600


def _peft_count() -> ParamCount:
    """The baseline: PEFT's get_peft_model with low_cpu_mem_usage on a meta model built from the same config."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(meta_model(LLAMA_2_70B), LoraConfig(**ALL_LINEAR_R64), low_cpu_mem_usage=True)
    return count_parameters(peft_model)


def _estimate() -> ParamCount:
    return estimate_lora_parameters(LLAMA_2_70B, ALL_LINEAR_R64)


def test_70b_all_linear_estimate_vs_peft_on_meta(benchmark) -> None:
    """Same count as PEFT, in a fraction of its time (target: at most half)."""
    estimate, peft = _estimate(), _peft_count()  # also the warm-up of both paths
    assert estimate == peft
    assert estimate.trainable == TRAINABLE
    benchmark.group = "estimate: Llama-2-70b all-linear r=64, vs PEFT get_peft_model on meta"
    benchmark.pedantic(_estimate, rounds=5, warmup_rounds=1)
    ours = median_seconds(_estimate, repeat=5)
    theirs = median_seconds(_peft_count, repeat=3)
    benchmark.extra_info.update(estimate_s=ours, peft_meta_s=theirs, ratio=ours / theirs, trainable=TRAINABLE)
    print(f"\nestimate {ours * 1e3:.0f} ms, PEFT on meta {theirs * 1e3:.0f} ms: ratio {ours / theirs:.3f}")


def test_70b_estimate_in_a_fresh_process_stays_under_600_mb() -> None:
    """Peak RSS of a new interpreter doing only the estimate (imports of torch, transformers, PEFT included).

    Read from the child's own VmHWM: `ru_maxrss` survives fork + exec on Linux, so it would report the
    parent test process' size whenever that was larger.
    """
    code = (
        "import sys, json;"
        "from pytest_lora.estimate import estimate_lora_parameters;"
        "from pytest_lora.memory import cpu_peak_bytes;"
        "count = estimate_lora_parameters(json.loads(sys.argv[1]), json.loads(sys.argv[2]));"
        "print(count.trainable, cpu_peak_bytes() // 1024)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(LLAMA_2_70B), json.dumps(ALL_LINEAR_R64)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout.split()
    trainable, peak_kb = int(out[-2]), int(out[-1])
    assert trainable == TRAINABLE
    peak_mb = peak_kb / 1024
    print(f"\npeak RSS of a fresh process estimating Llama-2-70b: {peak_mb:.0f} MB (limit {MAX_RSS_MB} MB)")
    assert peak_mb < MAX_RSS_MB, f"{peak_mb:.0f} MB >= {MAX_RSS_MB} MB"
