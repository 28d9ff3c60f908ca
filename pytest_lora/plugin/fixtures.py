"""pytest-lora's fixtures: the shared 4-bit base, the adapter factory, the short training run, the rank sweep.

Thin on purpose: each fixture asks the base-model pool (`model.base_pool`) for a base model and
hands the work to the torch-side modules. Function-scoped factories detach what they
attached at teardown, whether the test passed or failed. (`lora_benchmark` is in `plugin.bench`, registered
only when pytest-benchmark is active.)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from pytest_lora.core.defaults import DEFAULT_BATCH_SIZE, DEFAULT_LR, DEFAULT_SEQ_LEN, DEFAULT_STEPS
from pytest_lora.core.errors import SettingsError
from pytest_lora.plugin.state import STATE, node_settings

if TYPE_CHECKING:
    from pytest_lora.core.policy import Policy
    from pytest_lora.core.settings import Settings
    from pytest_lora.model.adapters import AdapterManager
    from pytest_lora.model.base_pool import BaseModelPool
    from pytest_lora.plugin.fixture_types import LoraModelFactory, LoraTrain
    from pytest_lora.plugin.sweep import SweepRun

RANK_FIXTURE = "lora_sweep_rank"


@pytest.fixture(scope="session")
def lora_session(pytestconfig: pytest.Config) -> BaseModelPool:
    """The session registry of loaded base models (advanced use; most tests need the factories)."""
    return pytestconfig.stash[STATE].session


@pytest.fixture(scope="session")
def lora_policy(lora_session: BaseModelPool) -> Policy:
    """The team policy, validated when pytest started (`[tool.pytest_lora.policy]` or --lora-policy)."""
    return lora_session.policy


@pytest.fixture(scope="session")
def lora_base_model(lora_session: BaseModelPool) -> Any:
    """The session's base model (4-bit nf4 by default), loaded once, weights frozen.

    Session-wide: `@pytest.mark.lora(model=...)` does not change it; the factories
    (`lora_model`, `lora_train`) honour such a marker and load that model once as well.
    """
    return lora_session.base().model


@pytest.fixture(scope="session")
def lora_adapters(lora_session: BaseModelPool) -> AdapterManager:
    """Session-scoped adapter manager of the default base, for `@given` tests.

    `with lora_adapters.attached(config) as model:` attaches and always detaches, so each
    Hypothesis example starts from the clean base without a function-scoped fixture.
    """
    return lora_session.manager()


@pytest.fixture
def lora_settings(request: pytest.FixtureRequest, lora_session: BaseModelPool) -> Settings:
    """The settings in force for this test: the session's, with `@pytest.mark.lora(...)` applied."""
    return node_settings(request.node)


@pytest.fixture
def lora_model(lora_session: BaseModelPool, lora_settings: Settings) -> Iterator[LoraModelFactory]:
    """`lora_model(config) -> PeftModel`: attach a LoRA config to the shared base.

    One adapter at a time: attaching another detaches the previous one. At teardown the adapter
    is removed and the base is exactly as loaded, also when the test failed.
    """
    manager = lora_session.manager(lora_settings)
    owner = object()

    def attach(config: Any) -> Any:
        __tracebackhide__ = True
        return manager.attach(config, seed=lora_settings.seed, owner=owner)

    yield attach
    manager.detach(owner)


@pytest.fixture
def lora_train(lora_settings: Settings, lora_model: LoraModelFactory) -> LoraTrain:
    """`lora_train(config_or_peft_model, steps=40, lr=1e-2, batch_size=8, seq_len=64, seed=None,
    dataset=None, eval_every=None, weight_decay=0.0, gradient_checkpointing=None) -> TrainResult`: a short
    real training run.

    A config is attached first (and detached at teardown). Same seed, same losses, bit for bit
    on the CPU. `dataset`: token ids `[n, seq_len]`, a `(train, val)` pair, or dicts with
    `input_ids`; default: the built-in learnable synthetic data. `gradient_checkpointing` (default: the
    setting, or `@pytest.mark.lora(gradient_checkpointing=True)`) trains with the QLoRA recipe for this
    run only.
    """
    from pytest_lora.model import training
    from pytest_lora.model.measure import run_oom_checked
    from pytest_lora.model.memory import estimate_memory

    def run(
        config_or_model: Any,
        *,
        steps: int = DEFAULT_STEPS,
        lr: float = DEFAULT_LR,
        batch_size: int = DEFAULT_BATCH_SIZE,
        seq_len: int = DEFAULT_SEQ_LEN,
        seed: int | None = None,
        dataset: Any = None,
        eval_every: int | None = None,
        weight_decay: float = 0.0,
        gradient_checkpointing: bool | None = None,
    ) -> training.TrainResult:
        __tracebackhide__ = True
        model = config_or_model if hasattr(config_or_model, "peft_config") else lora_model(config_or_model)
        seed = lora_settings.seed if seed is None else seed
        data = training.model_data(model, dataset, seq_len=seq_len, seed=seed)
        return run_oom_checked(
            lambda: training.train(
                model,
                data,
                steps=steps,
                lr=lr,
                batch_size=batch_size,
                seed=seed,
                eval_every=eval_every,
                weight_decay=weight_decay,
                gradient_checkpointing=(
                    lora_settings.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
                ),
            ),
            what=f"lora_train (batch {batch_size} x seq {seq_len})",
            device=training.device_of(model),
            estimate=lambda: estimate_memory(model, batch_size=batch_size, seq_len=seq_len),
        )

    return run


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One item per rank for every test that (indirectly) uses `lora_sweep_rank`; the first one starts the
    sweep's recorder, so a session without sweeps never loads `plugin.sweep`."""
    if RANK_FIXTURE not in metafunc.fixturenames:
        return
    session = metafunc.config.stash[STATE].session
    try:
        ranks = node_settings(metafunc.definition).sweep or session.policy.sweep.ranks
    except SettingsError as exc:  # a bad marker keyword: the message alone, as at any other test's setup
        raise pytest.Collector.CollectError(f"{type(exc).__name__}: {exc}") from None
    metafunc.parametrize(RANK_FIXTURE, ranks, ids=[f"r={rank}" for rank in ranks], indirect=True)
    from pytest_lora.plugin.sweep import record_sweeps

    record_sweeps(metafunc.config)


@pytest.fixture
def lora_sweep_rank(request: pytest.FixtureRequest) -> int:
    """The rank of this sweep item (from `--lora-sweep`, the `sweep` marker keyword or the policy)."""
    return int(request.param)


@pytest.fixture
def lora_sweep(
    request: pytest.FixtureRequest,
    lora_sweep_rank: int,
    lora_session: BaseModelPool,
    lora_settings: Settings,
    lora_train: LoraTrain,
) -> SweepRun:
    """`lora_sweep.run(config)`: this item's short training run at `lora_sweep.rank`, recorded for the choice.

    `config` is a LoraConfig or a mapping of its fields; a mapping may leave out r (set to the rank)
    and lora_alpha (set to what the policy asks for at that rank).
    """
    from pytest_lora.plugin.sweep import start_run

    return start_run(request.node, lora_sweep_rank, lora_session, lora_settings, lora_train)
