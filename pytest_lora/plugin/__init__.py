"""pytest-lora's pytest door: options, the `lora` marker, the report header, the hooks.

Importing this module imports no torch, transformers, peft or bitsandbytes: they load when a
LoRA fixture is first used, so a project that has pytest-lora installed pays nothing in its
other test runs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_lora.core.errors import LoraAssertionError, LoraError, SettingsError
from pytest_lora.core.sessions import SESSIONS, end_session
from pytest_lora.core.settings import OPTIONS, Settings, argparse_type, read_pyproject, resolve_settings
from pytest_lora.model.quiet import library_warnings_silenced, silence_bitsandbytes_kernel_notice
from pytest_lora.plugin.invocation import check_rootdir
from pytest_lora.plugin.progress import TerminalProgress
from pytest_lora.plugin.state import MARKER, STATE, LoraState, node_settings
from pytest_lora.plugin.xdist import distributes, is_worker, worker

if TYPE_CHECKING:  # the report formats load with the first test report, the policy code with a policy
    from pytest_lora.core.policy import Policy
    from pytest_lora.core.report import RunRecord

# A logging filter only (bitsandbytes is not imported): set before any conftest imports bitsandbytes.
silence_bitsandbytes_kernel_notice()

_LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")
_OWN_DIR = str(Path(__file__).parent.parent)  # the whole package, every layer: its frames are not the user's
_OWN_PACKAGE = "pytest_lora."


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    """pytest-lora's extension hooks (`pytest_lora.plugin.hookspec`), for conftest.py files and plugins."""
    from pytest_lora.plugin import hookspec

    pluginmanager.add_hookspecs(hookspec)


def pytest_addoption(parser: pytest.Parser) -> None:
    """One `lora` group; every option is also a `[tool.pytest_lora]` key and an ini key.

    Every option defaults to None ("not given"), so the other layers apply; a boolean is turned off with
    its `--no-lora-*` flag, as on with its `--lora-*` flag (or `--lora-*=false` for valued ones).
    """
    group = parser.getgroup("lora", "LoRA rank policy (pytest-lora)")
    for spec in OPTIONS:
        dest = f"lora_{spec.name}"
        if spec.is_flag:
            group.addoption(spec.flag, action="store_true", default=None, dest=dest, help=spec.help)
        elif spec.repeat:  # one value per flag; the list is parsed (and checked) as a whole in `_resolve`
            group.addoption(spec.flag, action="append", dest=dest, default=None, metavar="PATH", help=spec.help)
        else:
            group.addoption(spec.flag, dest=dest, default=None, type=argparse_type(spec), help=spec.help)
        if spec.boolean:
            group.addoption(
                spec.negative_flag, action="store_false", default=None, dest=dest, help=f"Turn {spec.flag} off"
            )
        parser.addini(spec.ini, help=f"{spec.help} [pytest-lora]", default=None)


def _pyproject(config: pytest.Config) -> Path | None:
    if config.inipath is not None and config.inipath.name == "pyproject.toml":
        return config.inipath
    candidate = config.rootpath / "pyproject.toml"
    return candidate if candidate.is_file() else None


def _resolve(config: pytest.Config) -> LoraState:
    """Settings and policy from the command line, `[tool.pytest_lora]` and ini; the pyproject is parsed once."""
    from pytest_lora.model.base_pool import BaseModelPool

    pyproject = _pyproject(config)
    pyproject_path = str(pyproject) if pyproject else None
    table = read_pyproject(pyproject) if pyproject else {}
    cli = {spec.name: config.getoption(f"lora_{spec.name}") for spec in OPTIONS}
    ini = {spec.name: config.getini(spec.ini) for spec in OPTIONS}
    inipath = str(config.inipath) if config.inipath else None
    settings = resolve_settings(cli, table, ini, pyproject_path, inipath)
    pool = BaseModelPool(settings, _team_policy(settings, pyproject, table), worker=worker(config))
    return LoraState(pool, pyproject_path)


def _team_policy(settings: Settings, pyproject: Path | None, table: Mapping[str, object]) -> Policy | None:
    """The configured policy, None when there is none (the pool builds the defaults when first asked)."""
    path = settings.policy
    if not path:
        return None
    from pytest_lora.core.policy import load_policy, policy_from_table

    inline = table.get("policy")
    if pyproject and _same_file(path, pyproject) and isinstance(inline, Mapping):
        return policy_from_table(table, path)  # the inline `[tool.pytest_lora.policy]` table: already parsed
    return load_policy(path, settings.origin("policy"))


def _same_file(path: str, pyproject: Path) -> bool:
    return os.path.abspath(path) == os.path.abspath(pyproject)


def pytest_configure(config: pytest.Config) -> None:
    """Validate settings and policy before any test runs: a bad value is a usage error (exit 4)."""
    config.addinivalue_line(
        "markers",
        f"{MARKER}(**overrides): a LoRA policy test (selected by `-m lora`); keyword arguments override "
        "pytest-lora settings for the test, class or module, e.g. model='./models/x', seed=1",
    )
    check_rootdir(config)  # first: a moved rootdir would silently drop the policy checked below
    try:
        state = _resolve(config)
    except SettingsError as exc:  # PolicyError included
        raise pytest.UsageError(f"pytest-lora: {exc}") from None
    settings = state.session.settings
    if settings.model is not None and distributes(config):  # the controller sees no test: checked here
        _check_model_source(settings)
    if settings.require_gpu:
        _require_gpu()
    if settings.mlflow:
        _require_mlflow(settings)
    config.stash[STATE] = state
    state.session.progress = TerminalProgress(config)
    SESSIONS.append(state.session)  # its policy: the assertions' default, built when first asked (core.sessions)
    # The fixtures and (when files are named) the config-file checks: plugins of their own, loaded once the
    # settings are valid (`-p no:lora` disables them too). Not `pytest_plugins`: pytest scans every installed
    # distribution's entry points for each name listed there, which costs more than the modules.
    checks = ("adapter_check",) if settings.configs or settings.check else ()
    for module in ("fixtures", *checks):
        config.pluginmanager.import_plugin(f"pytest_lora.plugin.{module}")
    config.pluginmanager.register(LoraReporter(state), "lora-reporter")
    if config.pluginmanager.hasplugin("benchmark"):  # pytest-benchmark is active: lora_benchmark builds on it
        config.pluginmanager.import_plugin("pytest_lora.plugin.bench")
    if distributes(config):  # the xdist controller collects nothing: no sweep item starts its recorder there
        from pytest_lora.plugin.sweep import record_sweeps

        record_sweeps(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    """The session's policy stops being the assertions' default (an in-process run's caller gets its own back)."""
    state = config.stash.get(STATE, None)
    if state is not None:
        end_session(state.session)
        state.session.close()


def _require_mlflow(settings: Settings) -> None:
    """`--lora-mlflow` without MLflow installed is a usage error before any test runs, not a lost sweep."""
    from pytest_lora.integrations.mlflow import require_mlflow

    try:
        require_mlflow(settings.describe("mlflow"))
    except SettingsError as exc:
        raise pytest.UsageError(f"pytest-lora: {exc}") from None


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """A session model that cannot exist stops the session once, before any test runs, when a selected test is a
    LoRA test: `-m "not lora"`, `--collect-only` and `--help` work with a model that exists on the GPU runner only."""
    config = session.config
    state = config.stash.get(STATE, None)
    if state is None or state.session.settings.model is None or config.option.collectonly or is_worker(config):
        return
    if any(item.get_closest_marker(MARKER) is not None for item in session.items):
        _check_model_source(state.session.settings)


def _check_model_source(settings: Settings) -> None:
    """A missing directory, one without config.json or an unknown built-in name is a usage error (exit 4), not an
    error in every LoRA test. Path checks only: nothing is loaded."""
    from pytest_lora.core.errors import ModelLoadError
    from pytest_lora.model.loading import resolve_source

    try:
        resolve_source(settings.model, settings.describe("model"))
    except ModelLoadError as exc:
        raise pytest.UsageError(f"pytest-lora: {exc}") from None


def _require_gpu() -> None:
    import torch

    if not torch.cuda.is_available():
        raise pytest.UsageError(
            "pytest-lora: --lora-require-gpu is set, but no CUDA device is available "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}).\n"
            "  The session stops instead of running the LoRA tests on the CPU or skipping them.\n"
            "  fix: run on a GPU runner with a CUDA build of torch, or drop --lora-require-gpu"
        )


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say what is in force: model, device, quantization, policy."""
    state = config.stash.get(STATE, None)
    if state is None:
        return []
    settings = state.session.settings
    device = settings.device
    if device == "auto":
        device = "auto (CUDA if available, else CPU; resolved when the model loads)"
    lines = [
        f"lora: model={settings.model or 'builtin:tiny-llama'}, device={device}, {settings.quantization_label()}",
        f"lora: policy={state.session.policy_source}",
    ]
    if settings.trust_remote_code:
        lines.append("lora: trust_remote_code=ON (the model's own Python code will run)")
    if settings.allow_unsafe_pickle:
        lines.append("lora: allow_unsafe_pickle=ON (pickled checkpoints may run code when loaded)")
    return lines


@pytest.hookimpl(wrapper=True, trylast=True)  # inside pytest's own warning capture, whose filters it adds to
def pytest_load_initial_conftests() -> Any:
    """Conftests and test modules import peft, which imports torch modules that raise torch's own deprecations
    (14 of `torch.jit.script_method` in torch 2.13): library noise no user can act on, dropped while they load."""
    with library_warnings_silenced():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_collection(session: pytest.Session) -> Any:
    """The test modules and the conftests below the rootdir, as `pytest_load_initial_conftests`."""
    with library_warnings_silenced():
        return (yield)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that use one of pytest-lora's fixtures (directly or through another fixture) are LoRA tests:
    mark them so `-m lora` selects them. A user's own `lora_*` fixture does not count."""
    for item in items:
        if _uses_own_fixture(item) and item.get_closest_marker(MARKER) is None:
            item.add_marker(MARKER)


def _uses_own_fixture(item: pytest.Item) -> bool:
    """Whether a fixture the item requests resolves to one pytest-lora registered (by its defining module)."""
    info = getattr(item, "_fixtureinfo", None)  # pytest.Function's resolved fixtures; other items have none
    if info is None:
        return False
    return any(
        getattr(fixturedef.func, "__module__", "").startswith(_OWN_PACKAGE)
        for fixturedefs in info.name2fixturedefs.values()
        for fixturedef in fixturedefs
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Marker keywords are checked before the test runs: a typo errors the test, never ignored."""
    node_settings(item)  # merged once and kept for `lora_settings`


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    """After the fixtures are gone, the shared base must be as loaded (catches stray get_peft_model)."""
    try:
        return (yield)
    finally:  # also when a fixture's teardown raised: the leak is this test's, not the next one's
        state = item.config.stash.get(STATE, None)
        if state is not None:
            state.session.check_clean(f"after {item.nodeid}")


def _user_frame(entry: Any) -> bool:
    path = str(entry.path)
    return not path.startswith(_OWN_DIR) and not any(f"{sep}{lib}{sep}" in path for lib in _LIBRARIES for sep in "/\\")


_XFAIL_KEY = "lora_xfail_diagnosis"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """pytest-lora's own errors show the user's line and the diagnosis, not frames deep in torch/PEFT.

    An expected failure (xfail) keeps its diagnosis for the `lora` summary: a deliberately bad
    config documents what the check says about it.
    """
    report = yield
    excinfo = call.excinfo
    if excinfo is None or not isinstance(excinfo.value, (LoraError, LoraAssertionError)):
        return report
    if hasattr(report, "wasxfail"):
        report.user_properties.append((_XFAIL_KEY, str(excinfo.value)))
        return report
    if call.when == "call" and isinstance(item, pytest.Function):
        if not item.config.getoption("fulltrace", False):
            report.longrepr = excinfo.getrepr(
                funcargs=True,
                style="short" if item.config.getoption("tbstyle", "auto") == "short" else "long",
                tbfilter=lambda info: item._traceback_filter(info).filter(_user_frame) or item._traceback_filter(info),
            )
    else:
        report.longrepr = f"{type(excinfo.value).__name__}: {excinfo.value}"
    return report


class LoraReporter:
    """The `lora` section of the terminal summary; a plugin object so it can keep what it saw.

    Diagnoses of expected failures arrive through `user_properties`, which travel with the
    reports, so under xdist the controller shows those of every worker.
    """

    def __init__(self, state: LoraState) -> None:
        self.state = state
        self.xfails: list[tuple[str, str]] = []
        self.runs: list[RunRecord] = []  # lora_benchmark records, from every xdist worker too

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.xfails += [(report.nodeid, str(value)) for key, value in report.user_properties if key == _XFAIL_KEY]
        if report.when == "call":
            from pytest_lora.core.report import records_from_properties

            self.runs += records_from_properties(report.user_properties)

    @pytest.hookimpl(tryfirst=True)  # above the rank sweep's section, registered later (with its first item)
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        session = self.state.session
        if not (session.bases or self.xfails or self.runs):
            return
        terminalreporter.section("lora")
        for nodeid, message in self.xfails:
            terminalreporter.write_line(f"xfail {nodeid} (expected), its diagnosis:")
            for line in message.splitlines():
                terminalreporter.write_line(f"    {line}")
        for key, loaded in session.bases.items():
            task = f", as {loaded.task}" if loaded.task != "CAUSAL_LM" else ""  # one model, loaded per task
            terminalreporter.write_line(
                f"base model {loaded.source.label} on {loaded.placement or loaded.device} ({loaded.quantization}): "
                f"loaded {session.loads[key]}x in {loaded.load_seconds:.2f}s{task}"
            )
        changed = self.state.changed_bases
        if changed:
            terminalreporter.write_line(
                f"--lora-verify-base: base weights CHANGED during the session: {', '.join(changed)}", red=True
            )
        elif changed is not None:
            terminalreporter.write_line("--lora-verify-base: base weights identical at start and end", green=True)
        from pytest_lora.core.report import write_rank_table

        write_rank_table(terminalreporter, self.runs)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """`--lora-report PATH`: the JSON report, written once, by the controller under xdist."""
        path = self.state.session.settings.report
        if path and not is_worker(session.config):
            from pytest_lora.core.report import write_json

            write_json(path, self.runs)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """`--lora-verify-base`: a base that changed fails the session, whatever the tests said."""
    state = session.config.stash.get(STATE, None)
    if state is None or not state.session.settings.verify_base or not state.session.bases:
        return
    state.changed_bases = state.session.changed_bases()
    if state.changed_bases and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
