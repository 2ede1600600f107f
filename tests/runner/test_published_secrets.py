"""No spec.env value and no secret reaches anything the runner publishes (the Hub, S3), logs or reports."""
from __future__ import annotations

from pathlib import Path

import yaml

from runner.report import artifacts
from runner.api.parse import parse_job
from tests.conftest import job_doc, run_cli

SECRET = "sk-wandb-0123456789abcdef"  # a plain env value, as people set API keys
ENV = [{"name": "WANDB_API_KEY", "value": SECRET},
       {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "team-b-secret", "key": "password"}}}]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_report_publishes_env_names_only(tmp_path):
    job = parse_job(job_doc("hf://org/base", "s3://data/train.jsonl", "s3://models/out", env=ENV,
                            hfTokenSecretRef={"name": "hf", "key": "token"}))
    artifacts.write_report(tmp_path / "report", job=job, metrics={"train_loss": 1.0}, history=[{"step": 1, "loss": 1.0}],
                           lengths=[10, 20], samples=[])
    published = yaml.safe_load((tmp_path / "report" / "job.yaml").read_text())
    assert published["spec"]["env"] == [{"name": "WANDB_API_KEY"}, {"name": "FROM_SECRET"}]
    assert published["spec"]["hfTokenSecretRef"] == {"name": "hf", "key": "token"}  # where, never the content
    for name, data in _files(tmp_path / "report").items():
        assert SECRET.encode() not in data and b"team-b-secret" not in data and b"password" not in data, name
    card = artifacts.model_card(job, {"train_loss": 1.0}, merged=True)
    assert SECRET not in card and "team-b-secret" not in card


def test_a_whole_run_publishes_no_env_value(tiny_llama, qa_jsonl, tmp_path):
    """The real runner: the published directory, its stdout/stderr and its result hold no env value."""
    out = tmp_path / "out"
    doc = job_doc(tiny_llama, qa_jsonl, out, env=ENV, training={"maxSteps": 2, "saveSteps": 2},
                  merge={"enabled": False})
    code, events, stderr, result = run_cli(tmp_path, doc, env={"WANDB_API_KEY": SECRET, "WANDB_MODE": "disabled"})
    assert code == 0, stderr[-3000:]
    files = _files(out)
    assert "report/job.yaml" in files
    for name, data in files.items():
        assert SECRET.encode() not in data and b"team-b-secret" not in data, name
    assert SECRET not in str(events) and SECRET not in stderr and SECRET not in str(result)
