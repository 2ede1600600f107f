"""The driver check at start: a real shared library answering the CUDA driver API's cuDriverGetVersion, as a
host's libcuda does, built here with the system compiler for each driver version the test needs."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from runner.api.errors import EXIT_PERMANENT, PermanentError
from runner.model import cuda_driver

SOURCE = "int cuDriverGetVersion(int *v) { *v = %d; return 0; }\n"


def libcuda(tmp_path: Path, version: int) -> str:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")  # every machine of this project has gcc; a bare one may not
    src, lib = tmp_path / f"cuda{version}.c", tmp_path / f"libcuda{version}.so"
    src.write_text(SOURCE % version)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    return str(lib)


def test_a_driver_too_old_for_torchs_cuda_build_is_a_permanent_error_naming_the_driver_needed(tmp_path):
    with pytest.raises(PermanentError) as e:
        cuda_driver.check("13.0", library=libcuda(tmp_path, 12080))  # a 570 driver: CUDA 12.8
    assert e.value.exit_code == EXIT_PERMANENT
    message = str(e.value)
    assert "runs CUDA up to 12.8" in message and "built for CUDA 13.0" in message
    assert "580.65.06 or newer" in message and "runner-cpu" in message


@pytest.mark.parametrize("version", [13000, 13020])
def test_a_driver_for_the_same_cuda_or_newer_passes(tmp_path, version):
    lib = libcuda(tmp_path, version)
    cuda_driver.check("13.0", library=lib)
    assert cuda_driver.driver(lib).cuda == (version // 1000, version % 1000 // 10)


def test_no_driver_or_a_cpu_torch_needs_no_check(tmp_path):
    cuda_driver.check("13.0", library=str(tmp_path / "absent.so"))  # no GPU in this container: a CPU job
    cuda_driver.check(None, library=libcuda(tmp_path, 12080))  # CPU torch: the driver does not matter
    assert cuda_driver.driver(str(tmp_path / "absent.so")) is None
