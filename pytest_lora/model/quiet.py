"""Library noise kept out of the test output; stdlib only, so the plugin can set it up on import."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# Deprecations the libraries raise on pytest-lora's own calls, by message start and category: torch's
# `torch.utils.mkldnn` uses `torch.jit.script_method` when peft first imports it; PEFT reads
# `model.is_gradient_checkpointing`, deprecated in transformers 5, in every `get_peft_model`.
_LIBRARY_WARNINGS = (
    (r"`torch\.jit\.script_method` is deprecated", DeprecationWarning),
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
)


@contextmanager
def library_warnings_silenced() -> Iterator[None]:
    """Around pytest-lora's own calls into torch / transformers / PEFT (also a decorator): drop the library
    deprecations above, which the user cannot act on. Nothing else is filtered, and only inside the block,
    so the user's own warnings (the same messages from their own calls included) still show."""
    with warnings.catch_warnings():
        for message, category in _LIBRARY_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


def silence_bitsandbytes_kernel_notice() -> None:
    """Drop bitsandbytes' notice that the optional `kernels` hub package is missing.

    It is printed on import on AVX512-BF16 CPUs, asks for a package that downloads kernels from
    a hub, and changes nothing for training: it would only confuse the test output.
    """
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if _drop_kernels_notice not in logger.filters:
        logger.addFilter(_drop_kernels_notice)


def _drop_kernels_notice(record: logging.LogRecord) -> bool:
    return "kernels-community" not in str(record.msg)
