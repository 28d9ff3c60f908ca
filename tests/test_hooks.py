"""pytest-lora's hooks, as a team's conftest.py uses them (pytester): its own peak FLOP/s and sweep log."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pytest_lora.core.errors import LoraError
from pytest_lora.plugin.bench import device_peak

pytestmark = pytest.mark.lora

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hooks_conftest.py"

TESTS = """
import pytest
from peft import LoraConfig

from pytest_lora import synthetic_data

DATA = synthetic_data(256, 16, n_train=16, n_val=4)


def test_throughput(lora_benchmark):
    run = lora_benchmark(LoraConfig(r=4, target_modules=["q_proj"]), batch_size=2, seq_len=16, steps_per_round=1,
                         rounds=1, warmup_rounds=0)
    assert run.mfu == pytest.approx(run.achieved_flops_per_second / 1e12)
    assert run.mfu_note == "pytest_lora_device_peak_flops: 1 TFLOP/s for cpu"


@pytest.mark.lora(sweep=[2])
def test_sweep(lora_sweep):
    lora_sweep.run({"target_modules": ["q_proj"]}, steps=1, dataset=DATA, seq_len=16, batch_size=4)
"""


def test_the_readme_conftest_sets_the_peak_and_logs_each_sweep(lora_pytester: pytest.Pytester) -> None:
    shutil.copy(EXAMPLE, lora_pytester.path / "conftest.py")
    lora_pytester.makepyfile(test_team=TESTS)
    result = lora_pytester.runpytest("--lora-sweep-dir=out", "--benchmark-disable")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        ["*lora rank sweep*", "test_team.py::test_sweep:", "*chosen rank: r=2*", "  logged to sweeps.jsonl"]
    )
    (entry,) = [json.loads(line) for line in (lora_pytester.path / "sweeps.jsonl").read_text().splitlines()]
    assert entry["sweep"] == "test_team.py::test_sweep" and entry["chosen_rank"] == 2


def test_the_command_line_peak_wins_over_the_hook_and_a_bad_peak_is_named(pytester: pytest.Pytester) -> None:
    class Peaks:
        value: object = None

        def pytest_lora_device_peak_flops(self, device_name: str) -> object:
            return self.value

    config = pytester.parseconfigure()
    peaks = Peaks()
    config.pluginmanager.register(peaks)
    assert device_peak(config, None, "cpu", None).source.startswith("no accelerator")  # None: the built-in table
    peaks.value = 3e12
    assert device_peak(config, None, "cpu", None).flops == 3e12
    assert device_peak(config, None, "cpu", 2.0).source == "--lora-peak-tflops 2"
    for bad in (-1.0, float("nan"), "1e12", True):
        peaks.value = bad
        with pytest.raises(LoraError, match=r"returned .*\n  fix: return the peak in FLOP/s as a number > 0"):
            device_peak(config, None, "cpu", None)
