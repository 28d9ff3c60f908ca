"""pytest-lora's hooks: extension points a conftest.py or a plugin implements instead of patching pytest-lora.

Added with `pytest_addhooks` (as pytest-benchmark does), so pytest checks implementations' argument names.
An implementation takes any subset of the arguments, by name, like any pytest hook.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pytest_lora.core.sweep import SweepDecision
    from pytest_lora.plugin.sweep import SweepReport


@pytest.hookspec(firstresult=True)
def pytest_lora_device_peak_flops(device_name: str) -> float | None:
    """The peak FLOP/s of the device named `device_name`, for the MFU figure of `lora_benchmark`.

    `device_name` is what torch calls the GPU (`torch.cuda.get_device_name()`, e.g. "NVIDIA H100 80GB HBM3"),
    or "cpu". Return a number > 0 (FLOP/s, not TFLOP/s), or None to leave the device to the next
    implementation and then to pytest-lora's built-in table of dense bf16 datasheet peaks.
    `--lora-peak-tflops` still wins over every implementation. The first non-None result is used.
    """


@pytest.hookspec
def pytest_lora_sweep_decided(config: pytest.Config, decision: SweepDecision, report: SweepReport) -> None:
    """A rank sweep was decided: called once per sweep group, on the xdist controller (or the serial run).

    `decision` holds the chosen rank, the rule and one row per rank; `report` the sweep's node id
    (`report.group`), its provenance (base model, dataset fingerprint, commit, ...) and the report files
    already written (`report.paths`). Append a line to `report.notes` to show it under the sweep in the
    terminal summary. `--lora-mlflow URI` registers the MLflow logger as an implementation of this hook.
    """
