"""The final screen: the cost estimated as training started, beside the training time measured."""
from __future__ import annotations

import io

from runner.api import cost, status
from runner.api.parse import manifest, parse_job
from runner.report.console import Console
from runner.report.summary import summary


def _screen(metrics: dict) -> str:
    console = Console(io.StringIO(), color=False, tick=None, log_path=None, width=160)
    console.details["metrics"] = metrics
    return "\n".join(summary(console, {"phase": status.SUCCEEDED, "output": "/tmp/out",
                                       "metrics": {"train_runtime": metrics.get("train_runtime")}}))


def test_the_summary_shows_the_estimate_beside_the_measured_training_time():
    spec = parse_job(manifest("j", {"model": {"source": "hf://meta-llama/Meta-Llama-3-8B"},
                                    "dataset": {"source": "/d.jsonl"}, "training": {"maxSteps": 30},
                                    "output": {"destination": "/out"}})).spec
    e = cost.from_spec(spec, "h100").model_dump(by_alias=True, exclude_none=True)
    screen = _screen({"estimate": e, "train_runtime": e["seconds"] * 1.1})
    line = next(ln for ln in screen.splitlines() if ln.strip().startswith("Estimate"))
    assert e["summary"] in line and "1 x h100" in line and "+10%" in line and "h100-8b-packed" in line
    assert f"actual {e['seconds'] * 1.1:.1f}s" in line


def test_no_estimate_no_line():
    assert "Estimate" not in _screen({"train_runtime": 3.0})  # a CPU run: the table has no CPU rows
