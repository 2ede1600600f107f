"""`python -m runner run job.yaml` as a user and a supervisor see it: JSON lines, exit codes, messages."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from runner.api import errors
from tests.conftest import ROOT, job_doc, run_cli

SECRET = "hf_SuperSecretTokenValue123456"


def interrupt_training(job: Path, term: Path, signum: int) -> tuple[int, dict]:
    """Run `job` and send `signum` once training is under way (step 2): (exit code, termination result)."""
    proc = subprocess.Popen([sys.executable, "-m", "runner", "run", str(job), "--termination-log", str(term)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "progress" and event["step"] >= 2:
            proc.send_signal(signum)
            break
    proc.stdout.read()
    return proc.wait(timeout=120), json.loads(term.read_text())


def test_success_reports_phases_progress_and_result(tiny_llama, qa_jsonl, tmp_path):
    code, events, stderr, result = run_cli(tmp_path, job_doc(tiny_llama, qa_jsonl, tmp_path / "out"),
                                           env={"HF_TOKEN": SECRET})
    assert code == 0, stderr[-3000:]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "phase" and kinds[-1] == "result"
    assert [e["phase"] for e in events if e["event"] == "phase"] == [
        "Validating", "Downloading", "Training", "Merging", "Uploading"]
    progress = [e for e in events if e["event"] == "progress"]
    assert {"step", "totalSteps", "epoch", "loss", "learningRate", "tokensPerSecond"} <= set(progress[-1])
    assert result["phase"] == "Succeeded" and result["exitCode"] == 0
    assert result["output"] == str(tmp_path / "out") and "train_loss" in result["metrics"]
    assert SECRET not in stderr and SECRET not in json.dumps(events)
    assert "gemm_4bit_forward" not in stderr and "pip install kernels" not in stderr  # runner/model/notices.py


def test_the_notices_the_runner_drops_are_real_and_only_those():
    """bitsandbytes logs an optional-kernel notice at import on CPUs with AVX512-BF16 (this machine's kind):
    printed without the runner's filters, gone with them, while its other warnings still pass."""
    probe = ("import logging, sys; logging.basicConfig(stream=sys.stderr)\n"
             "{quiet}\n"
             "from bitsandbytes.backends.cpu import ops\n"
             "print(bool(ops.has_avx512bf16()))\n"
             "ops.logger.warning('another bitsandbytes warning')\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    plain = subprocess.run([sys.executable, "-c", probe.format(quiet="")], capture_output=True, text=True, env=env)
    quieted = probe.format(quiet="from runner.model import notices; notices.quiet()")
    quiet = subprocess.run([sys.executable, "-c", quieted], capture_output=True, text=True, env=env)
    assert plain.returncode == quiet.returncode == 0, plain.stderr + quiet.stderr
    if plain.stdout.strip() == "True":  # the CPU the notice is about
        assert "Failed to load CPU gemm_4bit_forward" in plain.stderr
    assert "gemm_4bit_forward" not in quiet.stderr
    assert "another bitsandbytes warning" in quiet.stderr


def test_invalid_spec_exits_permanent_with_every_problem(tmp_path):
    doc = {"model": {"source": "./m", "trustRemoteCod": True}, "dataset": {"source": "d.jsonl", "packing": "maybe"},
           "output": {"destination": "./o"}}
    code, events, stderr, result = run_cli(tmp_path, doc)
    assert code == errors.EXIT_PERMANENT
    assert result["reason"] == "InvalidSpec" and result["retryable"] is False
    assert "model.trustRemoteCod: unknown field; did you mean `trustRemoteCode`?" in result["message"]
    assert "dataset.packing" in result["message"]


def test_validate_refuses_settings_that_belong_to_other_bits_naming_the_field_and_the_fix(tmp_path):
    """Rules that need only the spec are the contract's: `runner validate` (and the admission webhook) refuse them
    before any pod starts."""
    doc = job_doc("./m", "d.jsonl", "./o", quantization={"bits": 16, "quantType": "fp4"},
                  merge={"base": "dequantized"}, training={"strategy": "fsdp"})
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    proc = subprocess.run([sys.executable, "-m", "runner", "validate", "--spec-only", str(job)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == errors.EXIT_PERMANENT, proc.stderr
    assert "Traceback" not in proc.stderr
    assert ("spec.quantization.quantType: applies to 4-bit quantization only, and quantization.bits is 16; remove it "
            "or set bits: 4") in proc.stderr
    assert "spec.merge.base: dequantized means" in proc.stderr and "use original" in proc.stderr
    doc["spec"]["quantization"] = {"bits": 8}
    doc["spec"]["merge"] = {}
    job.write_text(yaml.safe_dump(doc))
    proc = subprocess.run([sys.executable, "-m", "runner", "validate", "--spec-only", str(job)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == errors.EXIT_PERMANENT
    assert "spec.training.strategy: fsdp cannot shard 8-bit (LLM.int8) weights; use data or auto" in proc.stderr


def test_missing_local_model_is_permanent_and_named(qa_jsonl, tmp_path):
    code, _, _, result = run_cli(tmp_path, job_doc(tmp_path / "no-such-model", qa_jsonl, tmp_path / "o"))
    assert code == errors.EXIT_PERMANENT
    assert "no-such-model" in result["message"]


def test_wrong_column_is_permanent_and_lists_the_columns(tiny_llama, qa_jsonl, tmp_path):
    doc = job_doc(tiny_llama, qa_jsonl, tmp_path / "o")
    doc["spec"]["dataset"] = {"source": str(qa_jsonl), "format": "prompt-completion", "columns": {"prompt": "commands"}}
    code, events, _, result = run_cli(tmp_path, doc)
    assert code == errors.EXIT_PERMANENT
    assert "dataset.columns.prompt: column 'commands' is not in the data (columns: question, answer, topic)" in result["message"]
    assert "Training" not in [e.get("phase") for e in events]


def test_hub_destination_without_token_is_permanent(tiny_llama, qa_jsonl, tmp_path):
    doc = job_doc(tiny_llama, qa_jsonl, "hf://org/model", output={"destination": "hf://org/model",
                                                                    "checkpoints": str(tmp_path / "ck")})
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env["HF_TOKEN"] = ""
    code, _, _, result = run_cli(tmp_path, doc, env=env)
    assert code == errors.EXIT_PERMANENT
    assert "HF_TOKEN" in result["message"]


def test_unreachable_s3_is_retryable(tiny_llama, qa_jsonl, tmp_path):
    doc = job_doc(tiny_llama, "s3://bucket/data/qa.jsonl", tmp_path / "o")
    env = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value-never-logged",
           "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_MAX_ATTEMPTS": "1"}
    code, events, stderr, result = run_cli(tmp_path, doc, env=env)
    assert code == errors.EXIT_RETRYABLE, stderr[-2000:]
    assert result["retryable"] is True
    assert "s3cr3t-value-never-logged" not in stderr + json.dumps(events) + json.dumps(result)


def test_sigterm_saves_a_checkpoint_exits_retryable_and_a_rerun_resumes(tiny_llama, qa_jsonl, tmp_path):
    import signal

    out = tmp_path / "out"
    doc = job_doc(tiny_llama, qa_jsonl, out, training={"maxSteps": 20, "saveSteps": 1000, "loggingSteps": 1})
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    code, result = interrupt_training(job, tmp_path / "term", signal.SIGTERM)  # like a node drain
    assert code == errors.EXIT_RETRYABLE
    assert result["retryable"] is True and "SIGTERM" in result["message"]
    saved = [p for p in (tmp_path / "out.checkpoints").iterdir() if p.name.startswith("checkpoint-")]
    assert len(saved) == 1 and (saved[0] / "COMPLETE").exists()
    step = int(saved[0].name.split("-")[1])
    assert 2 <= step < 20

    code, events, stderr, _ = run_cli(tmp_path, doc)  # the same job again resumes where the first stopped
    progress = [e["step"] for e in events if e["event"] == "progress"]
    assert code == 0, stderr[-2000:]
    assert progress[0] == step + 1 and progress[-1] == 20


def test_cuda_out_of_memory_says_which_knobs_to_turn(tiny_llama, qa_jsonl, tmp_path, monkeypatch, capsys):
    """No GPU here: the OOM is raised where training would raise it, and the CLI's handling is checked."""
    import torch

    import runner.job
    from runner.__main__ import main

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(runner.job, "train_adapter", oom)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_doc(tiny_llama, qa_jsonl, tmp_path / "o")))
    code = main(["run", str(job), "--termination-log", str(tmp_path / "term")])
    assert code == errors.EXIT_OUT_OF_MEMORY
    result = json.loads((tmp_path / "term").read_text())
    assert result["reason"] == "OutOfMemory" and result["failedPhase"] == "Training"
    for knob in ("training.batchSize", "training.gradientAccumulationSteps", "dataset.maxLength"):
        assert knob in result["message"]


def test_ctrl_c_during_training_saves_a_checkpoint_and_says_from_which_step_a_rerun_resumes(
        tiny_llama, qa_jsonl, tmp_path):
    import signal

    doc = job_doc(tiny_llama, qa_jsonl, tmp_path / "out",
                  training={"maxSteps": 20, "saveSteps": 1000, "loggingSteps": 1})
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    code, result = interrupt_training(job, tmp_path / "term", signal.SIGINT)
    assert code == errors.EXIT_RETRYABLE
    saved = [p.name for p in (tmp_path / "out.checkpoints").iterdir() if p.name.startswith("checkpoint-")]
    step = int(saved[0].split("-")[1])
    assert result["message"].startswith("received Ctrl-C; stopped after saving checkpoint-")
    assert f"running the same job again resumes from step {step}" in result["message"]
