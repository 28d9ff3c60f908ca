"""scripts/gpu_check.sh --cpu runs every step of the GPU check on the CPU and writes a sane summary.

It takes minutes (the examples twice, a QLoRA step, the out-of-memory pair), more than the suite's budget,
so it is skipped unless PYTEST_LORA_GPU_CHECK=1 (`tox -e gpu-check-cpu`). PYTEST_LORA_GPU_CHECK_OUT keeps
the output folder (default: a temporary one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(
    os.environ.get("PYTEST_LORA_GPU_CHECK") != "1",
    reason="minutes long: set PYTEST_LORA_GPU_CHECK=1 (tox -e gpu-check-cpu)",
)

STEPS = ["examples-serial", "examples-n2", "qlora", "oom"]
FILES = {
    "summary.json",
    "summary.md",
    "qlora-benchmark.json",
    "setup.log",
    *(f"{step}.log" for step in STEPS),
}


@pytest.fixture(scope="module")
def gpu_check(tmp_path_factory):
    """(exit code, output, summary) of one `gpu_check.sh OUT --cpu` run, shared by the tests below."""
    out = Path(os.environ.get("PYTEST_LORA_GPU_CHECK_OUT") or tmp_path_factory.mktemp("gpu-check"))
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_LORA_")}
    env["PYTHON"] = sys.executable
    run = subprocess.run(
        ["bash", str(SCRIPT), str(out), "--cpu"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    summary = json.loads((out / "summary.json").read_text())
    return run, out, summary


def test_every_step_ran_and_passed(gpu_check):
    run, out, summary = gpu_check
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    assert summary["passed"] is True and summary["mode"] == "cpu"
    assert summary["setup"]["outcome"] == "passed" and summary["setup"]["installed"] == []
    assert [step["name"] for step in summary["steps"]] == STEPS
    for step in summary["steps"]:
        assert step["outcome"] == "passed", (step["name"], step["problems"])
        assert step["exit_code"] == 0 and step["seconds"] > 0
        assert step["tests"]["passed"] > 0 and not (step["tests"]["failures"] or step["tests"]["errors"])
    assert {path.name for path in out.iterdir()} >= FILES
    assert "# GPU check (cpu): PASSED" in (out / "summary.md").read_text()
    assert summary["wall_seconds"] <= summary["budget_seconds"] + 60


def test_the_versions_are_the_declared_ones(gpu_check):
    _, _, summary = gpu_check
    versions = summary["versions"]
    assert versions["python"]["ok"]
    assert {"torch", "transformers", "peft", "bitsandbytes", "pytest-xdist"} <= versions["packages"].keys()
    assert all(entry["ok"] for entry in versions["packages"].values())
    assert versions["pytest-lora"]["imported_from"] == str(ROOT / "pytest_lora")
    assert summary["device"].startswith("CPU")


def test_the_examples_ran_the_same_tests_serially_and_under_xdist(gpu_check):
    _, _, summary = gpu_check
    serial, parallel = (step for step in summary["steps"] if step["name"].startswith("examples"))
    assert serial["tests"]["tests"] == parallel["tests"]["tests"] >= 10
    assert "-n 2" in parallel["command"] and "--lora-device cpu" in serial["command"]
    assert {case["name"] for case in serial["test_cases"]} == {case["name"] for case in parallel["test_cases"]}


def test_the_qlora_figures_are_sane(gpu_check):
    _, out, summary = gpu_check
    qlora = next(step for step in summary["steps"] if step["name"] == "qlora")["figures"]
    low, high = qlora["by_rank"]["r=8"], qlora["by_rank"]["r=64"]
    for entry in (low, high):
        assert entry["shape"] == "small-llama" and entry["targets"] == "all-linear"
        assert entry["gradient_checkpointing"] is True and entry["device"] == "cpu"
        assert entry["tokens_per_second"] > 0 and entry["seconds_per_step"] > 0
        assert entry["flops_per_token"] > 0 and entry["hardware_flops_per_token"] > entry["flops_per_token"]
        assert entry["mfu"] is None  # no peak FLOP/s for a CPU
        assert entry["measured_bytes"] > 0 and entry["estimated_bytes"] > 0
        # On the CPU the measured figure is the process' peak RSS (the interpreter, torch and the libraries
        # included), so the deviation is reported, not held to a tolerance; on CUDA it is the allocator's.
        assert entry["estimate_error"] == pytest.approx(entry["estimated_bytes"] / entry["measured_bytes"] - 1)
        assert "process peak RSS" in entry["measured_source"]
    # 7 adapted linears per layer; r=64 trains 8x the parameters of r=8
    assert low["adapted_modules"] == high["adapted_modules"] == 14
    assert high["trainable_params"] == 8 * low["trainable_params"]
    assert qlora["r64_over_r8_trainable"] == pytest.approx(8)
    assert high["flops_per_token"] > low["flops_per_token"]
    assert high["estimated_bytes"] > low["estimated_bytes"]
    benchmarks = json.loads((out / "qlora-benchmark.json").read_text())["benchmarks"]
    assert sorted(bench["extra_info"]["r"] for bench in benchmarks) == [8, 64]


def test_the_out_of_memory_step_was_simulated_and_the_next_test_passed(gpu_check):
    _, _, summary = gpu_check
    oom = next(step for step in summary["steps"] if step["name"] == "oom")
    failure, following = oom["figures"]["out_of_memory"], oom["figures"]["next_test"]
    assert failure["mode"] == "simulated" and "simulated" in summary["oom_note"]
    assert failure["message"].startswith("out of memory in lora_train (batch 4 x seq ")
    assert "CUDA out of memory" in failure["message"]
    assert following["same_base"] and following["base_unchanged"] and following["changed_lora"] > 0
    assert oom["tests"] == {"tests": 2, "failures": 0, "errors": 0, "skipped": 0, "passed": 2}
