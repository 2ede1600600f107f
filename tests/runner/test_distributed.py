"""More than one process: torchrun-launched data parallel training (gloo on CPU), rank-0-only side effects,
and a rank that dies failing the attempt cleanly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from runner.api import errors
from tests.conftest import ROOT, job_doc, run_cli


def _events_of(events, kind):
    return [e for e in events if e["event"] == kind]


def test_two_processes_split_the_data_and_only_rank0_writes(tiny_llama, qa_jsonl, tmp_path):
    doc = job_doc(tiny_llama, qa_jsonl, tmp_path / "one" / "out", training={"epochs": 1, "saveSteps": 2},
                  dataset={"packing": False})
    del doc["spec"]["training"]["maxSteps"]
    (tmp_path / "one").mkdir()
    code, events, _, _ = run_cli(tmp_path / "one", doc)
    assert code == 0
    single_total = _events_of(events, "progress")[-1]["totalSteps"]

    (tmp_path / "two").mkdir()
    doc["spec"]["output"]["destination"] = str(tmp_path / "two" / "out")
    code, events, stderr, result = run_cli(tmp_path / "two", doc, env={"FINETUNE_NPROC": "2"})
    assert code == 0, stderr[-3000:]
    assert "launching 2 processes" in stderr
    progress = _events_of(events, "progress")
    assert progress[-1]["totalSteps"] == (single_total + 1) // 2  # each step takes a batch from each rank
    # Rank 0 alone reports, checkpoints and publishes: one of each, nothing duplicated.
    assert [e["phase"] for e in _events_of(events, "phase")] == [
        "Validating", "Downloading", "Training", "Merging", "Uploading"]
    assert len(_events_of(events, "result")) == 1 and result["phase"] == "Succeeded"
    steps = [e["step"] for e in _events_of(events, "checkpoint")]
    assert steps == sorted(set(steps)) and steps[-1] == progress[-1]["totalSteps"]
    ckpts = sorted(p.name for p in (tmp_path / "two" / "out.checkpoints").iterdir())
    assert ckpts == sorted(["job-fingerprint.json", *[f"checkpoint-{s}" for s in steps[-2:]]])
    assert (tmp_path / "two" / "out" / "finetune-manifest.json").is_file()


def _rank_pid(job: Path, rank: int) -> int | None:
    """The pid of the runner process of `job` whose environment says RANK=<rank>."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and str(job).encode() in cmdline and b"torch.distributed.run" not in cmdline:
            return int(proc.name)
    return None


def test_a_rank_that_dies_fails_the_attempt_retryably_without_hanging(tiny_llama, qa_jsonl, tmp_path):
    doc = job_doc(tiny_llama, qa_jsonl, tmp_path / "out", training={"maxSteps": 500, "saveSteps": 1000,
                                                                     "loggingSteps": 1})
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    term = tmp_path / "term"
    proc = subprocess.Popen([sys.executable, "-m", "runner", "run", str(job), "--termination-log", str(term)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "FINETUNE_NPROC": "2"})
    for line in proc.stdout:
        if json.loads(line)["event"] == "progress":
            break
    victim = _rank_pid(job, 1)
    assert victim, "rank 1 not found"
    os.kill(victim, signal.SIGKILL)
    started = time.monotonic()
    proc.stdout.read()
    code = proc.wait(timeout=180)
    assert time.monotonic() - started < 180
    result = json.loads(term.read_text())
    assert code in (errors.EXIT_RETRYABLE, errors.EXIT_UNEXPECTED) and result["retryable"] is True
    assert result["phase"] == "Failed"
    assert not (tmp_path / "out" / "finetune-manifest.json").exists()


def test_more_gpus_than_visible_is_a_permanent_error(tiny_llama, qa_jsonl, tmp_path):
    doc = job_doc(tiny_llama, qa_jsonl, tmp_path / "out", resources={"gpus": 2})
    code, _, _, result = run_cli(tmp_path, doc)
    assert code == errors.EXIT_PERMANENT
    assert "resources.gpus: 2 GPUs requested but 0 visible" in result["message"]
