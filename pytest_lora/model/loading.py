"""Loading the base model: the built-in tiny Llama, a local directory or a hub id, in 4-bit.

Every model, the built-in one included, goes through the same `from_pretrained` +
`BitsAndBytesConfig` path, so what the tests exercise is what a production run loads. The
model's task (causal LM, seq2seq LM, sequence or token classification) picks the auto class:
from the checkpoint's `architectures`, or the `task` setting.
torch, transformers and bitsandbytes are imported inside the functions: importing this
module costs nothing.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_lora.core.errors import AdapterConfigError, ModelLoadError, SettingsError
from pytest_lora.core.settings import TASKS, Worker
from pytest_lora.model.quiet import library_warnings_silenced, silence_bitsandbytes_kernel_notice
from pytest_lora.model.zoo import BUILTIN_PREFIX, DEFAULT_ZOO_NAME, zoo_entry
from pytest_lora.model.zoo import TINY_LLAMA_CONFIG as TINY_LLAMA_CONFIG  # re-exported: the default's config
from pytest_lora.model.zoo import builtin_model_dir as builtin_model_dir  # re-exported: the loader's cache
from pytest_lora.model.zoo import quiet_progress as _quiet_progress

if TYPE_CHECKING:
    import torch

    from pytest_lora.core.settings import Settings

BUILTIN_MODEL = BUILTIN_PREFIX + DEFAULT_ZOO_NAME

# Per task: the transformers auto class, its mapping of model_type -> class name, the task in words.
_TASK_CLASSES = {
    "CAUSAL_LM": ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "causal LM"),
    "SEQ_2_SEQ_LM": ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "seq2seq LM"),
    "SEQ_CLS": (
        "AutoModelForSequenceClassification",
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
        "sequence classification",
    ),
    "TOKEN_CLS": (
        "AutoModelForTokenClassification",
        "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
        "token classification",
    ),
}
# The heads PEFT trains through `modules_to_save` for SEQ_CLS / TOKEN_CLS. They stay out of 4-bit:
# PEFT cannot make a packed uint8 weight trainable (peft#1720 gives the same workaround).
CLASSIFIER_HEADS = ("classifier", "score")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelSource:
    """Where the base model comes from: `builtin` (`builtin:NAME`), `local` (a directory) or `hub` (an id)."""

    kind: str
    location: str

    @property
    def label(self) -> str:
        return self.location


@dataclass
class LoadedBase:
    """The session's base model and what the report header and the checks need to know of it."""

    model: Any
    source: ModelSource
    device: str
    quantization: str
    load_seconds: float
    placement: str = ""  # the device, or how the weights were sharded over several GPUs
    task: str = "CAUSAL_LM"  # what the model was loaded for, one of settings.TASKS


def resolve_source(spec: str | None, where: str | None = None) -> ModelSource:
    """Tell a built-in model from a local directory and a hub id, failing early on a path that does not exist.

    `where` names the setting in messages (`Settings.describe("model")`: the flag, marker or pyproject key).
    """
    where = where or f"--lora-model {spec}"
    if spec is None:
        return ModelSource("builtin", BUILTIN_MODEL)
    if spec.startswith(BUILTIN_PREFIX):
        name, _ = zoo_entry(spec, where)
        return ModelSource("builtin", BUILTIN_PREFIX + name)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(
                f"{where}: is a file, not a model directory.\n"
                "  fix: point it at the directory holding config.json and the *.safetensors weights"
            )
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{where}: the directory has no config.json, so it is not a transformers model.\n"
                "  fix: point it at the directory `save_pretrained` wrote (config.json + *.safetensors)"
            )
        return ModelSource("local", str(path.resolve()))
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith("/")
    if looks_like_path or not _HUB_ID.match(spec):
        raise ModelLoadError(
            f"{where}: no such directory (looked in {path.absolute().parent}).\n"
            "  fix: give an existing local model directory, or a hub id such as 'org/name'"
        )
    return ModelSource("hub", spec)


def resolve_device(device: str, worker: Worker | None = None, where: str | None = None) -> str:
    """`auto` is CUDA when available, else CPU; under xdist, worker i takes GPU i mod count.

    `where` names the setting in messages (`Settings.describe("device")`: the flag, marker or pyproject key).
    """
    import torch

    where = where or f"--lora-device {device}"

    index = worker.index if worker else 0
    if device == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        return f"cuda:{index % torch.cuda.device_count()}"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SettingsError(
                f"{where}: CUDA is not available on this machine (torch {torch.__version__}).\n"
                "  fix: use --lora-device auto or cpu, or run on a GPU runner with a CUDA build of torch"
            )
        if device == "cuda":
            return f"cuda:{index % torch.cuda.device_count()}"
        if int(device.split(":", 1)[1]) >= torch.cuda.device_count():
            raise SettingsError(
                f"{where}: only {torch.cuda.device_count()} CUDA device(s) are visible.\n"
                f"  fix: use cuda:0 .. cuda:{torch.cuda.device_count() - 1}, or auto"
            )
    return device


def device_map_for(device_setting: str, resolved: str, cuda_count: int, under_xdist: bool) -> str | dict[str, str]:
    """Where the weights go: one device, or sharded over all GPUs with accelerate's `device_map="auto"`.

    Sharding happens only for `--lora-device auto` on a machine with several GPUs and not under
    xdist (there each worker owns one GPU): a model larger than one GPU then still loads.
    """
    if device_setting == "auto" and cuda_count > 1 and not under_xdist:
        return "auto"
    return {"": resolved}


def cpu_threads(worker: Worker | None, device: str) -> int | None:
    """torch's intra-op thread count for a session on `device`; None leaves torch's default.

    On the CPU, one thread per process unless xdist workers share the cores (each takes its share): the
    tiny models of CPU runs are many small matmuls, where a second OpenMP thread gains nothing on an idle
    machine and its spin-waits halve the speed when another process shares the cores
    (`tests/perf/test_threads.py`). `OMP_NUM_THREADS`, when set, is the user's choice and is left alone.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return None
    if worker is not None:
        return max(1, (os.cpu_count() or 1) // worker.count)
    return 1 if device == "cpu" else None


def _dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, name)


def quantization_config(settings: Settings, task: str = "CAUSAL_LM") -> Any:
    """The `BitsAndBytesConfig` for the settings, or None for a 16-bit base.

    A classifier keeps its head (`CLASSIFIER_HEADS`) in the compute dtype, as a QLoRA classification
    run must: PEFT trains that head through `modules_to_save`.
    """
    if not settings.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.quant_type,
        bnb_4bit_compute_dtype=_dtype(settings.compute_dtype),
        bnb_4bit_use_double_quant=settings.double_quant,
        llm_int8_skip_modules=list(CLASSIFIER_HEADS) if task in ("SEQ_CLS", "TOKEN_CLS") else None,
    )


def task_classes(config: Any) -> dict[str, str]:
    """The class transformers (or the checkpoint's own code, `auto_map`) has for each task of this config."""
    from transformers.models.auto import modeling_auto

    auto_map = getattr(config, "auto_map", None) or {}
    offered = {}
    for task, (auto_class, mapping, _) in _TASK_CLASSES.items():
        name = getattr(modeling_auto, mapping).get(config.model_type) or auto_map.get(auto_class)
        if name:
            offered[task] = str(name).rsplit(".", 1)[-1]
    return offered


def choose_task(config: Any, requested: str, where: str) -> str:
    """The task to load: `requested`, or with "auto" the one the checkpoint's `architectures` names.

    A config without `architectures` is taken for the first task its model_type has (causal LM
    first, as transformers' own pipelines do). A task the model type has no class for, or an
    architecture none of the tasks loads (e.g. a masked LM), is a ModelLoadError with the choices.
    """
    offered = task_classes(config)
    architectures = list(getattr(config, "architectures", None) or [])
    task = requested
    if requested == "auto":
        by_class = {name: task for task, name in offered.items()}
        found = [by_class[arch] for arch in architectures if arch in by_class]
        if found:
            task = found[0]
        elif not architectures and offered:
            task = next(iter(offered))
    if task in offered:
        return task
    raise ModelLoadError(_task_problem(config, requested, offered, where))


def _task_problem(config: Any, requested: str, offered: dict[str, str], where: str) -> str:
    """Why no class loads: the model type has none of the tasks, the checkpoint's head is none, or the asked one."""
    architectures = list(getattr(config, "architectures", None) or [])
    choices = ", ".join(f"{t} ({name})" for t, name in offered.items())
    loads = ", ".join(words for _, _, words in _TASK_CLASSES.values())
    if not offered:
        return (
            f"{where}: transformers {_transformers_version()} has no {loads} class for model_type "
            f"{config.model_type!r} (architectures: {', '.join(architectures) or 'none'}); those are the tasks "
            "pytest-lora loads.\n"
            "  fix: use a checkpoint of one of those kinds; the adapter configs of this model can still be "
            "checked statically (estimate_lora_parameters, --lora-check)"
        )
    example = next(iter(offered))
    how = f'--lora-task {example}, task = "{example}" in [tool.pytest_lora], or @pytest.mark.lora(task="{example}")'
    if requested == "auto":
        return (
            f"{where}: its architecture {', '.join(architectures)} is none of the tasks pytest-lora loads "
            f"({loads}).\n"
            f"  transformers has for model_type {config.model_type!r}: {choices}\n"
            f"  fix: say which task to fine-tune, e.g. {how}; a head the checkpoint lacks is initialised fresh"
        )
    return (
        f"{where}: task {requested}: transformers {_transformers_version()} has no "
        f"{_TASK_CLASSES[requested][2]} class for model_type {config.model_type!r}.\n"
        f"  it has: {choices}\n"
        f'  fix: set the task to one of those ({how}), or task = "auto" to follow the checkpoint\'s architectures'
    )


def model_task(model: Any) -> str:
    """The task a model (or a PeftModel's base) is built for, from its class: what the objective follows.

    From the class, not from `LoraConfig.task_type`, which can be left None or set wrong.
    """
    base = unwrapped(model)
    name = type(base).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    if getattr(getattr(base, "config", None), "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    return "CAUSAL_LM"


def check_task_type(model: Any, config: Any) -> None:
    """`LoraConfig.task_type` names the model's own task, or none: PEFT's wrapper for another task crashes on
    the model (CAUSAL_LM on a classifier has no generation hooks) or saves an adapter for the wrong class.

    Task types pytest-lora does not load (FEATURE_EXTRACTION, QUESTION_ANS) are left to PEFT.
    """
    declared = getattr(config.task_type, "value", config.task_type)
    task = model_task(model)
    if declared not in TASKS or declared == task:
        return
    head = " (PEFT then trains the classifier head too, through modules_to_save)" if task.endswith("_CLS") else ""
    raise AdapterConfigError(
        f"LoraConfig.task_type = {declared!r} does not fit the base model, a {type(unwrapped(model)).__name__} "
        f"({task}): PEFT's {declared} wrapper expects another kind of model.\n"
        f"  fix: task_type={task!r}{head}, or load the base for {declared} (--lora-task {declared}, or "
        f'@pytest.mark.lora(task="{declared}"))'
    )


def unwrapped(model: Any) -> Any:
    """The transformers model under a PeftModel (the model itself otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


@library_warnings_silenced()
def load_base_model(settings: Settings, worker: Worker | None = None) -> LoadedBase:
    """Load the base model named by the settings, frozen, guarded against the CPU repack trap.

    `worker`: under pytest-xdist, the worker this process is (its GPU and its share of the CPU threads).
    """
    source = resolve_source(settings.model, settings.describe("model"))
    device = resolve_device(settings.device, worker, settings.describe("device"))
    if source.kind == "hub" and _offline():
        raise ModelLoadError(
            f"{settings.describe('model')}: a hub id, but HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set, "
            "so it cannot be downloaded.\n"
            f"  fix: download it where the network is allowed (`hf download {source.location} "
            "--local-dir ./models/NAME`) and pass --lora-model ./models/NAME"
        )
    location = source.location
    if source.kind == "builtin":
        location = str(builtin_model_dir(settings.cache_dir, source.location))
    silence_bitsandbytes_kernel_notice()
    import torch
    import transformers

    torch.set_num_threads(cpu_threads(worker, device) or torch.get_num_threads())
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device_map = device_map_for(settings.device, device, cuda_count, worker is not None)
    kwargs: dict[str, Any] = {
        "device_map": device_map,
        "trust_remote_code": settings.trust_remote_code,
        "use_safetensors": None if settings.allow_unsafe_pickle else True,
        "local_files_only": source.kind != "hub",
        # transformers >= 5.25 turns on hub kernels by default: code fetched from the hub at run time, which
        # the security defaults rule out (and whose `train()` hook re-kernelizes the shared base).
        "use_kernels": False,
    }
    where = settings.describe("model", settings.model or source.label)
    start = time.perf_counter()
    try:
        config = transformers.AutoConfig.from_pretrained(
            location, trust_remote_code=settings.trust_remote_code, local_files_only=source.kind != "hub"
        )
        task = choose_task(config, settings.task, where)
        quant = quantization_config(settings, task)
        if quant is not None:
            kwargs["quantization_config"] = quant
        else:
            kwargs["dtype"] = _dtype(settings.compute_dtype)
        auto_class = getattr(transformers, _TASK_CLASSES[task][0])
        with _quiet_progress():
            model = auto_class.from_pretrained(location, config=config, **kwargs)
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as exc:
        raise ModelLoadError(_explain_load_failure(source, settings, exc)) from exc
    elapsed = time.perf_counter() - start
    prepare_base(model)
    settle_problem_type(model)
    placement = device
    if device_map == "auto":
        placement = "sharded over " + ", ".join(
            f"cuda:{i} ({torch.cuda.memory_allocated(i) / 2**30:.1f} GiB)" for i in range(cuda_count)
        )
    return LoadedBase(model, source, device, settings.quantization_label(), elapsed, placement, task)


def prepare_base(model: Any) -> None:
    """Freeze the base and disable bitsandbytes' CPU inference repack on every 4-bit layer.

    On a CPU with AVX512-BF16, `Linear4bit.forward` in eval mode without grad repacks its
    weights for `gemv_4bit`, which has no autograd kernel: LoRA training on that base then
    learns nothing, silently. Turning the repack off before any evaluation avoids it.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    model.eval()
    settle_first_forward(model)


def settle_first_forward(model: Any) -> None:
    """Run the one-time changes the libraries make on a model's first forward pass, now.

    bitsandbytes' `Linear4bit.forward` casts a layer's bias to the compute dtype in place on its
    first call (Qwen2, OPT, GPT-2, BERT have biases; Llama has none). A production run sees the
    same cast on its first step; doing it at load time makes it part of the state every test
    starts from, instead of a change the first test would be blamed for. transformers 5 likewise
    installs its output-capturing hooks on the first call that asks for hidden states or attentions.
    """
    import torch

    inputs = getattr(model, "dummy_inputs", None)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batch = {k: v.to(device) for k, v in (inputs or {}).items()}
    try:
        with torch.no_grad():
            model(**batch)
    except Exception:  # a model that needs other inputs: make the one known change directly
        for module in model.modules():
            bias, dtype = getattr(module, "bias", None), getattr(module, "compute_dtype", None)
            if hasattr(module, "compute_type_is_set") and bias is not None and dtype is not None:
                bias.data = bias.data.to(dtype)
                module.compute_type_is_set = True
        return
    try:
        with torch.no_grad():
            model(**batch, output_hidden_states=True)
    except Exception:  # an architecture without that output has no hooks to install
        return


def settle_problem_type(model: Any) -> None:
    """Set a sequence classifier's `config.problem_type` as its first training forward would.

    transformers' `*ForSequenceClassification.forward` writes the problem type it infers from the
    labels into the config when none is set; on a shared base that write would be blamed on the first
    test. The inference is the library's: one label is a regression, integer labels (what pytest-lora's
    objective and a classification dataset give) a single-label classification.
    """
    config = model.config
    if model_task(model) == "SEQ_CLS" and getattr(config, "problem_type", None) is None:
        config.problem_type = "regression" if config.num_labels == 1 else "single_label_classification"


def repacked_4bit_layers(model: Any) -> list[str]:
    """Names of 4-bit layers already repacked for CPU inference (training through them is dead)."""
    names = []
    for name, module in model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            names.append(name)
    return names


def _offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in {"1", "true", "yes"} for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _explain_load_failure(source: ModelSource, settings: Settings, exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = settings.describe("model", settings.model or source.label)
    lowered = str(exc).lower()
    pickled = source.kind == "local" and any(Path(source.location).glob("*.bin"))
    if not settings.allow_unsafe_pickle and pickled and "safetensors" in lowered:
        return (
            f"{where}: only pickled weights (*.bin) found, no safetensors ({text}).\n"
            "  pytest-lora loads safetensors only: unpickling a checkpoint can run arbitrary code.\n"
            "  fix: convert the weights to safetensors, or, if you trust the file, set "
            "allow_unsafe_pickle = true in [tool.pytest_lora]"
        )
    if "does not recognize this architecture" in lowered or "model_type" in lowered or isinstance(exc, KeyError):
        return (
            f"{where}: transformers {_transformers_version()} does not know this architecture ({text}).\n"
            "  fix: upgrade transformers, or, for a model with custom code you trust, "
            "set trust_remote_code = true in [tool.pytest_lora]"
        )
    if source.kind == "hub":
        return (
            f"{where}: could not fetch the model from the hub ({text}).\n"
            f"  fix: check the id and your network, or download it (`hf download {source.location} "
            "--local-dir ./models/NAME`) and pass --lora-model ./models/NAME"
        )
    return f"{where}: loading failed: {type(exc).__name__}: {text}"


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
