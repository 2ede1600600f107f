"""The whole job in-process on real 4-bit models: train, merge, publish, resume."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from runner.api.errors import PermanentError, Preempted
from runner.job import run_job
from runner.report import Reporter
from runner.api.parse import parse_job
from runner.train import StopFlag

from tests.conftest import ARCHS, job_doc


def _reporter(tmp_path: Path, sinks=()) -> tuple[Reporter, io.StringIO]:
    out = io.StringIO()
    return Reporter(stdout=out, stderr=io.StringIO(), termination_log=str(tmp_path / "term.log"), sinks=list(sinks)), out


def _events(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


@pytest.mark.parametrize("arch", ARCHS)
def test_qlora_job_publishes_a_merged_model_that_matches_base_plus_adapter(arch, tiny_models, qa_jsonl, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    job = parse_job(job_doc(tiny_models[arch], qa_jsonl, out,
                            training={"maxSteps": 8, "gradientCheckpointing": arch == "llama"},
                            evalPrompts=["Q: What is 3 plus 4 ?\nA:"]))
    reporter, buf = _reporter(tmp_path)
    result = run_job(job, reporter, work_dir=tmp_path / "work")
    events = _events(buf)

    phases = [e["phase"] for e in events if e["event"] == "phase"]
    assert phases == ["Validating", "Downloading", "Training", "Merging", "Uploading"]
    progress = [e for e in events if e["event"] == "progress"]
    assert progress[-1]["step"] == 8 and progress[-1]["totalSteps"] == 8
    assert all(p["tokensPerSecond"] > 0 for p in progress)
    assert progress[-1]["loss"] < progress[0]["loss"]  # it learned something
    assert result["output"] == str(out)

    # The published layout: merged model at the root, adapter and report beside it, manifest last.
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "adapter/adapter_config.json",
                 "report/metrics.json", "report/loss.png", "report/token_lengths.png", "report/samples.json",
                 "report/job.yaml", "finetune-manifest.json"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert str(tiny_models[arch]) in card and "learningRate" in card
    samples = json.loads((out / "report/samples.json").read_text())
    assert samples[0]["prompt"].startswith("Q: What is 3") and {"before", "after"} <= set(samples[0])

    # The merged fp16 model loads with plain transformers and computes what base(16-bit)+adapter computes.
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16)
    assert merged.dtype == torch.float16
    base = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float16)
    with_adapter = PeftModel.from_pretrained(base, out / "adapter")
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(["What is 5 plus 2 ?"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits.float(), with_adapter(input_ids=ids).logits.float()
    assert (a - b).abs().mean() / b.abs().mean() < 1e-2
    # Every adapter layer learned (gradients reached the lowest layers through the frozen 4-bit base).
    from safetensors.torch import load_file

    lora_b = {k: v for k, v in load_file(out / "adapter/adapter_model.safetensors").items() if "lora_B" in k}
    assert lora_b and all(v.abs().max() > 0 for v in lora_b.values()), [k for k, v in lora_b.items() if not v.any()]
    # ...and the adapter really changed the model.
    with torch.no_grad(), with_adapter.disable_adapter():
        plain = with_adapter(input_ids=ids).logits.float()
    assert (plain - b).abs().max() > 1e-3


def test_resume_continues_from_the_newest_complete_checkpoint(tiny_llama, qa_jsonl, tmp_path):
    out = tmp_path / "out"
    doc = job_doc(tiny_llama, qa_jsonl, out, training={"maxSteps": 6, "saveSteps": 2, "loggingSteps": 1})
    job = parse_job(doc)
    stop = StopFlag()

    def preempt_after_step_4(event):  # plays SIGTERM arriving during step 4
        if event.get("event") == "progress" and event["step"] == 3:
            stop.requested = True

    reporter, buf = _reporter(tmp_path, sinks=[preempt_after_step_4])
    with pytest.raises(Preempted):
        run_job(job, reporter, work_dir=tmp_path / "w1", stop=stop)
    ckpts = out.parent / "out.checkpoints"
    saved = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("checkpoint-"))
    assert saved[-1] == "checkpoint-4"  # preemption saved the step it stopped at
    assert not (out / "finetune-manifest.json").exists()  # nothing published

    # A half-written checkpoint from a crash must be ignored, never resumed from.
    junk = ckpts / ".tmp-checkpoint-5"
    junk.mkdir()
    (junk / "adapter_model.safetensors").write_bytes(b"partial")

    reporter2, buf2 = _reporter(tmp_path)
    result = run_job(job, reporter2, work_dir=tmp_path / "w2")
    steps = [e["step"] for e in _events(buf2) if e["event"] == "progress"]
    assert steps and min(steps) == 5 and max(steps) == 6  # continued at step 5, not from scratch
    metrics = json.loads((out / "report/metrics.json").read_text())
    assert metrics["resumedFrom"] == "checkpoint-4" and metrics["global_step"] == 6
    assert result["output"] == str(out)


def test_checkpoints_of_another_spec_are_not_resumed(tiny_llama, qa_jsonl, tmp_path):
    out = tmp_path / "out"
    first = parse_job(job_doc(tiny_llama, qa_jsonl, out, training={"maxSteps": 2, "saveSteps": 2}))
    run_job(first, _reporter(tmp_path)[0], work_dir=tmp_path / "w1")
    changed = parse_job(job_doc(tiny_llama, qa_jsonl, out, lora={"r": 4}, training={"maxSteps": 2, "saveSteps": 2}))
    with pytest.raises(PermanentError, match="output.checkpoints: .* different lora"):
        run_job(changed, _reporter(tmp_path)[0], work_dir=tmp_path / "w2")


def test_merge_disabled_publishes_the_adapter_at_the_root(tiny_llama, qa_jsonl, tmp_path):
    from peft import PeftConfig

    out = tmp_path / "out"
    job = parse_job(job_doc(tiny_llama, qa_jsonl, out, merge={"enabled": False}, training={"maxSteps": 2}))
    reporter, buf = _reporter(tmp_path)
    run_job(job, reporter, work_dir=tmp_path / "w")
    assert "Merging" not in [e.get("phase") for e in _events(buf)]
    assert PeftConfig.from_pretrained(out).base_model_name_or_path
    assert not (out / "model.safetensors").exists()


def test_target_module_not_in_model_fails_before_training(tiny_models, qa_jsonl, tmp_path):
    job = parse_job(job_doc(tiny_models["gpt_neox"], qa_jsonl, tmp_path / "o", lora={"targetModules": ["q_proj"]}))
    reporter, buf = _reporter(tmp_path)
    with pytest.raises(PermanentError) as e:
        run_job(job, reporter, work_dir=tmp_path / "w")
    assert "lora.targetModules: q_proj not in this model" in e.value.message
    assert "query_key_value" in e.value.message
    assert "Training" not in [ev.get("phase") for ev in _events(buf)]
