"""The GPU benchmark's code path, on CPU with the tiny shape: it must keep running and keep its report."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_reports_each_configuration_and_the_merge(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--shape", "tiny", "--configs", "notebook;defaults",
         "--steps", "3", "--warmup", "1", "--work-dir", str(tmp_path / "w"), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["gpu"] == "cpu" and result["versions"]["torch"]
    notebook, defaults = result["configs"]["notebook"], result["configs"]["defaults"]
    assert notebook["packing"] is False and notebook["gradientCheckpointing"] is True
    assert defaults["packing"] is True
    for res in (notebook, defaults):
        assert res["measuredSteps"] == 2 and res["realTokensPerSecond"] > 0
    assert result["merge"]["relativeLogitError"] < 1e-2


def test_loss_check_compares_the_fast_path_with_a_reference_path(tmp_path):
    """On CPU the fast path is SDPA with restarting positions; the reference is eager attention."""
    reference = '{"model": {"attnImplementation": "eager"}}'
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--shape", "tiny", "--configs", f"defaults;{reference}",
         "--loss-check", "--steps", "4", "--warmup", "1", "--no-merge", "--work-dir", str(tmp_path / "w"),
         "--out", str(tmp_path / "r.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    check = json.loads((tmp_path / "r.json").read_text())["lossCheck"]
    assert check["steps"] == 4 and check["passed"] and check["maxRelativeDifference"] <= check["tolerance"]
