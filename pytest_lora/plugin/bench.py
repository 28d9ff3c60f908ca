"""`lora_benchmark`: throughput of real LoRA training steps per config, on top of pytest-benchmark.

The fixture depends on pytest-benchmark's own `benchmark` fixture (never redefines it) and times
rounds of training steps (forward, backward, AdamW step) with `benchmark.pedantic`, so
`--benchmark-json`, `--benchmark-compare(-fail)`, `--benchmark-disable` and `--benchmark-skip` work as
for any benchmark. What it measured is a `RunRecord`: the benchmark's `extra_info`, and a
`user_properties` entry, which travels with the test report to the xdist controller, where the plugin's
reporter collects it for the rank table and the JSON report. Registered by the plugin only when
pytest-benchmark is active.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from pytest_lora.core.defaults import DEFAULT_BATCH_SIZE, DEFAULT_LR, DEFAULT_SEQ_LEN
from pytest_lora.core.errors import LoraError, TrainingError
from pytest_lora.core.settings import Settings
from pytest_lora.core.values import is_int, is_real

if TYPE_CHECKING:  # the shapes, FLOPs and report formats load with the first benchmark, not with the plugin
    from pytest_lora.core.flops import PeakFlops
    from pytest_lora.core.report import RunRecord
    from pytest_lora.core.shapes import ModelShape
    from pytest_lora.model.base_pool import BaseModelPool
    from pytest_lora.plugin.fixture_types import LoraBenchmark

DEFAULT_STEPS_PER_ROUND = 4
DEFAULT_ROUNDS = 5
DEFAULT_WARMUP_ROUNDS = 1


def config_label(model: Any, shape: ModelShape) -> str:
    """`r=8 alpha=16 q_proj,v_proj`: the benchmark group and the rank table's row name."""
    config = model.peft_config.get("default") or next(iter(model.peft_config.values()))
    targets = ",".join(dict.fromkeys(linear.name.rsplit(".", 1)[-1] for linear in shape.adapted))
    label = f"r={config.r} alpha={config.lora_alpha:g} {targets}"
    if config.rank_pattern:
        label += " +rank_pattern"
    if config.use_rslora:
        label += " rslora"
    return label


def device_peak(
    config: pytest.Config, device_name: str | None, device: str, override_tflops: float | None
) -> PeakFlops:
    """The device's peak: `--lora-peak-tflops`, else the `pytest_lora_device_peak_flops` hook, else the built-in table.

    The hook gets the GPU's name, or the device ("cpu") where there is none: the built-in table knows no
    CPU, a team's hook may.
    """
    import math

    from pytest_lora.core.flops import PeakFlops, peak_flops

    if override_tflops is None:
        name = device_name or device
        flops = config.hook.pytest_lora_device_peak_flops(device_name=name)
        if flops is not None:
            if not is_real(flops) or not (math.isfinite(flops) and flops > 0):
                raise LoraError(
                    f"pytest_lora_device_peak_flops(device_name={name!r}) returned {flops!r}.\n"
                    "  fix: return the peak in FLOP/s as a number > 0 (e.g. 989.4e12), or None for the built-in table"
                )
            return PeakFlops(float(flops), f"pytest_lora_device_peak_flops: {flops / 1e12:g} TFLOP/s for {name}")
    return peak_flops(device_name, override_tflops)


def _check_args(**values: int) -> None:
    minimum = {"warmup_rounds": 0}
    problems = [
        f"{name}={value!r}: must be an int >= {minimum.get(name, 1)}"
        for name, value in values.items()
        if not is_int(value) or value < minimum.get(name, 1)
    ]
    if problems:
        raise TrainingError("lora_benchmark: " + "; ".join(problems))


@pytest.fixture
def lora_benchmark(
    benchmark: Any, request: pytest.FixtureRequest, lora_session: BaseModelPool, lora_settings: Settings
) -> Iterator[LoraBenchmark]:
    """`lora_benchmark(config, *, batch_size=8, seq_len=64, steps_per_round=4, rounds=5, warmup_rounds=1,
    lr=1e-2, dataset=None) -> RunRecord`: time real LoRA training steps of `config` on the session base.

    The adapter is attached before and removed after (the base is left as loaded). The benchmark
    group names the config (`r=8 alpha=16 q_proj,v_proj`) unless `@pytest.mark.benchmark(group=...)`
    set one, so `--benchmark-compare` lines each config up with its past runs; `--benchmark-group-by=func`
    puts the ranks of a parametrized test in one table. Once per test, as pytest-benchmark allows:
    parametrize over configs for a rank table. A round is `steps_per_round` steps; tokens/s is from the
    mean timed round (pytest-benchmark's `ops` times the tokens of a round). A CUDA out-of-memory error
    fails the test with the measured and estimated memory and the fix, and frees the memory.
    """
    from pytest_lora.core.flops import mfu, step_flops
    from pytest_lora.core.memory import memory_breakdown
    from pytest_lora.core.recipe import MemoryRecipe
    from pytest_lora.core.report import RUN_PROPERTY, RunRecord
    from pytest_lora.model import training
    from pytest_lora.model.counting import count_parameters
    from pytest_lora.model.measure import run_oom_checked
    from pytest_lora.model.shapes import model_shape

    manager = lora_session.manager(lora_settings)
    used: list[bool] = []

    def run(
        config: Any,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        seq_len: int = DEFAULT_SEQ_LEN,
        steps_per_round: int = DEFAULT_STEPS_PER_ROUND,
        rounds: int = DEFAULT_ROUNDS,
        warmup_rounds: int = DEFAULT_WARMUP_ROUNDS,
        lr: float = DEFAULT_LR,
        dataset: Any = None,
    ) -> RunRecord:
        __tracebackhide__ = True
        if used:
            raise LoraError(
                "lora_benchmark can run once per test: pytest-benchmark times one function per test.\n"
                "  fix: parametrize the test over the configs, e.g. @pytest.mark.parametrize('r', [4, 8, 16])"
            )
        used.append(True)
        _check_args(rounds=rounds, warmup_rounds=warmup_rounds)
        model = manager.attach(config, seed=lora_settings.seed)
        device = training.device_of(model)
        seed = lora_settings.seed
        data = training.model_data(model, dataset, seq_len=seq_len, seed=seed)
        training.check_run_args(steps=steps_per_round, lr=lr, batch_size=batch_size, n_train=len(data.train))
        shape = model_shape(model)
        label = config_label(model, shape)
        if benchmark.group is None:
            benchmark.group = label
        # What `training.timed_rounds` runs: torch AdamW on the adapter as attached; the model's own checkpointing,
        # attention and device. Its allocated peak is what "peak mem" measures on CUDA.
        recipe = MemoryRecipe(optimizer="adamw")
        estimate = memory_breakdown(shape, batch_size=batch_size, seq_len=seq_len, recipe=recipe)
        seconds, peak_bytes, scope = run_oom_checked(
            lambda: training.timed_rounds(
                benchmark,
                model,
                data,
                batch_size=batch_size,
                steps_per_round=steps_per_round,
                rounds=rounds,
                warmup_rounds=warmup_rounds,
                lr=lr,
                seed=seed,
                device=device,
                on_round=lambda index, seconds: lora_session.progress(
                    f"benchmark {label}: round {index} of {1 if benchmark.disabled else warmup_rounds + rounds}"
                    f" ({seconds:.2f}s)"
                ),
            ),
            what=f"lora_benchmark ({label}, batch {batch_size} x seq {seq_len})",
            device=device,
            estimate=lambda: estimate,
            release=manager.detach,
        )
        round_seconds = sum(seconds) / len(seconds)
        tokens_per_second = steps_per_round * batch_size * seq_len / round_seconds
        flops = step_flops(shape, seq_len, batch_size=batch_size)
        device_name = training.device_name(device)
        peak = device_peak(request.config, device_name, device, lora_settings.peak_tflops)
        count = count_parameters(model)
        config = model.peft_config["default"]
        record = RunRecord(
            nodeid=request.node.nodeid,
            label=label,
            model=lora_session.base(lora_settings).source.label,
            device=device,
            device_name=device_name or device,
            r=max(linear.r for linear in shape.adapted),
            alpha=float(config.lora_alpha),
            targets=tuple(dict.fromkeys(linear.name.rsplit(".", 1)[-1] for linear in shape.adapted)),
            trainable_params=count.trainable,
            total_params=count.total,
            trainable_pct=count.percent,
            batch_size=batch_size,
            seq_len=seq_len,
            steps_per_round=steps_per_round,
            rounds=len(seconds),
            tokens_per_second=tokens_per_second,
            samples_per_second=tokens_per_second / seq_len,
            step_time_s=round_seconds / steps_per_round,
            peak_memory_bytes=peak_bytes,
            peak_memory_scope=scope,
            estimated_memory_bytes=estimate.total,
            flops_per_token=flops.model,
            hardware_flops_per_token=flops.hardware,
            achieved_flops_per_second=flops.model * tokens_per_second,
            peak_flops_per_second=peak.flops,
            mfu=mfu(flops.model, tokens_per_second, peak),
            mfu_note=peak.source,
            benchmark_disabled=bool(benchmark.disabled),
        )
        benchmark.extra_info.update(record.to_dict())
        request.node.user_properties.append((RUN_PROPERTY, record.to_dict()))
        return record

    yield run
    manager.detach()
