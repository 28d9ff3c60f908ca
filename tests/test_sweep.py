"""The rank sweep: the selection rule (pure), its report, and the sweep as parametrized items (pytester, xdist)."""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import pytest

from pytest_lora import assert_no_plateau
from pytest_lora.core.errors import LoraAssertionError, TrainingError
from pytest_lora.core.policy import SweepRule
from pytest_lora.core.sweep import (
    SweepPoint,
    choose_rank,
    decide,
    markdown,
    metric_threshold,
    quality,
    report_data,
)
from pytest_lora.model.planted import DEFAULT_DATASET, planted_data, planted_rank
from pytest_lora.plugin.sweep import SWEEP_DIR_OPTION, _calibration, write_report

pytestmark = pytest.mark.lora

ACCURACY = SweepRule(ranks=(8, 16, 32), metric="accuracy", higher_is_better=True)
# The guide's worked example: accuracy 92% / 94% / 94.1% at r = 8 / 16 / 32, time growing with r.
GUIDE = [SweepPoint(8, 0.92, 10.0), SweepPoint(16, 0.94, 20.0), SweepPoint(32, 0.941, 40.0)]
LOSS = {"metric_name": "val_loss", "higher_is_better": False, "ceiling": None}


def test_the_guides_worked_example_chooses_r16() -> None:
    """92% vs 94.1% is 35% more errors, not 2% less accuracy: r=8 falls short, r=16 is the answer."""
    decision = choose_rank(GUIDE, ACCURACY, ceiling=1.0)
    assert (decision.chosen, decision.rule_met, decision.best_rank) == (16, True, 32)
    assert [round(row.quality, 3) for row in decision.rows] == [0.738, 0.983, 1.0]
    assert [row.time_share for row in decision.rows] == [0.25, 0.5, 1.0]
    assert metric_threshold(0.941, ACCURACY, ceiling=1.0) == pytest.approx(1 - 0.059 / 0.95)
    percent = [SweepPoint(p.rank, p.metric * 100, p.seconds) for p in GUIDE]
    assert choose_rank(percent, ACCURACY, ceiling=100).chosen == 16
    # Without a ceiling the comparison is metric / best (97.8% for r=8): the guide's answer needs the ceiling.
    assert choose_rank(GUIDE, ACCURACY).chosen == 8


def test_loss_like_metric_is_compared_as_best_over_metric() -> None:
    rule = SweepRule(ranks=(4, 8, 16))
    points = [SweepPoint(4, 2.20, 1.0), SweepPoint(8, 2.05, 2.0), SweepPoint(16, 2.00, 4.0)]
    decision = choose_rank(points, rule)
    assert [round(row.quality, 4) for row in decision.rows] == [0.9091, 0.9756, 1.0]
    assert (decision.chosen, decision.rule_met) == (8, True)  # 2.05 <= 2.00 / 0.95 = 2.105
    assert "smallest rank with >= 95% of the best val_loss (97.6%) in <= 70% of the longest time (50%)" in (
        decision.summary()
    )


def test_when_no_rank_is_faster_the_smallest_good_rank_is_chosen_and_the_rule_is_not_met() -> None:
    """On a small model every rank takes about as long: the time condition cannot separate them."""
    points = [SweepPoint(4, 2.02, 1.0), SweepPoint(8, 2.00, 0.98), SweepPoint(16, 2.01, 0.99)]
    decision = choose_rank(points, SweepRule())
    assert (decision.chosen, decision.rule_met) == (4, False)
    assert "no rank reached >= 95% of the best val_loss in <= 70% of the longest time (r=4 took 100%)" in (
        decision.reason
    )


def test_time_threshold_can_pick_a_larger_but_faster_rank() -> None:
    points = [SweepPoint(4, 1.0, 10.0), SweepPoint(8, 1.0, 5.0), SweepPoint(16, 1.0, 9.0)]
    assert choose_rank(points, SweepRule(ranks=(4, 8, 16))).chosen == 8


def test_the_time_side_compares_model_flops_so_timing_noise_cannot_move_the_choice() -> None:
    """r=16 happened to run while the machine was idle: on seconds it looks 40% faster and wins; on FLOPs it
    is the costliest run, as it is, and the choice stays with the smallest rank good enough."""
    rule = SweepRule(ranks=(4, 8, 16))
    points = [
        SweepPoint(4, 2.2, 10.0, flops=1.0e9),
        SweepPoint(8, 2.0, 10.0, flops=1.1e9),
        SweepPoint(16, 2.0, 6.0, flops=1.3e9),
    ]
    decision = choose_rank(points, rule)
    assert (decision.time_basis, decision.chosen, decision.rule_met) == ("model FLOPs", 8, False)
    assert [round(row.time_share, 3) for row in decision.rows] == [0.769, 0.846, 1.0]
    assert "no rank reached >= 95% of the best val_loss in <= 70% of the most model FLOPs (r=8 took 85%)" in (
        decision.reason
    )
    on_seconds = choose_rank([dataclasses.replace(p, flops=None) for p in points], rule)
    assert (on_seconds.time_basis, on_seconds.chosen, on_seconds.rule_met) == ("measured seconds", 16, True)
    mixed = choose_rank([*points[:2], dataclasses.replace(points[2], flops=None)], rule)
    assert mixed.time_basis == "measured seconds", "one rank without FLOPs: all are compared on seconds"
    records = [{"rank": p.rank, "metric": p.metric, "seconds": p.seconds, "flops": p.flops, **LOSS} for p in points]
    assert decide(records, rule).chosen == 8
    data = report_data(decision, {})
    assert data["rule"]["time_basis"] == "model FLOPs" and data["ranks"][2]["flops"] == 1.3e9
    assert "| 8 | 2 | 100.0% | 10 | 1.1e+09 | 85% | yes | no | **r=8** |" in markdown(decision, "flops")


def test_planted_dataset_names() -> None:
    assert planted_rank("builtin:planted-rank-8") == planted_rank(DEFAULT_DATASET) == 8
    assert planted_rank("builtin:planted-rank-12") == 12
    assert planted_rank("data.jsonl") is None and planted_rank(None) is None
    for bad in ("builtin:planted-rank-0", "builtin:planted-rank-x", "builtin:planted-rank-"):
        with pytest.raises(TrainingError, match=f"dataset = '{bad}': the planted rank must be an int >= 1"):
            planted_rank(bad)


def test_a_planted_rank_the_head_cannot_hold_is_refused(lora_base_model) -> None:
    with pytest.raises(TrainingError, match=r"rank 65 is larger than the head allows \(input size 64, 64 planted"):
        planted_data(lora_base_model, 65, seq_len=8)
    with pytest.raises(TrainingError, match="rank=0: the planted rank must be an int >= 1"):
        planted_data(lora_base_model, 0, seq_len=8)


def test_diverged_runs_never_win_and_bad_input_is_refused() -> None:
    points = [SweepPoint(4, math.nan, 1.0), SweepPoint(8, 2.0, 1.0), SweepPoint(16, 2.0, 3.0)]
    decision = choose_rank(points, SweepRule())
    assert (decision.rows[0].quality, decision.chosen) == (0.0, 8)
    with pytest.raises(ValueError, match="no sweep results"):
        choose_rank([], SweepRule())
    with pytest.raises(ValueError, match="each rank must appear once"):
        choose_rank([SweepPoint(4, 1.0, 1.0), SweepPoint(4, 1.0, 1.0)], SweepRule())
    with pytest.raises(ValueError, match="every run diverged"):
        choose_rank([SweepPoint(4, math.inf, 1.0)], SweepRule())
    with pytest.raises(ValueError, match="must be >= 0, like a loss"):
        quality(-1.0, 2.0, higher_is_better=False)
    with pytest.raises(ValueError, match="above its ceiling"):
        quality(1.2, 0.9, higher_is_better=True, ceiling=1.0)
    assert quality(0.0, 0.0, higher_is_better=False) == 1.0


def test_records_from_the_items_decide_with_the_policys_thresholds() -> None:
    record = {"metric_name": "accuracy", "higher_is_better": True, "ceiling": 1.0}
    records = [{"rank": p.rank, "metric": p.metric, "seconds": p.seconds, **record} for p in GUIDE]
    decision = decide(records, SweepRule())
    assert (decision.chosen, decision.rule.metric, decision.rows[0].point.details) == (16, "accuracy", record)
    with pytest.raises(ValueError, match="different metrics"):
        decide([*records[:2], {**records[2], "metric_name": "val_loss"}], SweepRule())
    with pytest.raises(ValueError, match="no rank has a result"):
        decide([], SweepRule())


def test_report_data_and_markdown_carry_the_rule_and_the_choice() -> None:
    decision = choose_rank(GUIDE, ACCURACY, ceiling=1.0)
    data = report_data(decision, {"base_model": "llama-70b", "dataset_fingerprint": "abc"})
    assert data["chosen_rank"] == 16 and data["base_model"] == "llama-70b"
    assert data["rule"]["metric_fraction"] == 0.95 and data["rule"]["time_fraction"] == 0.7
    assert data["rule"]["metric_ceiling"] == 1.0 and "error ratio" in data["rule"]["definition"]
    assert [row["rank"] for row in data["ranks"]] == [8, 16, 32]
    table = markdown(decision, "guide")
    assert "| 16 | 0.94 | 98.3% | 20 |  | 50% | yes | yes | **r=16** |" in table
    assert "| share of longest time | >= 95% of best | <= 70% of longest time | chosen |" in table


def test_plots_are_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    paths, notes = write_report(choose_rank(GUIDE, ACCURACY, ceiling=1.0), {"sweep": "guide"}, tmp_path, "guide")
    assert [p.name for p in paths] == ["guide.json", "guide.md"]
    assert notes == ["plots skipped: matplotlib is not installed (pip install 'pytest-lora[plots]')"]
    assert json.loads((tmp_path / "guide.json").read_text())["chosen_rank"] == 16


def test_plots_are_written_with_matplotlib(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    paths, notes = write_report(choose_rank(GUIDE, ACCURACY, ceiling=1.0), {"sweep": "guide"}, tmp_path, "guide")
    assert notes == [] and paths[-1].name == "guide.png"
    assert paths[-1].read_bytes().startswith(b"\x89PNG")


def test_ranks_from_the_command_line_and_the_marker_make_the_items(lora_pytester: pytest.Pytester) -> None:
    lora_pytester.makepyfile(
        """
        import pytest

        def test_default(lora_sweep):
            pass

        @pytest.mark.lora(sweep=[2, 32])
        def test_marked(lora_sweep):
            pass
        """
    )
    result = lora_pytester.runpytest("--collect-only", "-q")
    result.stdout.fnmatch_lines(
        [
            "*::test_default[[]r=4]",
            "*::test_default[[]r=8]",
            "*::test_default[[]r=16]",
            "*::test_marked[[]r=2]",
            "*::test_marked[[]r=32]",
        ]
    )
    result = lora_pytester.runpytest("--collect-only", "-q", "--lora-sweep", "1,64")
    result.stdout.fnmatch_lines(["*::test_default[[]r=1]", "*::test_default[[]r=64]", "*::test_marked[[]r=2]"])


SWEEPS = """
import pytest

from pytest_lora import synthetic_data

TARGETS = {"target_modules": ["q_proj", "v_proj"]}
DATA = synthetic_data(256, 32, n_train=80, n_val=8)  # small: the runs are 3 steps long


def accuracy(model, val_ids):
    \"\"\"A stand-in metric with known values per rank, so the expected choice is exact.\"\"\"
    return {4: 0.80, 8: 0.94, 16: 0.941}[model.peft_config["default"].r]


def test_accuracy_sweep(lora_sweep):
    lora_sweep.run(TARGETS, metric=accuracy, higher_is_better=True, ceiling=1.0, dataset=DATA, seq_len=32)
    assert lora_sweep.rank != 16, "r=16 fails after its run, so it is left out of the choice"


@pytest.mark.lora(sweep=[4, 8])
def test_loss_sweep(lora_sweep):
    assert lora_sweep.run(TARGETS, dataset=DATA, seq_len=32) > 0


@pytest.mark.lora(sweep=[4])
def test_wrong_rank(lora_sweep):
    lora_sweep.run({"r": 8, **TARGETS}, dataset=DATA, seq_len=32)
"""


PLANTED = """
import pytest

HEAD = {"target_modules": ["lm_head"]}


def test_planted(lora_sweep):
    lora_sweep.run(HEAD, steps=100, lr=3e-2, batch_size=32, seq_len=32)


@pytest.mark.lora(sweep=[8])
def test_planted_without_the_head(lora_sweep):
    lora_sweep.run({"target_modules": ["q_proj", "v_proj"]}, seq_len=32)
"""


def _reports(directory) -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(directory.glob("*.json"))}


@pytest.fixture
def one_thread(monkeypatch: pytest.MonkeyPatch):
    """Tiny CPU runs on a shared 2-core machine: two OpenMP threads per process make each op ~50x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the xdist workers
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_sweep_items_choose_the_same_rank_serially_and_under_xdist(lora_pytester: pytest.Pytester) -> None:
    """Both in file order (`-p no:randomly`); the planted sweep (100 steps, the others 3) must choose r=8."""
    lora_pytester.makepyprojecttoml("[tool.pytest_lora.policy.sweep]\nsteps = 3\n")
    lora_pytester.makepyfile(test_sweeps=SWEEPS, test_planted=PLANTED)
    serial_dir, xdist_dir = lora_pytester.path / "serial", lora_pytester.path / "xdist"
    in_order = ("-p", "no:randomly")
    result = lora_pytester.runpytest(*in_order, f"{SWEEP_DIR_OPTION}={serial_dir}")
    result.assert_outcomes(passed=7, failed=3)
    result.stdout.fnmatch_lines(
        [
            "*AdapterConfigError: dataset builtin:planted-rank-8 (seed 0: base + a rank-8 update of lm_head): "
            "the planted rank-8 update is on the output head 'lm_head', but the config adapts q_proj, v_proj;*",
            "*fix: add 'lm_head' to target_modules for the calibration, or pass your own dataset=",
            "*this item is the r=4 run of the sweep, but the config has r=8*",
            "*= lora rank sweep =*",
            "test_planted.py::test_planted:",
            "  r=4    val_loss * FLOPs (* of most model FLOPs)",
            "  chosen rank: r=8 (rule NOT met: *",
            "  calibration passed: the data plants rank 8 and the sweep chose r=8 (floor *, base *)",
            "*",
            "test_planted.py::test_planted_without_the_head:",
            "  left out of the choice: r=8 (failed)",
            "test_sweeps.py::test_accuracy_sweep:",
            "  left out of the choice: r=16 (failed)",
            "  r=4    accuracy 0.8 (30.0% of best)*",
            "  r=8    accuracy 0.94 (100.0% of best)*",
            "  chosen rank: r=8 (*",
            "  report: */serial/test_sweeps.test_accuracy_sweep.json*",
            "test_sweeps.py::test_loss_sweep:",
            "  chosen rank: r=*",
            "test_sweeps.py::test_wrong_rank:",
            "  left out of the choice: r=4 (failed)",
            "  no rank chosen: no rank has a result*",
        ]
    )
    serial = _reports(serial_dir)
    accuracy = serial["test_sweeps.test_accuracy_sweep"]
    assert accuracy["chosen_rank"] == 8 and accuracy["ranks_left_out"] == ["r=16 (failed)"]
    assert accuracy["rule"]["definition"].startswith("higher is better, ceiling 1")
    loss = serial["test_sweeps.test_loss_sweep"]
    row = loss["ranks"][0]
    assert (row["metric_name"], row["steps"], row["train_sequences"]) == ("val_loss", 3, 8)
    assert row["config"]["target_modules"] == ["q_proj", "v_proj"] and row["config"]["lora_alpha"] == 8
    assert loss["base_model"] == "builtin:tiny-llama" and len(loss["dataset_fingerprint"]) == 16
    assert loss["versions"]["peft"] and "git_commit" in loss
    _check_planted(serial["test_planted.test_planted"])

    result = lora_pytester.runpytest_subprocess(*in_order, "-n", "2", f"{SWEEP_DIR_OPTION}={xdist_dir}")
    result.assert_outcomes(passed=7, failed=3)
    parallel = _reports(xdist_dir)
    assert parallel.keys() == serial.keys()
    for name, report in serial.items():
        assert parallel[name]["chosen_rank"] == report["chosen_rank"], name
        assert parallel[name]["dataset_fingerprint"] == report["dataset_fingerprint"], name
        assert [r["metric"] for r in parallel[name]["ranks"]] == pytest.approx([r["metric"] for r in report["ranks"]])
    _check_planted(parallel["test_planted.test_planted"])


def _check_planted(report: dict) -> None:
    """builtin:planted-rank-8: r=4 cannot fit the update and stays far above the floor; r=8 and r=16 fit it."""
    losses = {row["rank"]: row["metric"] for row in report["ranks"]}
    floor, base = report["ranks"][0]["planted_floor"], report["ranks"][0]["planted_base_loss"]
    assert losses[4] > 1.1 * losses[8] and losses[16] < 1.05 * losses[8], losses
    assert floor < losses[8] < base / 2, (floor, losses, base)
    assert (report["chosen_rank"], report["calibration"]) == (8, {"planted_rank": 8, "passed": True})
    assert report["rule"]["time_basis"] == "model FLOPs" and all(row["flops"] > 0 for row in report["ranks"])


READ_STORE = """
import json, sys
from mlflow.tracking import MlflowClient
from pytest_lora.integrations.mlflow import EXPERIMENT

client = MlflowClient(tracking_uri=sys.argv[1])
runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
print(json.dumps([
    {"id": r.info.run_id, "tags": r.data.tags, "params": r.data.params, "metrics": r.data.metrics,
     "artifacts": [a.path for a in client.list_artifacts(r.info.run_id)]}
    for r in runs
]))
"""


@pytest.mark.usefixtures("one_thread")
def test_sweep_is_logged_to_mlflow_one_run_per_rank_plus_the_decision(lora_pytester: pytest.Pytester) -> None:
    import importlib.util
    import subprocess

    if importlib.util.find_spec("mlflow") is None or importlib.util.find_spec("sqlalchemy") is None:
        pytest.skip("needs pytest-lora[mlflow]")
    lora_pytester.makepyprojecttoml("[tool.pytest_lora.policy.sweep]\nsteps = 3\n")
    lora_pytester.makepyfile(test_sweeps=SWEEPS)
    uri = f"sqlite:///{lora_pytester.path / 'mlflow.db'}"
    # MLflow runs in subprocesses only: importing its store here (SQLAlchemy, Alembic, Jinja2) and letting
    # pytester's module snapshot drop part of it breaks later in-process runs of other tests.
    result = lora_pytester.runpytest_subprocess(
        f"{SWEEP_DIR_OPTION}={lora_pytester.path / 'out'}", "--lora-mlflow", uri
    )
    result.assert_outcomes(passed=4, failed=2)
    result.stdout.fnmatch_lines([f"  MLflow: logged to {uri} (decision run *, one child run per rank)"])
    store = subprocess.run([sys.executable, "-c", READ_STORE, uri], capture_output=True, text=True, check=True)
    runs = json.loads(store.stdout.strip().splitlines()[-1])
    decisions = {r["tags"]["pytest_lora.sweep"]: r for r in runs if "mlflow.parentRunId" not in r["tags"]}
    accuracy = decisions["test_sweeps.py::test_accuracy_sweep"]
    assert accuracy["params"]["chosen_rank"] == "8" and accuracy["params"]["metric"] == "accuracy"
    children = [r for r in runs if r["tags"].get("mlflow.parentRunId") == accuracy["id"]]
    assert sorted(int(r["params"]["rank"]) for r in children) == [4, 8]
    assert {r["metrics"]["accuracy"] for r in children} == {0.80, 0.94}
    assert "test_sweeps.test_accuracy_sweep.json" in accuracy["artifacts"]


def test_mlflow_option_without_mlflow_is_a_usage_error(lora_pytester: pytest.Pytester, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    result = lora_pytester.runpytest("--lora-mlflow", "sqlite:///x.db")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--lora-mlflow sqlite:///x.db: MLflow is not installed.*"])


def test_shown_shares_never_contradict_the_verdict() -> None:
    """0.7004 of the longest time fails `<= 70%` and 0.94999 of the best fails `>= 95%`: shown so, not as 70%, 95.0%."""
    points = [SweepPoint(4, 2.0 / 0.94999, 10.0), SweepPoint(8, 2.0, 70.04), SweepPoint(16, 2.0, 100.0)]
    decision = choose_rank(points, SweepRule(ranks=(4, 8, 16)))
    assert (decision.chosen, decision.rule_met) == (8, False)
    assert decision.reason == (
        "no rank reached >= 95% of the best val_loss in <= 70% of the longest time (r=8 took 70.04%); "
        "chose the smallest rank reaching >= 95% of the best val_loss (100.0%)"
    )
    table = markdown(decision, "near the thresholds")
    assert "| 4 | 2.105 | 94.999% | 10 |  | 10% | no | yes |  |" in table
    assert "| 8 | 2 | 100.0% | 70 |  | 70.04% | yes | no | **r=8** |" in table
    exact = choose_rank([SweepPoint(8, 2.0, 70.0), SweepPoint(16, 2.0, 100.0)], SweepRule(ranks=(8, 16)))
    assert exact.rule_met and "(100.0%) in <= 70% of the longest time (70%)" in exact.reason


def _order(result: pytest.RunResult) -> list[str]:
    return [r.nodeid for r in result.reprec.getreports("pytest_runtest_logreport") if r.when == "call"]


@pytest.mark.usefixtures("one_thread")
def test_the_planted_sweep_chooses_the_same_rank_in_random_orders(lora_pytester: pytest.Pytester) -> None:
    """pytest-randomly seeds 1, 2, 3 run the items in three different orders; the choice stays r=8, as in file
    order and under xdist (the test above), because the time side compares FLOPs, not seconds.

    Skipped where pytest-randomly is not installed (the dev extra has it)."""
    pytest.importorskip("pytest_randomly", reason="needs pytest-randomly for the random orders")
    lora_pytester.makepyfile(test_planted=PLANTED)
    reports, orders = [], set()
    for seed in (1, 2, 3):
        directory = lora_pytester.path / f"seed-{seed}"
        result = lora_pytester.runpytest(
            "-p",
            "randomly",
            f"--randomly-seed={seed}",
            f"{SWEEP_DIR_OPTION}={directory}",
        )
        result.assert_outcomes(passed=3, failed=1)
        result.stdout.fnmatch_lines([f"Using --randomly-seed={seed}"])
        orders.add(tuple(_order(result)))
        reports.append(_reports(directory)["test_planted.test_planted"])
    assert len(orders) == 3, orders
    for report in reports:
        _check_planted(report)
        assert report["dataset_fingerprint"] == reports[0]["dataset_fingerprint"]
        assert [r["metric"] for r in report["ranks"]] == pytest.approx([r["metric"] for r in reports[0]["ranks"]])


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("rank", [4, 8, 16])
def test_no_plateau_agrees_with_the_planted_rank(lora_base_model, lora_train, rank: int) -> None:
    """Below k the loss stops approaching the floor (the teacher's own loss); at and above k it keeps closing in.

    Judged on the validation loss's excess over the floor, the last third of the run against the rest: below
    k it gains < 10% (measured over planted seeds 0-4: at most 8%), at and above k >= 10% (at least 14%).
    A large batch on fresh data keeps the step noise below the progress of r >= k.
    """
    data = planted_data(lora_base_model, 8, seq_len=16, n_train=3200)
    config = {"r": rank, "lora_alpha": 2 * rank, "target_modules": ["lm_head"]}
    result = lora_train(config, steps=100, lr=3e-2, batch_size=64, seq_len=16, dataset=data, eval_every=10)
    excess = data.excess(result.val_losses)
    rule = {"window": 1, "patience": 3, "min_points": 4, "min_delta": 0.1}
    if rank < data.rank:
        with pytest.raises(LoraAssertionError, match="stalled for the last 3 steps"):
            assert_no_plateau(excess, **rule)
        assert result.val_losses[-1] > 1.1 * data.floor, "the plateau is well above the floor"
    else:
        assert_no_plateau(excess, **rule)


def test_a_calibration_that_could_not_pass_says_so_and_gives_the_fix() -> None:
    """The planted rank was not swept: no budget could pass the calibration, so "raise steps" would mislead."""
    details = {"planted_rank": 8, "planted_floor": 1.9, "planted_base_loss": 5.6}
    points = [SweepPoint(rank, loss, 10.0, details) for rank, loss in ((4, 2.5), (16, 2.0), (32, 2.0))]
    passed, message = _calibration(choose_rank(points, SweepRule(ranks=(4, 16, 32))))
    assert not passed
    assert message == (
        "calibration not possible: the data plants rank 8 but the sweep's ranks are 4, 16, 32 (floor 1.9, base 5.6)."
        "\n    fix: sweep r=8 too, or plant one of the swept ranks (dataset='builtin:planted-rank-16')"
    )
