"""report/metrics.json: snake_case keys at the top level, and the renamed keys still under their old names (with
`deprecated_keys` saying the new ones) for one release."""
from __future__ import annotations

import json

from runner.api.parse import parse_job
from runner.report import artifacts
from tests.conftest import job_doc

CHECK = {"method": "logits", "relativeLogitError": 0.001, "tolerance": 0.03}
PHASES = {"Validating": 0.1, "Downloading": 2.0, "Training": 30.0, "Merging": 4.0}


def _written(tmp_path, metrics: dict) -> dict:
    job = parse_job(job_doc("hf://org/base", "s3://data/train.jsonl", "s3://models/out"))
    artifacts.write_report(tmp_path / "report", job=job, metrics=metrics, history=[{"step": 1, "loss": 1.0}],
                           lengths=[10, 20], samples=[])
    return json.loads((tmp_path / "report" / "metrics.json").read_text())


def test_renamed_keys_are_written_under_both_names_and_the_old_ones_say_their_new_name(tmp_path):
    doc = _written(tmp_path, {"train_loss": 0.5, "resumed_from": "checkpoint-4", "truncated_examples": 2,
                              "merge_check": CHECK, "phase_seconds": PHASES})
    assert (doc["resumed_from"], doc["truncated_examples"], doc["merge_check"], doc["phase_seconds"]) == (
        "checkpoint-4", 2, CHECK, PHASES)
    assert (doc["resumedFrom"], doc["truncatedExamples"], doc["mergeCheck"], doc["phaseSeconds"]) == (
        "checkpoint-4", 2, CHECK, PHASES)
    assert doc["deprecated_keys"] == {"resumedFrom": "resumed_from", "truncatedExamples": "truncated_examples",
                                      "mergeCheck": "merge_check", "phaseSeconds": "phase_seconds"}
    assert doc["train_loss"] == 0.5


def test_without_renamed_keys_nothing_is_marked_deprecated(tmp_path):
    doc = _written(tmp_path, {"train_loss": 0.5, "resumed_from": None})
    assert doc == {"train_loss": 0.5, "resumed_from": None, "resumedFrom": None,
                   "deprecated_keys": {"resumedFrom": "resumed_from"}}
    doc = _written(tmp_path, {"train_loss": 0.5})
    assert doc == {"train_loss": 0.5}

