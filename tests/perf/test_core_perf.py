"""Benchmarks of the core fixtures; each reports a ratio against a baseline measured in the same run.

Run for real with `tox -e perf` (or `pytest tests/perf --benchmark-only`); the default suite runs
them once with `--benchmark-disable`, so they cannot rot. The ratios go to `extra_info`, hence
to `--benchmark-json`.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
import sys
import time

import pytest
from conftest import lora_config, median_seconds, repeats

from pytest_lora.model.adapters import AdapterManager
from pytest_lora.model.loading import load_base_model

pytestmark = pytest.mark.lora


MEDIUM_LLAMA = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "vocab_size": 8000}


@pytest.fixture(params=["builtin", "medium"])
def base_settings(request, lora_session, tmp_path_factory):
    """The built-in tiny model, and a ~40M-parameter Llama where loading costs more than bookkeeping."""
    if request.param == "builtin":
        return lora_session.settings
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pytest_lora.model.loading import TINY_LLAMA_CONFIG

    path = tmp_path_factory.mktemp("medium-llama")
    fields = {k: v for k, v in TINY_LLAMA_CONFIG.items() if k != "architectures"}
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**fields, **MEDIUM_LLAMA})).save_pretrained(path)
    return dataclasses.replace(lora_session.settings, model=str(path))


def test_attach_detach_vs_base_load(benchmark, base_settings):
    """Attaching and removing an adapter per test costs a fraction of loading the base (which happens once)."""
    loaded = load_base_model(base_settings)
    manager = AdapterManager(loaded.model)
    config = lora_config(8)

    def attach_detach() -> None:
        manager.attach(config)
        manager.detach()

    benchmark.group = "core: adapter per test vs base load"
    benchmark.pedantic(attach_detach, rounds=5, warmup_rounds=1)
    load = median_seconds(lambda: load_base_model(base_settings), repeat=repeats(benchmark, 3))
    attach = median_seconds(attach_detach, repeat=repeats(benchmark, 5))
    benchmark.extra_info.update(load_s=load, attach_detach_s=attach, attach_over_load=attach / load)
    print(f"\nattach+detach {attach * 1e3:.1f} ms, base load {load * 1e3:.1f} ms: ratio {attach / load:.3f}")


# A fresh interpreter as users start one: bytecode caches written and read (an environment that forbids them would
# recompile the plugin's modules on every run), and numpy's BLAS without spinning helper threads (pytest-randomly
# imports numpy to reseed it; on a small runner those threads take turns with the run being timed).
_COLLECT_ENV = {
    **{key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"},
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def _collect(project, *extra: str) -> float:
    """Seconds of one `pytest --collect-only` in `project`, in a fresh interpreter."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *extra],
        cwd=project,
        env=_COLLECT_ENV,
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - start


def test_collect_only_cost_of_the_plugin(benchmark, tmp_path):
    """A project with pytest-lora installed but no LoRA tests collects as fast as with `-p no:lora` (target: a
    ratio <= 1.05). Each round times the two back to back, taking turns at going first; the ratio is 1 + the
    median of the rounds' differences over the median time without the plugin, so a load change on the
    machine hits both alike."""
    for module in range(20):
        tests = "\n".join(f"def test_{i}():\n    assert {i} == {i}\n" for i in range(10))
        (tmp_path / f"test_plain_{module}.py").write_text(tests)
    on: list[float] = []
    off: list[float] = []

    def pair() -> None:  # which one runs first alternates: the second of two runs may find the caches warmer
        if len(on) % 2:
            off.append(_collect(tmp_path, "-p", "no:lora"))
            on.append(_collect(tmp_path))
        else:
            on.append(_collect(tmp_path))
            off.append(_collect(tmp_path, "-p", "no:lora"))

    _collect(tmp_path)  # warm-up of both: bytecode caches, page cache
    _collect(tmp_path, "-p", "no:lora")
    benchmark.group = "core: --collect-only of 200 tests, plugin on and -p no:lora"
    benchmark.pedantic(pair, rounds=50)
    with_plugin, without = statistics.median(on), statistics.median(off)
    # the median of each round's own difference: a slow stretch of the machine hits both halves of a round
    ratio = 1 + statistics.median(a - b for a, b in zip(on, off, strict=True)) / without
    benchmark.extra_info.update(
        with_plugin_s=with_plugin, without_plugin_s=without, ratio=ratio, target_ratio=1.05, tests_collected=200
    )
    print(f"\ncollect-only: with plugin {with_plugin:.3f}s, -p no:lora {without:.3f}s: ratio {ratio:.3f} (target 1.05)")


def test_lora_train_vs_hand_written_loop(benchmark, lora_model, lora_train):
    """`lora_train` adds little over a plain AdamW loop on the same model, data and steps."""
    import torch

    from pytest_lora.model.training import synthetic_data

    steps, batch, seq = 20, 8, 64
    data = synthetic_data(256, seq)

    def hand_loop() -> float:
        model = lora_model(lora_config(8))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        start = time.perf_counter()
        for step in range(steps):
            rows = data.train[step * batch : (step + 1) * batch]
            loss = model(input_ids=rows, labels=rows).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return steps * batch * seq / (time.perf_counter() - start)

    def fixture_run() -> float:
        result = lora_train(lora_config(8), steps=steps, batch_size=batch, seq_len=seq, eval_every=steps)
        return result.tokens_per_second

    benchmark.group = "core: lora_train vs hand-written loop"
    benchmark.pedantic(fixture_run, rounds=3, warmup_rounds=1)
    hand = statistics.median(hand_loop() for _ in range(repeats(benchmark, 3)))
    ours = statistics.median(fixture_run() for _ in range(repeats(benchmark, 3)))
    benchmark.extra_info.update(hand_tokens_per_s=hand, lora_train_tokens_per_s=ours, ratio=ours / hand)
    print(f"\ntokens/s: lora_train {ours:,.0f}, hand loop {hand:,.0f}: ratio {ours / hand:.3f}")


def test_per_test_state_check_vs_attach_detach_and_training(benchmark, lora_session, lora_train):
    """The whole-state check after every test costs a sliver of an attach + detach and of a 10-step run.

    Issue 9's bounds: under 10% of an attach + detach on the tiny model, under 2% of a 10-step `lora_train`.
    """
    manager = lora_session.manager()
    config = lora_config(8)

    def check() -> None:
        manager.assert_clean("benchmark")

    def attach_detach() -> None:
        manager.attach(config)
        manager.detach()

    def train_10() -> None:
        lora_train(config, steps=10, eval_every=10)
        manager.detach()

    benchmark.group = "core: per-test base-state check"
    benchmark.pedantic(check, rounds=20, warmup_rounds=2)
    checked = median_seconds(check, repeat=repeats(benchmark, 50))
    attach = median_seconds(attach_detach, repeat=repeats(benchmark, 7))
    trained = median_seconds(train_10, repeat=repeats(benchmark, 3))
    benchmark.extra_info.update(
        check_s=checked,
        attach_detach_s=attach,
        train_10_s=trained,
        check_over_attach=checked / attach,
        check_over_train=checked / trained,
    )
    print(
        f"\nstate check {checked * 1e3:.2f} ms; attach+detach {attach * 1e3:.1f} ms (ratio {checked / attach:.3f}); "
        f"10-step lora_train {trained * 1e3:.0f} ms (ratio {checked / trained:.4f})"
    )
