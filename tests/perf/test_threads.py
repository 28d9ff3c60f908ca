"""Serial CPU runs: one torch thread against torch's default (one per core), as a ratio from the same run.

What chose pytest-lora's default (`pytest_lora.model.loading.cpu_threads`): on the tiny models that CPU runs use,
a step is many small matmuls, and a second OpenMP thread costs more in spin-waits than it gains; on a shared
2-core runner the spin-waits make the default many times slower. Rounds alternate between the two settings,
so a busy stretch of the machine hits both. `tox -e perf` records `default_over_one` in `extra_info`.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
from conftest import lora_config, repeats

from pytest_lora.model.training import synthetic_data

pytestmark = pytest.mark.lora

BATCH, SEQ, STEPS, ROUNDS = 8, 64, 4, 6


def test_one_thread_against_the_default_thread_count(benchmark, lora_model, lora_settings):
    model = lora_model(lora_config(8))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = synthetic_data(64, SEQ, seed=lora_settings.seed).train[:BATCH]

    def steps() -> None:
        for _ in range(STEPS):
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    before, default = torch.get_num_threads(), os.cpu_count() or 1
    seconds: dict[int, list[float]] = {1: [], default: []}
    try:
        steps()  # warm-up
        for _ in range(repeats(benchmark, ROUNDS)):
            for threads in (1, default):
                torch.set_num_threads(threads)
                start = time.perf_counter()
                steps()
                seconds[threads].append(time.perf_counter() - start)
        torch.set_num_threads(1)
        benchmark.pedantic(steps, rounds=repeats(benchmark, 3))
    finally:
        torch.set_num_threads(before)
    one, many = statistics.median(seconds[1]), statistics.median(seconds[default])
    tokens = STEPS * BATCH * SEQ
    benchmark.extra_info.update(
        threads_default=default,
        tokens_per_s_one=tokens / one,
        tokens_per_s_default=tokens / many,
        default_over_one=one / many,
    )
    print(f"\ntokens/s: 1 thread {tokens / one:,.0f}, {default} threads {tokens / many:,.0f}: ratio {one / many:.3f}")
