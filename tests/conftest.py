"""Shared helpers for pytest-lora's own tests."""

from __future__ import annotations

import importlib
import pkgutil
import statistics
import time

import bitsandbytes  # noqa: F401
import peft  # noqa: F401
import pytest
import torch
import transformers

import pytest_lora
from pytest_lora.model.zoo import ZOO

# Imported here, in the outer session, on purpose: pytester's in-process runs drop the modules
# an inner run imported, and torch's C extension cannot be loaded twice in one process. The same for
# every pytest-lora module (the plugin loads most of them lazily) and the zoo's model classes: a module an
# inner run imported first is dropped while its package keeps it as an attribute, so the outer session
# would patch a copy the next inner run no longer uses (`pytest_lora.core.globs`), or hold a model class
# whose module is gone (transformers' `set_attn_implementation` then refuses, with a log line only).
for _module in pkgutil.walk_packages(pytest_lora.__path__, "pytest_lora."):
    importlib.import_module(_module.name)
for _entry in ZOO.values():
    getattr(transformers, _entry.architecture)

EXAMPLE_TARGETS = ["q_proj", "v_proj"]


def lora_config(r: int = 8, alpha: float | None = None, **extra):
    """A LoraConfig on the built-in model's q_proj and v_proj, alpha = 2r unless given."""
    from peft import LoraConfig

    extra.setdefault("target_modules", EXAMPLE_TARGETS)
    return LoraConfig(r=r, lora_alpha=2 * r if alpha is None else alpha, **extra)


@pytest.fixture
def lora_pytester(pytester: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory) -> pytest.Pytester:
    """A pytester with a pinned ini and the session's model cache, so inner runs do not rewrite the model.

    Inner runs keep their file order (`-p no:randomly`; pytester drops PYTEST_ADDOPTS): a test that
    wants random orders passes `-p randomly --randomly-seed=N`, which lifts the block.
    """
    cache = tmp_path_factory.getbasetemp() / "lora-model-cache"
    pytester.makeini(
        f"""
        [pytest]
        addopts = -p no:randomly
        lora_cache_dir = {cache}
        filterwarnings =
            ignore::DeprecationWarning
            ignore::FutureWarning
        """
    )
    return pytester


def repeats(benchmark, n: int) -> int:
    """How often a benchmark measures its baseline: `n` times, but once under `--benchmark-disable` (the default
    suite), which runs every benchmark's code so it cannot rot without paying for statistics nobody reads."""
    return 1 if benchmark.disabled else n


def median_seconds(fn, repeat: int) -> float:
    """Median wall time of `repeat` calls: the baseline side of a benchmark's ratio."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load_4bit_on_cuda(directory):
    """A saved model loaded as QLoRA runs do on a GPU: nf4 + double quant, the rest in bf16, frozen."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from pytest_lora.model.loading import prepare_base

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
    base = AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=quant, dtype=torch.bfloat16, device_map={"": "cuda:0"}
    )
    prepare_base(base)
    return base
