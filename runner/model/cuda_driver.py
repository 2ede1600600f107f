"""The host's NVIDIA driver against the CUDA build of torch: a driver too old for it is a permanent error at start,
naming the driver version needed, instead of torch quietly finding no GPU and the job training on the CPU.

The runner image's torch (PyPI's torch 2.11.0) is built for CUDA 13.0 and brings its CUDA libraries as wheels;
only the driver (libcuda) comes from the host, through the NVIDIA container toolkit or the device plugin.
"""
from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from pathlib import Path

from runner.api.errors import PermanentError

# The oldest Linux driver of each CUDA release (NVIDIA's CUDA toolkit release notes, table 3); a driver at least
# this new runs every torch built for that CUDA major.minor.
MIN_DRIVER = {"12.4": "550.54.14", "12.6": "560.28.03", "12.8": "570.26", "12.9": "575.51.03", "13.0": "580.65.06"}
LIBCUDA = "libcuda.so.1"
PROC_VERSION = Path("/proc/driver/nvidia/version")


@dataclass(frozen=True)
class Driver:
    """What the driver on this machine says of itself."""

    cuda: tuple[int, int]  # the newest CUDA version it runs (cuDriverGetVersion)
    version: str | None  # e.g. "570.133.20"; None where /proc does not say

    @property
    def cuda_text(self) -> str:
        return f"{self.cuda[0]}.{self.cuda[1]}"


def driver(library: str = LIBCUDA) -> Driver | None:
    """The driver, or None where there is none (no GPU given to this container: a CPU job)."""
    try:
        lib = ctypes.CDLL(library)
    except OSError:
        return None
    out = ctypes.c_int(0)
    if lib.cuDriverGetVersion(ctypes.byref(out)) != 0 or out.value <= 0:
        return None
    try:
        m = re.search(r"Kernel Module\s+(\d+(?:\.\d+)+)", PROC_VERSION.read_text())
    except OSError:
        m = None
    return Driver((out.value // 1000, out.value % 1000 // 10), m.group(1) if m else None)


def check(torch_cuda: str | None, library: str = LIBCUDA) -> None:
    """Raise a PermanentError (exit 2) when this machine's driver cannot run torch's CUDA build `torch_cuda`
    (torch.version.cuda; None for a CPU build, which needs no driver)."""
    if not torch_cuda:
        return
    found = driver(library)
    if found is None:
        return
    need = tuple(int(x) for x in torch_cuda.split(".")[:2])
    if found.cuda >= need:
        return
    build = ".".join(str(x) for x in need)
    minimum = MIN_DRIVER.get(build)
    raise PermanentError(
        f"the NVIDIA driver on this machine ({found.version or 'version unknown'}) runs CUDA up to "
        f"{found.cuda_text}, but this runner's torch is built for CUDA {build}: it needs NVIDIA driver "
        f"{minimum + ' or newer' if minimum else 'for CUDA ' + build}. Fix: update the node's driver, or run the "
        "CPU runner image (Dockerfile --target runner-cpu) for CPU work")
