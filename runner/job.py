"""One FineTuneJob, start to finish: validate, download, train, merge, upload.

Each phase lives in its own module; this file only orders them and carries their results along.
"""
from __future__ import annotations

import gc
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from runner import artifacts, data as data_phase, distributed, merge as merge_phase, model as model_phase, parallel
from runner import plan as plan_phase, storage
from runner.api import status
from runner.api.errors import INVALID_SPEC, PermanentError
from runner.report import Reporter
from runner.api.spec import FineTuneJobSpec, Job
from runner.train import StopFlag, train


def checkpoint_location(spec: FineTuneJobSpec) -> storage.Location:
    """`output.checkpoints`, or a sibling of the destination: `<destination>.checkpoints`."""
    if spec.output.checkpoints:
        return storage.Location.parse(spec.output.checkpoints)
    dest = spec.output.destination.rstrip("/")
    return storage.Location.parse(dest + ".checkpoints")


def _uri_problem(field: str, value: str) -> storage.Location:
    try:
        return storage.Location.parse(value)
    except ValueError as e:
        raise PermanentError(f"{field}: {e}", reason=INVALID_SPEC) from e


def _validate(spec: FineTuneJobSpec) -> dict:
    """Settings this machine can run, sources reachable, credentials present, destination writable - before
    any GPU time is spent."""
    plan_phase.check_spec(spec, plan_phase.Machine.here())
    locations = {
        "model": _uri_problem("model.source", spec.model.source),
        "data": _uri_problem("dataset.source", spec.dataset.source),
        "eval": _uri_problem("dataset.evalSource", spec.dataset.eval_source) if spec.dataset.eval_source else None,
    }
    dest = _uri_problem("output.destination", spec.output.destination)
    ckpt_loc = checkpoint_location(spec)
    storage.check_source(locations["model"], repo_type="model")
    storage.check_source(locations["data"], repo_type="dataset")
    if locations["eval"]:
        storage.check_source(locations["eval"], repo_type="dataset")
    storage.check_destination(dest)
    if ckpt_loc.scheme == "s3":
        storage.check_destination(ckpt_loc)
    return locations


def _download(spec: FineTuneJobSpec, loc: dict, work: Path, reporter: Reporter) -> dict:
    """Data first, checked against the format before the (large) model download; then the model, whose
    layers are checked against lora.targetModules."""
    d = spec.dataset
    paths = {"data": storage.download(loc["data"], work / "data", repo_type="dataset"), "eval": None}
    rows = data_phase.load_rows(paths["data"], split=d.split, subset=d.subset)
    data_phase.build_formatter(d, list(rows.column_names), chat_template=lambda *a, **k: "")
    reporter.log(f"data: {len(rows)} training rows")
    if loc["eval"]:
        paths["eval"] = storage.download(loc["eval"], work / "eval-data", repo_type="dataset")
    paths["model"] = storage.download(loc["model"], work / "model", repo_type="model")
    model_phase.check_target_modules(spec.lora, model_phase.linear_module_names(paths["model"], spec.model))
    return paths


def run_job(job: Job, reporter: Reporter, *, work_dir: Path | None = None, stop: StopFlag | None = None) -> dict:
    spec = job.spec
    stop = stop or StopFlag()
    own_work = work_dir is None
    work = Path(work_dir or tempfile.mkdtemp(prefix=f"finetune-{job.name}-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _run(job, spec, reporter, work, stop)
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


def _run(job: Job, spec: FineTuneJobSpec, reporter: Reporter, work: Path, stop: StopFlag) -> dict:
    distributed.init()
    paths = _fetch(spec, work, reporter)
    tokenizer, data = _tokenize(spec, paths, reporter)
    trained = _train(spec, paths["model"], tokenizer, data, work, reporter, stop)
    if not distributed.is_main():
        return {}  # rank 0 merges and publishes
    staging = _assemble(job, spec, paths["model"], tokenizer, data, trained, work, reporter)
    return _upload(job, spec, staging, trained.metrics, reporter)


@dataclass
class _Trained:
    adapter_dir: Path
    history: list[dict]
    metrics: dict
    samples_before: list[str]
    samples_after: list[str] | None


def _fetch(spec: FineTuneJobSpec, work: Path, reporter: Reporter) -> dict:
    """Validating and Downloading, by rank 0 first; the other ranks reuse its files."""
    with distributed.main_first():
        if distributed.is_main():
            reporter.phase(status.VALIDATING)
            locations = _validate(spec)
            reporter.phase(status.DOWNLOADING)
            paths = _download(spec, locations, work, reporter)
            (work / "downloads.json").write_text(json.dumps({k: str(v) if v else None for k, v in paths.items()}))
        else:
            paths = {k: Path(v) if v else None for k, v in json.loads((work / "downloads.json").read_text()).items()}
    return paths


def _tokenize(spec: FineTuneJobSpec, paths: dict, reporter: Reporter):
    d = spec.dataset
    train_rows = data_phase.load_rows(paths["data"], split=d.split, subset=d.subset)
    eval_rows = None
    if paths["eval"]:
        eval_rows = data_phase.load_rows(paths["eval"], split="train" if paths["eval"].is_file() else d.split)
    elif d.eval_split:
        eval_rows = data_phase.load_rows(paths["data"], split=d.eval_split, subset=d.subset)
    tokenizer = model_phase.load_tokenizer(paths["model"], spec.model)
    data = data_phase.prepare(d, train_rows, eval_rows, tokenizer, seed=spec.training.seed)
    reporter.log(
        f"tokenized {len(data.train)} examples as {data.fmt}; {data.truncated} truncated to {d.max_length} tokens"
    )
    return tokenizer, data


def _plan(spec: FineTuneJobSpec, model_dir: Path, work: Path) -> plan_phase.Plan:
    """Made once, by rank 0 (free GPU memory differs a little between ranks; the plan must not)."""
    with distributed.main_first():
        if distributed.is_main():
            plan = plan_phase.make_plan(spec, model_dir)
            (work / "plan.json").write_text(json.dumps(plan.to_dict()))
        else:
            plan = plan_phase.Plan.from_dict(json.loads((work / "plan.json").read_text()))
    return plan


def _train(spec: FineTuneJobSpec, model_dir: Path, tokenizer, data, work: Path, reporter: Reporter,
           stop: StopFlag) -> _Trained:
    reporter.phase(status.TRAINING)
    plan = _plan(spec, model_dir, work)
    model = parallel.load_base(spec, model_dir, plan)
    # Under FSDP every rank takes part in generating (after training); the base sits unsharded in CPU
    # memory until FSDP places it, so there are no before-training samples.
    prompts = spec.eval_prompts if plan.fsdp or distributed.is_main() else []
    if plan.fsdp:
        before = [None] * len(prompts)
    else:
        before = model_phase.generate(model, tokenizer, prompts, spec.eval_max_new_tokens)
    plan = plan.with_packing(model)
    if spec.dataset.packing and not plan.packing:
        reporter.log(f"packed examples could attend to each other here ({plan.attention} attention, strategy "
                     f"{plan.strategy}); training unpacked instead")
    reporter.log(plan.line())
    model = model_phase.add_lora(model, spec.lora)
    ckpt_loc = checkpoint_location(spec)
    result = train(
        spec, model, tokenizer, data, work_dir=work, store=storage.CheckpointStore(ckpt_loc),
        checkpoints_uri=str(ckpt_loc), reporter=reporter, stop=stop, plan=plan,
    )
    after = None if spec.merge.enabled else model_phase.generate(model, tokenizer, prompts, spec.eval_max_new_tokens)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    distributed.leave_group()
    metrics = {**result.metrics, "resumedFrom": result.resumed_from, "format": data.fmt, "packing": plan.packing,
               "strategy": plan.strategy, "processes": plan.processes, "plan": plan.to_dict(),
               "examples": len(data.train), "truncatedExamples": data.truncated, "checkpoints": str(ckpt_loc)}
    return _Trained(result.adapter_dir, result.history, metrics, before, after)


def _assemble(job: Job, spec: FineTuneJobSpec, model_dir: Path, tokenizer, data, trained: _Trained, work: Path,
              reporter: Reporter) -> Path:
    """Merging (when enabled), then the folder to publish: model or adapter, report, model card."""
    staging = work / "publish"
    staging.mkdir()
    metrics, after = trained.metrics, trained.samples_after
    if spec.merge.enabled:
        reporter.phase(status.MERGING)
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in data.train[:4]["input_ids"]]
        probe = merge_phase.probe_inputs(tokenizer, texts)
        check = merge_phase.merge(spec, model_dir, trained.adapter_dir, tokenizer, probe, staging, spec.eval_prompts)
        after = check.samples
        metrics["mergeCheck"] = {
            "method": check.method, "dtype": check.dtype, "relativeLogitError": check.relative_error,
            "layerRelativeError": check.layer_relative_error,
            "maxAbsLogitError": check.max_abs_error, "tolerance": check.tolerance,
            "maxAbsWeight": check.max_abs_weight,
        }
        if spec.output.push_adapter:
            shutil.copytree(trained.adapter_dir, staging / "adapter")
    else:
        shutil.copytree(trained.adapter_dir, staging, dirs_exist_ok=True)
        tokenizer.save_pretrained(staging)
    metrics["phaseSeconds"] = dict(reporter.phase_seconds)
    samples = [{"prompt": p, "before": b, "after": a}
               for p, b, a in zip(spec.eval_prompts, trained.samples_before, after or [])]
    artifacts.write_report(staging / "report", job=job, metrics=metrics, history=trained.history,
                           lengths=data.lengths, samples=samples)
    (staging / "README.md").write_text(artifacts.model_card(job, metrics, merged=spec.merge.enabled))
    return staging


def _upload(job: Job, spec: FineTuneJobSpec, staging: Path, metrics: dict, reporter: Reporter) -> dict:
    reporter.phase(status.UPLOADING)
    published = storage.publish(staging, storage.Location.parse(spec.output.destination),
                                private=spec.output.private,
                                commit_message=f"FineTuneJob {job.name}: QLoRA fine-tune of {spec.model.source}")
    summary = {k: metrics[k] for k in ("train_loss", "eval_loss", "global_step", "num_input_tokens_seen",
                                       "train_runtime") if k in metrics}
    return {"output": published, "metrics": summary, "samples": len(spec.eval_prompts),
            "checkpoints": metrics["checkpoints"]}
