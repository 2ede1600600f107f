"""The merge benchmark's code path on CPU with the tiny shape: it builds its random base and adapter, merges
shard by shard in a fresh process, and reports time and peak memory (the H200 figures come from the same
script on the 8B and 70B shapes)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bench(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "result.json"
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bench.merge_bench", "--shape", "tiny", "--work-dir",
                           str(tmp_path / "w"), "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.perf_counter() - t < 60
    result = json.loads(out.read_text())
    assert result == json.loads(proc.stdout)  # the same document on stdout
    return result


def test_merge_bench_on_a_sharded_bf16_base_reports_time_memory_and_the_end_to_end_check(tmp_path):
    r = _bench(tmp_path, "--shard-mib", "0.1")
    assert r["shape"] == "tiny" and r["base"] == "bf16" and r["device"] == "cpu"
    assert r["seconds"] > 0 and 0 < r["peakCpuRssGiB"] < 8 and r["peakGpuAllocatedGiB"] is None
    assert r["shards"] >= 3 and r["mergedBytes"] > r["parameters"] * 2 * 0.99
    assert r["check"]["method"] == "logits" and r["check"]["relativeError"] < r["check"]["tolerance"]
    merged = tmp_path / "w" / "tiny-merged"
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == r["shards"]
    assert "lora" not in json.dumps(index) and (merged / "config.json").is_file()


def test_merge_bench_on_a_4bit_base_can_discard_its_output(tmp_path):
    r = _bench(tmp_path, "--base", "4bit", "--discard-output")
    assert r["base"] == "4bit" and r["shards"] > 1 and r["mergedBytes"] > 0
    assert r["check"]["method"] == "layers" and r["check"]["layerRelativeError"] < r["check"]["tolerance"]
    assert not list((tmp_path / "w" / "tiny-merged").glob("*.safetensors"))
