"""Library noise kept out of the test output; stdlib `logging` only, so the plugin can set it up on import."""

from __future__ import annotations

import logging


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
