"""Library log lines that say nothing a runner's user can act on, dropped wherever the runner runs (a terminal, a
pod's log, CI). Each is matched by its logger and the start of its message; anything else a library logs is kept.
`quiet()` installs the filters; call it before the libraries are imported (runner/__main__.py does)."""
from __future__ import annotations

import logging

KNOWN = {
    # bitsandbytes, when imported on a CPU with AVX512-BF16: an optional CPU inference kernel fetched from the Hub
    # by the `kernels` package. Training does not use it (4-bit weights are dequantized for the matmuls), and an
    # offline image could not fetch it.
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
    # LLM.int8 computes in float16 whatever the compute dtype; bitsandbytes says so on every matmul.
    "bitsandbytes.autograd._functions": "MatMul8bitLt: inputs will be cast",
}


class _Drop(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet() -> None:
    """Install the filters (once per logger)."""
    for name, prefix in KNOWN.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_Drop(prefix))
