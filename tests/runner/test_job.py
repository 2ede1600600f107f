"""The whole job in-process on real 4-bit models: train, merge, publish, resume."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from runner.api.errors import PermanentError, Preempted, SpecError
from runner.job import run_job
from runner.report.events import Reporter
from runner.api.parse import parse_job
from runner.train.trainer import StopFlag

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
    with pytest.raises(Preempted, match="saving checkpoint-4 .* resumes from step 4"):
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
    assert metrics["resumed_from"] == "checkpoint-4" and metrics["global_step"] == 6
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


# ------------------------------------------------------------------- the destination: nothing of the user's lost
def _tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def test_a_folder_of_the_users_files_is_refused_at_validating_and_left_untouched(tiny_llama, qa_jsonl, tmp_path):
    project = tmp_path / "my-project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "train.py").write_text("print('mine')\n")
    (project / "README.md").write_text("# my project\n")
    before = _tree(project)
    reporter, buf = _reporter(tmp_path)
    with pytest.raises(SpecError) as e:
        run_job(parse_job(job_doc(tiny_llama, qa_jsonl, project)), reporter, work_dir=tmp_path / "w")
    assert e.value.exit_code == 2 and e.value.reason == "InvalidSpec"
    assert "output.destination" in e.value.message and "did not write" in e.value.message
    assert "new or empty directory" in e.value.message
    assert [ev["phase"] for ev in _events(buf) if ev["event"] == "phase"] == ["Validating"]
    assert _tree(project) == before


@pytest.mark.parametrize("where", ["root", "data-folder", "data-file-parent-of", "inside-model", "checkpoints-inside"])
def test_a_destination_overlapping_the_data_model_or_checkpoints_is_refused(where, tiny_llama, qa_jsonl, tmp_path):
    out, extra = tmp_path / "out", {}
    if where == "root":
        out = Path("/")
    elif where == "data-folder":
        out = qa_jsonl.parent / "out"
        extra = {"dataset": {"source": str(out)}}
    elif where == "data-file-parent-of":
        out = qa_jsonl.parent
    elif where == "inside-model":
        out = tiny_llama / "finetuned"
    else:
        extra = {"output": {"destination": str(out), "checkpoints": str(out / "ckpt")}}
    doc = job_doc(tiny_llama, qa_jsonl, out, **extra)
    if where == "data-folder":  # the job's own dataset folder, holding its data
        out.mkdir()
        (out / "qa.jsonl").write_bytes(qa_jsonl.read_bytes())
    reporter, buf = _reporter(tmp_path)
    with pytest.raises(SpecError) as e:
        run_job(parse_job(doc), reporter, work_dir=tmp_path / "w")
    field = "output.checkpoints" if where == "checkpoints-inside" else "dataset.source"
    field = "model.source" if where in ("root", "inside-model") else field
    assert f" {field} (" in e.value.message and "output.destination: " in e.value.message
    assert [ev["phase"] for ev in _events(buf) if ev["event"] == "phase"] == ["Validating"]
    assert qa_jsonl.exists() and (tiny_llama / "config.json").exists()


def test_rerun_is_a_noop_and_a_resume_reports_the_whole_run(tiny_llama, qa_jsonl, tmp_path):
    out = tmp_path / "out"
    ckpts = tmp_path / "out.checkpoints"
    job = parse_job(job_doc(tiny_llama, qa_jsonl, out, training={"maxSteps": 6, "saveSteps": 3, "loggingSteps": 2}))
    first = run_job(job, _reporter(tmp_path)[0], work_dir=tmp_path / "w1")
    full = json.loads((out / "report/history.json").read_text())
    assert [h["step"] for h in full] == [1, 2, 3, 4, 6]  # every checkpoint (3, 6) is a logged step

    # 1. The same job again: nothing trained, nothing published, nothing touched.
    published, saved = _tree(out), _tree(ckpts)
    reporter, buf = _reporter(tmp_path)
    again = run_job(job, reporter, work_dir=tmp_path / "w2")
    assert again["alreadyComplete"] is True and "already complete" in again["message"]
    assert again["metrics"]["train_loss"] == pytest.approx(first["metrics"]["train_loss"])
    assert [ev["phase"] for ev in _events(buf) if ev["event"] == "phase"] == ["Validating"]
    assert _tree(out) == published and _tree(ckpts) == saved

    # 2. Output gone, last checkpoint at maxSteps: nothing to train (not one step past), whole history kept.
    shutil.rmtree(out)
    reporter, buf = _reporter(tmp_path)
    run_job(job, reporter, work_dir=tmp_path / "w3")
    assert not [ev for ev in _events(buf) if ev["event"] == "progress"]
    metrics = json.loads((out / "report/metrics.json").read_text())
    assert metrics["global_step"] == 6 and metrics["resumed_from"] == "checkpoint-6"
    assert json.loads((out / "report/history.json").read_text()) == full
    assert metrics["train_loss"] == pytest.approx(first["metrics"]["train_loss"], rel=1e-6)

    # 3. Interrupted after the checkpoint at 3: the resumed run's report has the steps before the resume too.
    shutil.rmtree(out)
    shutil.rmtree(ckpts / "checkpoint-6")
    reporter, buf = _reporter(tmp_path)
    run_job(job, reporter, work_dir=tmp_path / "w4")
    assert [ev["step"] for ev in _events(buf) if ev["event"] == "progress"] == [4, 6]
    history = json.loads((out / "report/history.json").read_text())
    metrics = json.loads((out / "report/metrics.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4, 6] and history[:3] == full[:3]
    assert metrics["resumed_from"] == "checkpoint-3" and metrics["global_step"] == 6
    losses = [h["loss"] for h in history]
    whole = (losses[0] + losses[1] + losses[2] + losses[3] + 2 * losses[4]) / 6
    assert metrics["train_loss"] == pytest.approx(whole)  # the loss of all 6 steps, not of the last 3
    assert metrics["train_loss"] == pytest.approx(first["metrics"]["train_loss"], rel=0.02)


def test_republishing_the_same_job_with_a_changed_spec_replaces_its_output(tiny_llama, qa_jsonl, tmp_path):
    out = tmp_path / "out"
    doc = job_doc(tiny_llama, qa_jsonl, out, training={"maxSteps": 2, "saveSteps": 2})
    run_job(parse_job(doc), _reporter(tmp_path)[0], work_dir=tmp_path / "w1")
    assert (out / "adapter/adapter_config.json").is_file()
    first = json.loads((out / "finetune-manifest.json").read_text())["job"]
    changed = job_doc(tiny_llama, qa_jsonl, out, training={"maxSteps": 2, "saveSteps": 2},
                      output={"destination": str(out), "pushAdapter": False})
    result = run_job(parse_job(changed), _reporter(tmp_path)[0], work_dir=tmp_path / "w2")
    assert "alreadyComplete" not in result
    manifest = json.loads((out / "finetune-manifest.json").read_text())
    assert manifest["job"]["name"] == first["name"] and manifest["job"]["spec"] != first["spec"]
    assert not (out / "adapter").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp siblings


# ------------------------------------------------------------------------- failures classified on purpose
def test_a_model_that_needs_trust_remote_code_is_permanent_and_named(tiny_llama, qa_jsonl, tmp_path):
    model = tmp_path / "custom-model"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="acme-lm", auto_map={"AutoConfig": "configuration_acme.AcmeConfig",
                                                  "AutoModelForCausalLM": "modeling_acme.AcmeForCausalLM"})
    (model / "config.json").write_text(json.dumps(config))
    reporter, buf = _reporter(tmp_path)
    with pytest.raises(PermanentError) as e:
        run_job(parse_job(job_doc(model, qa_jsonl, tmp_path / "o")), reporter, work_dir=tmp_path / "w")
    assert e.value.exit_code == 2 and e.value.reason == "InvalidSpec" and not e.value.retryable
    assert e.value.message.startswith("model.trustRemoteCode: ") and "trustRemoteCode: true" in e.value.message
    assert "Training" not in [ev.get("phase") for ev in _events(buf)]


def test_a_template_that_fails_on_a_row_is_permanent_invalid_spec(tiny_llama, qa_jsonl, tmp_path):
    doc = job_doc(tiny_llama, qa_jsonl, tmp_path / "o",
                  dataset={"template": {"prompt": "Q: {{ question + 1 }}", "completion": " {{ answer }}"}})
    reporter, buf = _reporter(tmp_path)
    with pytest.raises(PermanentError) as e:
        run_job(parse_job(doc), reporter, work_dir=tmp_path / "w")
    assert e.value.exit_code == 2 and e.value.reason == "InvalidSpec"
    assert e.value.message.startswith("dataset.template.prompt: the template failed on a row (TypeError")
    assert "Training" not in [ev.get("phase") for ev in _events(buf)]


def test_a_stop_says_from_which_step_a_rerun_resumes():
    stop = StopFlag()
    assert "starts over" in stop.stopped("/ck").message
    stop.signal_name, stop.saved = "Ctrl-C", ("checkpoint-40", 40)
    message = stop.stopped("s3://b/ck").message
    assert message.startswith("received Ctrl-C") and "checkpoint-40 to s3://b/ck" in message
    assert "running the same job again resumes from step 40" in message


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc (a place even root cannot write)")
def test_an_unwritable_checkpoint_location_is_found_at_validating(tiny_llama, qa_jsonl, tmp_path):
    doc = job_doc(tiny_llama, qa_jsonl, tmp_path / "o",
                  output={"destination": str(tmp_path / "o"), "checkpoints": "/proc/finetune-checkpoints"})
    reporter, buf = _reporter(tmp_path)
    with pytest.raises(PermanentError, match="cannot write under /proc .*set output.checkpoints to a writable place"):
        run_job(parse_job(doc), reporter, work_dir=tmp_path / "w")
    assert [ev["phase"] for ev in _events(buf) if ev["event"] == "phase"] == ["Validating"]
