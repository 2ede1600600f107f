"""The runner-vs-Unsloth benchmark's CPU-checkable parts (bench/frontier.py, bench/table.py): the figures of a row,
the plain-loop batches Unsloth trains on, the ratios, and the README table regenerated from committed results."""
from __future__ import annotations

import json

import pytest

from bench import frontier, table


def test_a_row_reports_every_step_and_the_median_of_the_last_ten_after_warmup():
    seconds = [9.0] + [1.0] * 11 + [2.0] * 3
    row = frontier.summarise(seconds, [1000] * 15, warmup=3, peak=7.5)
    assert row["steps"] == 15 and row["stepSeconds"][0] == 9.0
    assert row["last10MedianTokensPerSecond"] == 1000.0  # steps 6-15: seven at 1000/s, three at 500/s
    assert row["meanTokensPerSecond"] == pytest.approx(12000 / 15, rel=1e-3)
    assert row["last10Spread"] == 0.5 and row["peakAllocatedGiB"] == 7.5
    short = frontier.summarise([30.0, 2.0], [16384, 16384], warmup=1, peak=10.0)
    assert short["last10MedianTokensPerSecond"] == 8192.0  # the warm-up step never counts


def test_unsloth_batches_are_the_runners_examples_as_rows():
    packed = frontier.batches(512, {"maxLength": 256, "batchSize": 4}, steps=3)
    assert len(packed) == 3 and all(ids.shape == (4, 256) == labels.shape for ids, labels in packed)
    ids, labels = packed[0]
    assert ((labels == -100) | (labels == ids)).all() and (labels == -100).any() and (labels != -100).any()
    single = frontier.batches(512, {"maxLength": 300, "batchSize": 1, "single": True}, steps=2)
    assert [b[0].shape for b in single] == [(1, 300)] * 2
    assert (single[0][1][0, :90] == -100).all() and (single[0][1][0, 90:] != -100).all()  # 30% prompt


def test_ratios_pair_runner_rows_with_unsloth_rows():
    result = {"runner": {"a": {"last10MedianTokensPerSecond": 150.0, "peakAllocatedGiB": 9.0}, "b": {"error": "x"}},
              "unsloth": {"u": {"last10MedianTokensPerSecond": 100.0, "peakAllocatedGiB": 10.0}},
              "pairs": {"fast": ("a", "u"), "failed": ("b", "u")}}
    r = frontier.ratios(result)
    assert r["fast"] == {"runner": "a", "unsloth": "u", "speed": 1.5, "memory": 0.9}
    assert r["failed"]["speed"] is None and r["failed"]["memory"] is None


def test_the_plan_column_says_how_a_row_ran():
    plan = {"mode": {"checkpointing": "tiled", "offload": "host"}, "microBatch": 1, "microBatchTokens": 524288}
    assert table._mode(plan) == "offloaded checkpointing (tiled), 1x524288"
    assert table._mode({**plan, "gpuLayers": 11}) == (
        "offloaded checkpointing (tiled, 11 layers' inputs on the GPU), 1x524288")
    packed = {"mode": {"checkpointing": "none", "offload": "gpu"}, "microBatch": 2, "microBatchTokens": 4096,
              "accumulation": 2}
    assert table._mode(packed) == "no checkpointing, 2x2048 x2"


def test_the_readme_table_is_regenerated_from_the_committed_results():
    assert table.main(["--check"]) == 0, "run: python -m bench table"
    for path, _ in table.RESULTS:
        result = json.loads((table.ROOT / path).read_text())
        assert result["runner"] and result["unsloth"] and result["pairs"]
