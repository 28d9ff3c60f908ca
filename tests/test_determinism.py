"""Same seed, same losses and verdicts on the CPU, bit for bit: across reruns and across xdist workers."""

from __future__ import annotations

import json

import pytest
from conftest import lora_config

from pytest_lora import LoraAssertionError, assert_no_plateau

pytestmark = pytest.mark.lora


def _verdict(result) -> str:
    try:
        assert_no_plateau(result, min_points=6, window=3)
    except LoraAssertionError as exc:
        return str(exc)
    return "ok"


def test_ten_reruns_give_identical_losses_and_verdicts(lora_train):
    runs = [lora_train(lora_config(8, lora_dropout=0.1), steps=8, eval_every=4) for _ in range(10)]
    assert all(run.losses == runs[0].losses and run.val_losses == runs[0].val_losses for run in runs)
    assert len({_verdict(run) for run in runs}) == 1


RECORDER = """
import json, os, pytest
from peft import LoraConfig

@pytest.mark.parametrize("r", [4, 8, 16, 32])
def test_record(lora_train, r):
    result = lora_train(LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], lora_dropout=0.1),
                        steps=6, eval_every=3)
    name = os.environ["LOSSES_DIR"] + f"/r{r}.json"
    with open(name, "w") as handle:
        json.dump({"losses": result.losses, "val": result.val_losses}, handle)
"""


def test_serial_and_two_xdist_workers_agree_bit_for_bit(
    lora_pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    lora_pytester.makepyfile(RECORDER)
    outcomes = {}
    for label, args in (("serial", ()), ("xdist", ("-n", "2"))):
        out = lora_pytester.mkdir(f"losses-{label}")
        monkeypatch.setenv("LOSSES_DIR", str(out))
        lora_pytester.runpytest_subprocess(*args).assert_outcomes(passed=4)
        outcomes[label] = {p.name: json.loads(p.read_text()) for p in out.iterdir()}
    assert len(outcomes["serial"]) == 4
    assert outcomes["serial"] == outcomes["xdist"]
