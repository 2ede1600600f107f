"""bench/gpu/lockfile.py carry: the GPU lock's lines to fetch here for the GPU machines' python 3.12, their markers
already evaluated for it, so that pip on this machine's python fetches the 3.12-only pins too."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_carry_names_every_pin_for_the_gpu_python_without_markers():
    out = subprocess.run([sys.executable, str(ROOT / "bench/gpu/lockfile.py"), "carry"], capture_output=True,
                         text=True, check=True).stdout
    heads = [line for line in out.splitlines() if line and not line.startswith(" ")]
    assert heads and all(";" not in h and "--hash" not in h for h in heads)
    pins = dict(h.split(" ")[0].split("==") for h in heads)
    lock = (ROOT / "locks/runner.txt").read_text()
    for name in ("numpy", "networkx"):  # pinned apart for python < 3.12 and >= 3.12 in the lock
        assert f"{name}=={pins[name]} ; python_full_version >= '3.12'" in lock
    assert "torch" not in pins and not any(n.startswith("nvidia-") for n in pins)  # the machines' own
    assert all(out.count(f"{n}==") == 1 for n in pins)
