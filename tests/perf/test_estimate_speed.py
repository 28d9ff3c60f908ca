"""Counting a 70B-shaped LoRA from its config: time against PEFT's own meta-device count, and memory.

The estimate sums LoRA shapes of the meta model instead of instantiating PEFT layers. The ratio
(estimate / PEFT, both from the same config, both building the meta model) goes to `extra_info` and is
printed; the target is <= 0.15 (Llama-3-70B, all-linear r=64). With benchmarks disabled (the normal
suite) only the counts are compared. The memory claim (a fresh process stays under 600 MB) is asserted:
it is a resource bound, not a timing.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import median_seconds

from pytest_lora.model.counting import ParamCount, count_parameters
from pytest_lora.model.estimate import estimate_lora_parameters, meta_model

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
# meta-llama/Meta-Llama-3-70B config.json: the Llama-2-70b layer shapes with a 128,256-token vocabulary
LLAMA_3_70B = {
    **LLAMA_2_70B,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
BASES = {"Llama-2-70b": LLAMA_2_70B, "Llama-3-70B": LLAMA_3_70B}
ALL_LINEAR_R64 = {"r": 64, "lora_alpha": 128, "target_modules": "all-linear"}
TRAINABLE = 828_375_040  # both: 80 layers x 64 x (q, k, v, o, gate, up, down: in + out); lm_head left out
MAX_RSS_MB = 600


def _peft_count(base: dict) -> ParamCount:
    """The baseline: PEFT's get_peft_model with low_cpu_mem_usage on a meta model built from the same config."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(meta_model(base), LoraConfig(**ALL_LINEAR_R64), low_cpu_mem_usage=True)
    return count_parameters(peft_model)


@pytest.mark.parametrize("name", BASES)
def test_70b_all_linear_estimate_vs_peft_on_meta(benchmark, name: str) -> None:
    """Same count as PEFT, in a fraction of its time (target: at most 0.15x)."""
    base = BASES[name]
    estimate, peft = estimate_lora_parameters(base, ALL_LINEAR_R64), _peft_count(base)  # also the warm-up
    assert estimate == peft
    assert estimate.trainable == TRAINABLE
    benchmark.group = f"estimate: {name} all-linear r=64, vs PEFT get_peft_model on meta"
    benchmark.pedantic(lambda: estimate_lora_parameters(base, ALL_LINEAR_R64), rounds=5, warmup_rounds=1)
    if benchmark.disabled:
        return
    ours = median_seconds(lambda: estimate_lora_parameters(base, ALL_LINEAR_R64), repeat=5)
    theirs = median_seconds(lambda: _peft_count(base), repeat=3)
    benchmark.extra_info.update(estimate_s=ours, peft_meta_s=theirs, ratio=ours / theirs, trainable=TRAINABLE)
    print(f"\n{name}: estimate {ours * 1e3:.0f} ms, PEFT on meta {theirs * 1e3:.0f} ms: ratio {ours / theirs:.3f}")


def test_70b_estimate_in_a_fresh_process_stays_under_600_mb() -> None:
    """Peak RSS of a new interpreter doing only the estimate (imports of torch, transformers, PEFT included).

    Read from the child's own VmHWM: `ru_maxrss` survives fork + exec on Linux, so it would report the
    parent test process' size whenever that was larger.
    """
    code = (
        "import sys, json;"
        "from pytest_lora.model.estimate import estimate_lora_parameters;"
        "from pytest_lora.model.measure import cpu_peak_bytes;"
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
