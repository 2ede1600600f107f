"""Data with no rows, and data that is not a file, are the user's to fix: a permanent error (exit 2) naming
dataset.source and what was read - at Validating where the data is local, at Downloading where it is not - and a
clear line from `validate` and `preview`, never a traceback or a retry."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml

from runner.__main__ import main
from runner.api import errors
from tests.conftest import ROOT, job_doc, run_cli, write_jsonl


def _job(tmp_path, model, data, **overrides):
    doc = job_doc(model, data, tmp_path / "out", **overrides)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path, doc


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"], ids=["zero-bytes", "blank-lines"])
def test_empty_local_data_fails_validate_preview_and_run_at_validating(content, tiny_llama, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    path, doc = _job(tmp_path, tiny_llama, data)

    assert main(["validate", str(path)]) == errors.EXIT_PERMANENT
    err = capsys.readouterr().err
    assert "dataset.source" in err and "0 rows read" in err and "Traceback" not in err

    assert main(["preview", str(path), "--color", "never"]) == errors.EXIT_PERMANENT
    err = capsys.readouterr().err
    assert err.startswith("preview: ") and "dataset.source" in err and "0 rows read" in err

    code, events, stderr, result = run_cli(tmp_path, doc)
    assert code == errors.EXIT_PERMANENT, stderr[-2000:]
    assert "Traceback" not in stderr and "StopIteration" not in stderr
    phases = [e["phase"] for e in events if e.get("event") == "phase"]
    assert phases[-1] == "Validating" and "Downloading" not in phases
    assert "dataset.source" in result["message"] and "0 rows read" in result["message"]


def test_a_split_that_selects_no_rows_names_dataset_split(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", [{"question": "q", "answer": "a"}] * 3)
    _, doc = _job(tmp_path, tiny_llama, data, dataset={"split": "train[:0]"})
    code, _, stderr, result = run_cli(tmp_path, doc)
    assert code == errors.EXIT_PERMANENT and "Traceback" not in stderr
    assert "dataset.split" in result["message"] and "no data" in result["message"]


def test_empty_remote_data_fails_at_downloading_as_permanent(tiny_llama, s3_server, tmp_path):
    s3_server.client.put_object(Bucket=s3_server.bucket, Key="data/empty.jsonl", Body=b"")
    _, doc = _job(tmp_path, tiny_llama, f"s3://{s3_server.bucket}/data/empty.jsonl")
    code, events, stderr, result = run_cli(tmp_path, doc)
    assert code == errors.EXIT_PERMANENT, stderr[-2000:]
    phases = [e["phase"] for e in events if e.get("event") == "phase"]
    assert phases[-1] == "Downloading"
    assert "dataset.source" in result["message"] and "0 rows read" in result["message"]


def test_a_fifo_as_data_is_refused_naming_the_field_without_blocking(tiny_llama, tmp_path, capsys):
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    path, _ = _job(tmp_path, tiny_llama, fifo)
    assert main(["validate", str(path)]) == errors.EXIT_PERMANENT
    err = capsys.readouterr().err
    assert "dataset.source" in err and "FIFO" in err


def test_validate_on_a_fifo_job_file_returns_instead_of_blocking(tmp_path):
    fifo = tmp_path / "job.yaml"
    os.mkfifo(fifo)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "runner", "validate", str(fifo)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == errors.EXIT_PERMANENT and "FIFO" in proc.stderr
    assert time.monotonic() - started < 120  # returned on its own; the timeout above would have raised


def test_a_job_file_written_through_a_pipe_is_read(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", [{"question": "q", "answer": "a"}])
    _, doc = _job(tmp_path, tiny_llama, data)
    text = yaml.safe_dump(doc)
    proc = subprocess.run(["bash", "-c", f'{sys.executable} -m runner validate <(cat <<"EOF"\n{text}\nEOF\n)'],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
