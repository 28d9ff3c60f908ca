"""A team's conftest.py: its own peak FLOP/s table and its own sweep log, through pytest-lora's hooks."""

import json

import pytest

# Dense bf16 TFLOP/s of the team's devices, matched in the name torch gives them ("cpu" on the CPU).
PEAK_TFLOPS = {"NVIDIA GB200": 2500.0, "cpu": 1.0}


@pytest.hookimpl(optionalhook=True)  # `pytest -p no:lora` still runs
def pytest_lora_device_peak_flops(device_name):
    for name, tflops in PEAK_TFLOPS.items():
        if name.lower() in device_name.lower():
            return tflops * 1e12
    return None  # not ours: pytest-lora's built-in table decides


@pytest.hookimpl(optionalhook=True)  # `pytest -p no:lora` still runs
def pytest_lora_sweep_decided(config, decision, report):
    entry = {"sweep": report.group, "chosen_rank": decision.chosen, "rule_met": decision.rule_met}
    with open(config.rootpath / "sweeps.jsonl", "a") as log:
        log.write(json.dumps(entry) + "\n")
    report.notes.append("logged to sweeps.jsonl")
