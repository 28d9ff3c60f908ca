"""`lora_benchmark` as users meet it, through pytest-benchmark's own options (pytester)."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch

from pytest_lora.core.flops import step_flops
from pytest_lora.core.report import RunRecord, rank_table, report_document
from pytest_lora.model.loading import TINY_LLAMA_CONFIG
from pytest_lora.model.shapes import model_shape

pytestmark = pytest.mark.lora

# Small and quick: the numbers are checked for consistency, never for speed.
RANK_TABLE = """
import pytest
from peft import LoraConfig

@pytest.mark.parametrize("r", [4, 8])
def test_rank(lora_benchmark, r):
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"])
    run = lora_benchmark(config, batch_size=2, seq_len=16, steps_per_round=1, rounds=2, warmup_rounds=1)
    assert run.tokens_per_second > 0
"""


def extra_info_by_name(path: Path) -> dict[str, dict]:
    document = json.loads(path.read_text())
    return {bench["name"]: bench for bench in document["benchmarks"]}


def tiny_flops_per_token(r: int, seq_len: int) -> float:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {key: value for key, value in TINY_LLAMA_CONFIG.items() if key != "architectures"}
    with torch.device("meta"):
        model = get_peft_model(
            LlamaForCausalLM(LlamaConfig(**fields)), LoraConfig(r=r, target_modules=["q_proj", "v_proj"])
        )
    return step_flops(model_shape(model), seq_len).model


def test_json_has_one_entry_per_rank_with_extra_info(lora_pytester: pytest.Pytester) -> None:
    lora_pytester.makepyfile(RANK_TABLE)
    result = lora_pytester.runpytest("--benchmark-json=out.json")
    result.assert_outcomes(passed=2)
    benches = extra_info_by_name(lora_pytester.path / "out.json")
    assert sorted(benches) == ["test_rank[4]", "test_rank[8]"]
    for r in (4, 8):
        bench = benches[f"test_rank[{r}]"]
        info = bench["extra_info"]
        assert bench["group"] == f"r={r} alpha={2 * r} q_proj,v_proj"
        assert bench["stats"]["rounds"] == 2
        assert (info["r"], info["alpha"], info["targets"]) == (r, 2 * r, ["q_proj", "v_proj"])
        assert info["trainable_params"] == 4 * r * (64 + 64 + 64 + 32)
        assert info["trainable_pct"] == pytest.approx(100 * info["trainable_params"] / info["total_params"])
        # the throughput comes from the timed rounds; samples and steps follow from it
        assert info["tokens_per_second"] == pytest.approx(2 * 16 / info["step_time_s"])
        assert info["samples_per_second"] == pytest.approx(info["tokens_per_second"] / 16)
        assert info["peak_memory_bytes"] > 0 and info["peak_memory_scope"].startswith("process peak")
        assert info["estimated_memory_bytes"] > 0
        assert info["flops_per_token"] == tiny_flops_per_token(r, 16)
        assert info["achieved_flops_per_second"] == pytest.approx(info["flops_per_token"] * info["tokens_per_second"])
        assert info["mfu"] is None and "--lora-peak-tflops" in info["mfu_note"]
        assert info["benchmark_disabled"] is False and info["rounds"] == 2


def test_peak_override_gives_an_mfu(lora_pytester: pytest.Pytester) -> None:
    lora_pytester.makepyfile(RANK_TABLE)
    result = lora_pytester.runpytest("--benchmark-json=out.json", "--lora-peak-tflops=0.001", "-k", "4")
    result.assert_outcomes(passed=1, deselected=1)
    info = extra_info_by_name(lora_pytester.path / "out.json")["test_rank[4]"]["extra_info"]
    assert info["mfu"] == pytest.approx(info["achieved_flops_per_second"] / 1e9)
    assert info["mfu_note"] == "--lora-peak-tflops 0.001"


def test_rank_table_in_the_summary_and_the_lora_report(lora_pytester: pytest.Pytester) -> None:
    lora_pytester.makepyfile(RANK_TABLE)
    result = lora_pytester.runpytest("--lora-report=reports/lora.json")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "*= lora =*",
            "LoRA rank table: builtin:tiny-llama on cpu, batch 2 x seq 16",
            "*config*trainable*%*tokens/s*time*peak mem*est. mem*MFU",
            "*r=4 alpha=8 q_proj,v_proj*3,584*n/a",
            "*r=8 alpha=16 q_proj,v_proj*7,168*n/a",
            "*peak mem: process peak (run); MFU: no accelerator*",
        ]
    )
    assert "1.00x" in result.stdout.str()
    report = json.loads((lora_pytester.path / "reports" / "lora.json").read_text())
    assert [run["label"] for run in report["runs"]] == ["r=4 alpha=8 q_proj,v_proj", "r=8 alpha=16 q_proj,v_proj"]
    assert report["runs"][0]["nodeid"] == "test_rank_table_in_the_summary_and_the_lora_report.py::test_rank[4]"


def test_benchmark_disable_runs_once_as_a_plain_test(lora_pytester: pytest.Pytester) -> None:
    lora_pytester.makepyfile(RANK_TABLE)
    result = lora_pytester.runpytest("--benchmark-disable", "--lora-report=lora.json")
    result.assert_outcomes(passed=2)
    assert "benchmark '" not in result.stdout.str()  # no pytest-benchmark table
    result.stdout.fnmatch_lines(["*batch 2 x seq 16, one untimed round each (pytest-benchmark disabled)"])
    runs = json.loads((lora_pytester.path / "lora.json").read_text())["runs"]
    assert [(run["rounds"], run["benchmark_disabled"]) for run in runs] == [(1, True), (1, True)]


def test_benchmark_skip_skips(lora_pytester: pytest.Pytester) -> None:
    lora_pytester.makepyfile(RANK_TABLE)
    result = lora_pytester.runpytest("--benchmark-skip")
    result.assert_outcomes(skipped=2)


def test_marker_group_is_kept_and_the_fixture_runs_once_per_test(lora_pytester: pytest.Pytester) -> None:
    lora_pytester.makepyfile(
        """
        import pytest

        CONFIG = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}

        @pytest.mark.benchmark(group="team group")
        def test_group(lora_benchmark):
            lora_benchmark(CONFIG, batch_size=2, seq_len=16, steps_per_round=1, rounds=1, warmup_rounds=0)

        def test_twice(lora_benchmark):
            lora_benchmark(CONFIG, batch_size=2, seq_len=16, steps_per_round=1, rounds=1, warmup_rounds=0)
            lora_benchmark(CONFIG, batch_size=2, seq_len=16, steps_per_round=1, rounds=1, warmup_rounds=0)

        def test_bad_rounds(lora_benchmark):
            lora_benchmark(CONFIG, rounds=0)
        """
    )
    result = lora_pytester.runpytest("--benchmark-json=out.json")
    result.assert_outcomes(passed=1, failed=2)
    assert extra_info_by_name(lora_pytester.path / "out.json")["test_group"]["group"] == "team group"
    result.stdout.fnmatch_lines(
        [
            "*lora_benchmark can run once per test*",
            "*fix: parametrize the test over the configs*",
            "*lora_benchmark: rounds=0: must be an int >= 1*",
        ]
    )


SLOWABLE = """
import os
import time

import pytest
import torch

@pytest.fixture(autouse=True)
def slowdown(lora_base_model, monkeypatch):
    # one thread: a busy machine then slows the step a little, instead of stalling OpenMP's spin-waits
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    delay = float(os.environ.get("LORA_TEST_DELAY", "0"))
    if delay:
        layer = lora_base_model.model.layers[0].mlp
        original = layer.forward

        def slow_forward(*args, **kwargs):
            time.sleep(delay)
            return original(*args, **kwargs)

        monkeypatch.setattr(layer, "forward", slow_forward)
    yield
    torch.set_num_threads(threads)

def test_rank(lora_benchmark):
    config = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    lora_benchmark(config, batch_size=1, seq_len=8, steps_per_round=1, rounds=5, warmup_rounds=1)
"""


def test_compare_fail_catches_a_deliberate_slowdown(
    lora_pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A saved baseline, then the same benchmark with a sleep in the model's forward: the gate fails.

    The sleep (200 ms) dwarfs the one-thread step (~5 ms, a few times that on a busy machine) and the
    gate compares the fastest round, so the test holds on a busy CI runner.
    """
    lora_pytester.makepyfile(SLOWABLE)
    storage = f"--benchmark-storage=file://{lora_pytester.path / 'bench'}"
    baseline = lora_pytester.runpytest(storage, "--benchmark-save=baseline")
    baseline.assert_outcomes(passed=1)
    same = lora_pytester.runpytest(storage, "--benchmark-compare=0001", "--benchmark-compare-fail=min:1000%")
    assert same.ret == 0, same.stderr.str()
    same.stderr.fnmatch_lines(["Comparing against benchmarks from: *0001_baseline.json"])
    monkeypatch.setenv("LORA_TEST_DELAY", "0.2")
    slow = lora_pytester.runpytest(storage, "--benchmark-compare=0001", "--benchmark-compare-fail=min:100%")
    assert slow.ret != 0
    slow.stderr.fnmatch_lines(
        ["*Performance has regressed:", "*test_rank (0001_baselin) - Field 'min' has failed PercentageRegressionCheck*"]
    )


def test_out_of_memory_fails_that_test_and_the_next_ones_run(lora_pytester: pytest.Pytester) -> None:
    """A CUDA OOM raised once from inside the forward pass (the real code path, faked on the CPU)."""
    lora_pytester.makepyfile(
        """
        import torch

        CONFIG = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}

        def test_oom(lora_benchmark, lora_base_model, monkeypatch):
            layer = lora_base_model.model.layers[1].mlp
            original = layer.forward
            raised = []

            def forward(*args, **kwargs):
                if not raised:
                    raised.append(True)
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
                return original(*args, **kwargs)

            monkeypatch.setattr(layer, "forward", forward)
            lora_benchmark(CONFIG, batch_size=2, seq_len=16, steps_per_round=1, rounds=1, warmup_rounds=0)

        def test_next_benchmark(lora_benchmark):
            lora_benchmark(CONFIG, batch_size=2, seq_len=16, steps_per_round=1, rounds=1, warmup_rounds=0)

        def test_next_training(lora_train):
            result = lora_train(CONFIG, steps=2, batch_size=2, seq_len=16)
            assert result.base_unchanged and result.changed_lora
        """
    )
    result = lora_pytester.runpytest("--lora-verify-base")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*out of memory in lora_benchmark (r=8 alpha=16 q_proj,v_proj, batch 2 x seq 16) on cpu: "
            "CUDA out of memory. Tried to allocate 20.00 GiB",
            "*measured peak before the failure: *",
            "*estimated peak of this step: *",
            "*LoRA weights*",
            "*lower r*fewer modules*smaller batch*gradient checkpointing*",
            "*the memory was freed*",
        ]
    )
    result.stdout.fnmatch_lines(["*--lora-verify-base: base weights identical at start and end*"])


def test_under_xdist_records_reach_the_controller(lora_pytester: pytest.Pytester) -> None:
    """pytest-benchmark disables itself under xdist; each test still runs once and the table is complete."""
    lora_pytester.makepyfile(RANK_TABLE)
    result = lora_pytester.runpytest_subprocess("-n", "1", "--lora-report=lora.json")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        ["*one untimed round each (pytest-benchmark disabled)", "*r=4 alpha=8 q_proj,v_proj*", "*r=8 alpha=16*"]
    )
    runs = json.loads((lora_pytester.path / "lora.json").read_text())["runs"]
    assert sorted(run["r"] for run in runs) == [4, 8]


def test_the_throughput_example_writes_one_entry_per_rank(lora_pytester: pytest.Pytester) -> None:
    """`pytest -m lora examples/ --benchmark-json=out.json`, on a copy of examples/test_throughput.py."""
    example = Path(__file__).parents[1] / "examples" / "test_throughput.py"
    # another module name: a session that collects examples/ too has `test_throughput` imported already
    shutil.copy(example, lora_pytester.path / "test_throughput_copy.py")
    result = lora_pytester.runpytest("-m", "lora", "--benchmark-json=out.json")
    result.assert_outcomes(passed=4)
    benches = extra_info_by_name(lora_pytester.path / "out.json")
    per_rank = {
        bench["extra_info"]["r"]: bench for name, bench in benches.items() if name.startswith("test_throughput")
    }
    assert sorted(per_rank) == [4, 8, 16]
    for r, bench in per_rank.items():
        assert bench["group"] == f"r={r} alpha={2 * r} q_proj,v_proj"
        assert {"tokens_per_second", "peak_memory_bytes", "estimated_memory_bytes", "flops_per_token", "mfu"} <= set(
            bench["extra_info"]
        )


def _record(nodeid: str, r: int, alpha: float, targets=("q_proj", "v_proj"), model="builtin:tiny-llama") -> RunRecord:
    return RunRecord(
        nodeid=nodeid,
        label=f"r={r} alpha={alpha:g} {','.join(targets)}",
        model=model,
        device="cpu",
        device_name="cpu",
        r=r,
        alpha=alpha,
        targets=targets,
        trainable_params=896 * r,
        total_params=231_744,
        trainable_pct=100 * 896 * r / 231_744,
        batch_size=2,
        seq_len=16,
        steps_per_round=1,
        rounds=1,
        tokens_per_second=1000.0 / r,
        samples_per_second=62.5 / r,
        step_time_s=0.001 * r,
        peak_memory_bytes=2**20,
        peak_memory_scope="process peak (run)",
        estimated_memory_bytes=2**20,
        flops_per_token=1e6,
        hardware_flops_per_token=1.3e6,
        achieved_flops_per_second=1e9,
        peak_flops_per_second=None,
        mfu=None,
        mfu_note="no accelerator",
        benchmark_disabled=True,
    )


def test_the_rank_table_and_the_report_do_not_depend_on_test_order() -> None:
    """pytest-randomly or xdist scheduling changes the arrival order; the table and the JSON list stay the same."""
    records = [
        _record("t.py::test[16]", 16, 32),
        _record("t.py::test[4]", 4, 8),
        _record("t.py::test_q[8]", 8, 16, targets=("q_proj",)),
        _record("t.py::test[8]", 8, 16),
        _record("u.py::test[4]", 4, 8, model="other/model"),
    ]
    table, runs = rank_table(records), report_document(records)["runs"]
    assert [run["nodeid"] for run in runs] == [
        "t.py::test[4]",
        "t.py::test_q[8]",
        "t.py::test[8]",
        "t.py::test[16]",
        "u.py::test[4]",
    ]
    assert table[0] == "LoRA rank table: builtin:tiny-llama on cpu, batch 2 x seq 16, one untimed round each " + (
        "(pytest-benchmark disabled)"
    )
    for order in itertools.permutations(records):
        assert rank_table(order) == table
        assert report_document(order)["runs"] == runs
