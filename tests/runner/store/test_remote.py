"""Whole jobs against real remote protocols: models and data from the Hub and S3, output to S3 and the Hub,
checkpoints on S3 - through the real huggingface_hub and boto3 clients."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from runner.job import run_job
from runner.report.events import Reporter
from runner.api.parse import parse_job

from tests.conftest import QA_ROWS, job_doc


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _reporter(tmp_path):
    out = io.StringIO()
    return Reporter(stdout=out, stderr=io.StringIO(), termination_log=str(tmp_path / "t")), out


def test_hub_model_and_s3_data_to_s3_output_with_s3_checkpoints(tiny_llama, hub_server, s3_server, tmp_path):
    from transformers import AutoModelForCausalLM

    hub_server.seed("acme/tiny-llama", _files(tiny_llama))
    body = "".join(json.dumps(r) + "\n" for r in QA_ROWS).encode()
    s3_server.client.put_object(Bucket=s3_server.bucket, Key="data/qa.jsonl", Body=body)
    dest = f"s3://{s3_server.bucket}/models/qa-ft"
    job = parse_job(job_doc("hf://acme/tiny-llama", f"s3://{s3_server.bucket}/data/qa.jsonl", dest,
                            training={"maxSteps": 4, "saveSteps": 2}))
    reporter, _ = _reporter(tmp_path)
    result = run_job(job, reporter, work_dir=tmp_path / "w")
    assert result["output"] == dest

    keys = {o["Key"] for o in s3_server.client.list_objects_v2(Bucket=s3_server.bucket)["Contents"]}
    assert "models/qa-ft/finetune-manifest.json" in keys and "models/qa-ft/model.safetensors" in keys
    assert "models/qa-ft/adapter/adapter_model.safetensors" in keys
    assert {"models/qa-ft.checkpoints/checkpoint-4/COMPLETE", "models/qa-ft.checkpoints/job-fingerprint.json"} <= keys

    # What landed in S3 is a loadable model.
    local = tmp_path / "downloaded"
    for key in keys:
        if key.startswith("models/qa-ft/"):
            target = local / key.removeprefix("models/qa-ft/")
            target.parent.mkdir(parents=True, exist_ok=True)
            s3_server.client.download_file(s3_server.bucket, key, str(target))
    assert AutoModelForCausalLM.from_pretrained(local).config.model_type == "llama"


def test_a_second_attempt_resumes_from_s3_checkpoints(tiny_llama, s3_server, tmp_path):
    """Checkpoints on S3 are the job's own: the next attempt (here: another run of the same job) is not refused
    at Validating for what they hold, it resumes from them."""
    body = "".join(json.dumps(r) + "\n" for r in QA_ROWS).encode()
    s3_server.client.put_object(Bucket=s3_server.bucket, Key="data/qa.jsonl", Body=body)
    ckpt = f"s3://{s3_server.bucket}/runs/ckpt"
    data = f"s3://{s3_server.bucket}/data/qa.jsonl"
    first = parse_job(job_doc(tiny_llama, data, f"s3://{s3_server.bucket}/runs/first", merge={"enabled": False},
                              training={"maxSteps": 4, "saveSteps": 2}, output={"checkpoints": ckpt}))
    run_job(first, _reporter(tmp_path)[0], work_dir=tmp_path / "w1")
    again = parse_job(job_doc(tiny_llama, data, f"s3://{s3_server.bucket}/runs/again", merge={"enabled": False},
                              training={"maxSteps": 4, "saveSteps": 2}, output={"checkpoints": ckpt}))
    reporter, out = _reporter(tmp_path)
    result = run_job(again, reporter, work_dir=tmp_path / "w2")
    assert result["output"] == f"s3://{s3_server.bucket}/runs/again"
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    resumed = [e for e in events if e["event"] == "resumed"]
    assert [(e["name"], e["step"]) for e in resumed] == [("checkpoint-4", 4)], events[:8]


def test_hub_dataset_split_to_a_private_hub_repo_in_one_commit(tiny_llama, hub_server, tmp_path):
    import pandas as pd

    buf = io.BytesIO()
    pd.DataFrame(QA_ROWS).to_parquet(buf)
    hub_server.seed("acme/qa", {"data/train-00000-of-00001.parquet": buf.getvalue()}, repo_type="dataset")
    hub_server.seed("acme/tiny-llama", _files(tiny_llama))
    doc = job_doc("hf://acme/tiny-llama", "hf://datasets/acme/qa", "hf://acme/qa-ft",
                  dataset={"split": "train[:50%]"},
                  output={"destination": "hf://acme/qa-ft", "checkpoints": str(tmp_path / "ckpt")},
                  training={"maxSteps": 2})
    reporter, out = _reporter(tmp_path)
    result = run_job(parse_job(doc), reporter, work_dir=tmp_path / "w")

    assert hub_server.commits("acme/qa-ft") == 1 and hub_server.is_private("acme/qa-ft")
    files = hub_server.files("acme/qa-ft")
    for name in ("config.json", "model.safetensors", "README.md", "adapter/adapter_config.json",
                 "report/metrics.json", "report/loss.png", "finetune-manifest.json"):
        assert name in files, name
    assert "acme/qa-ft" in result["output"]
    metrics = json.loads(files["report/metrics.json"])
    assert metrics["examples"] == len(QA_ROWS) // 2  # the split was honoured


def test_missing_hub_model_fails_in_validation(hub_server, qa_jsonl, tmp_path):
    from runner.api.errors import PermanentError

    reporter, out = _reporter(tmp_path)
    with pytest.raises(PermanentError) as e:
        run_job(parse_job(job_doc("hf://acme/nope", qa_jsonl, tmp_path / "o")), reporter, work_dir=tmp_path / "w")
    assert "acme/nope" in e.value.message
    assert [json.loads(l)["phase"] for l in out.getvalue().splitlines()] == ["Validating"]
