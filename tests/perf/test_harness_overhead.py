"""How far `lora_benchmark`'s numbers are from the truth, as ratios measured in the same run.

- tokens/s from `lora_benchmark` against a hand-written AdamW loop on the same model, data and steps
  (target: within 3%);
- the FLOPs formula against `torch.utils.flop_counter.FlopCounterMode` on the unquantized tiny model
  (target: within 3%).

Run for real with `tox -e perf` (or `pytest tests/perf --benchmark-only`); the default suite runs them
once with `--benchmark-disable`. The ratios go to `extra_info`, hence to `--benchmark-json`.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from _flop_counter import counted_flops_per_token, tiny_unquantized
from conftest import lora_config, repeats

from pytest_lora.core.flops import step_flops
from pytest_lora.model.shapes import model_shape
from pytest_lora.model.training import synthetic_data

pytestmark = pytest.mark.lora

BATCH, SEQ, STEPS_PER_ROUND, ROUNDS = 8, 64, 4, 5


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared machine, OpenMP spin-waits make 2-thread timings swing 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_lora_benchmark_vs_hand_written_loop(benchmark, lora_benchmark, lora_model, lora_settings, one_thread):
    """The harness (pedantic rounds, per-round sync and timing) costs nothing measurable per step."""
    config = lora_config(8)
    data = synthetic_data(256, SEQ, seed=lora_settings.seed)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(lora_settings.seed))
    batches = [data.train[order[i * BATCH : (i + 1) * BATCH]] for i in range(len(data.train) // BATCH)]

    def hand_loop() -> list[float]:
        """Seconds per round of STEPS_PER_ROUND steps, after one warm-up round, as the fixture runs them."""
        model = lora_model(config)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        seconds = []
        for round_index in range(ROUNDS + 1):
            start = time.perf_counter()
            for index in range(round_index * STEPS_PER_ROUND, (round_index + 1) * STEPS_PER_ROUND):
                batch = batches[index % len(batches)]
                model(input_ids=batch, labels=batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            seconds.append(time.perf_counter() - start)
        return seconds[1:]

    hand_rounds = [seconds for _ in range(repeats(benchmark, 2)) for seconds in hand_loop()]
    run = lora_benchmark(
        config, batch_size=BATCH, seq_len=SEQ, steps_per_round=STEPS_PER_ROUND, rounds=ROUNDS, warmup_rounds=1
    )
    hand_rounds += [seconds for _ in range(repeats(benchmark, 2)) for seconds in hand_loop()]
    tokens_per_round = STEPS_PER_ROUND * BATCH * SEQ
    # the same statistic on both sides: the median round (robust to a busy machine's hiccups)
    harness_round = benchmark.stats.stats.median if benchmark.stats else run.step_time_s * STEPS_PER_ROUND
    hand, harness = tokens_per_round / statistics.median(hand_rounds), tokens_per_round / harness_round
    ratio = harness / hand
    benchmark.extra_info.update(hand_tokens_per_s=hand, harness_median_tokens_per_s=harness, harness_over_hand=ratio)
    print(
        f"\ntokens/s (median round): lora_benchmark {harness:,.0f}, hand loop {hand:,.0f}: ratio {ratio:.3f}"
        f" (fixture's mean-based figure {run.tokens_per_second:,.0f})"
    )


CONFIGS = {
    "q_proj,v_proj r=8": lora_config(8),
    "all-linear r=16": lora_config(16, target_modules="all-linear"),
    "last two layers r=8": lora_config(8, layers_to_transform=[2, 3]),
}


def test_flops_formula_vs_flop_counter(benchmark):
    """The formula is cheap (shapes only) and reads a few % high on 4 layers; the ratios per config."""
    models = {name: tiny_unquantized(config) for name, config in CONFIGS.items()}
    benchmark.group = "flops: formula vs FlopCounterMode"
    benchmark.pedantic(lambda: [step_flops(model_shape(m), 64) for m in models.values()], rounds=3)
    ratios = {}
    for name, model in list(models.items())[: repeats(benchmark, len(models))]:  # one config when disabled
        for seq_len in (64, 256):
            formula = step_flops(model_shape(model), seq_len).model
            ratios[f"{name}, seq {seq_len}"] = formula / counted_flops_per_token(model, seq_len)
    benchmark.extra_info.update(formula_over_counter=ratios)
    print("\n" + "\n".join(f"formula / FlopCounterMode, {name}: {ratio:.4f}" for name, ratio in ratios.items()))
