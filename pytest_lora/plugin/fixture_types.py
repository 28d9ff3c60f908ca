"""The types of pytest-lora's fixtures, so tests can annotate them (as pytest-mock exports `MockerFixture`).

`lora_model`, `lora_train` and `lora_benchmark` hand out functions: these Protocols are their signatures
(the defaults are the fixtures' own, see their docstrings).
The other fixtures hand out real classes, exported from `pytest_lora` too: `SweepRun` (`lora_sweep`),
`AdapterManager` (`lora_adapters`), `BaseModelPool` (`lora_session`), `Policy`, `Settings`.

    from pytest_lora import LoraTrain

    def test_learns(lora_train: LoraTrain) -> None:
        assert lora_train({"r": 8, "target_modules": ["q_proj"]}, steps=2).steps == 2
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pytest_lora.core.report import RunRecord
    from pytest_lora.model.training import TrainResult


class LoraModelFactory(Protocol):
    """`lora_model(config) -> PeftModel`: attach a LoraConfig (or a mapping of its fields) to the shared base."""

    def __call__(self, config: Any) -> Any: ...


class LoraTrain(Protocol):
    """`lora_train(config_or_peft_model, ...) -> TrainResult`: a short real training run."""

    def __call__(
        self,
        config_or_model: Any,
        *,
        steps: int = ...,
        lr: float = ...,
        batch_size: int = ...,
        seq_len: int = ...,
        seed: int | None = ...,
        dataset: Any = ...,
        eval_every: int | None = ...,
        weight_decay: float = ...,
        gradient_checkpointing: bool | None = ...,
    ) -> TrainResult: ...


class LoraBenchmark(Protocol):
    """`lora_benchmark(config, ...) -> RunRecord`: timed real training steps of `config` (pytest-benchmark)."""

    def __call__(
        self,
        config: Any,
        *,
        batch_size: int = ...,
        seq_len: int = ...,
        steps_per_round: int = ...,
        rounds: int = ...,
        warmup_rounds: int = ...,
        lr: float = ...,
        dataset: Any = ...,
    ) -> RunRecord: ...
