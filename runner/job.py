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

from runner.report import artifacts as artifacts
from runner.report import metrics_file
from runner.data import dataset as data_phase
from runner.parallel import distributed as distributed
from runner.merge import fold as merge_phase
from runner.model import load as model_phase
from runner.train import fsdp as parallel
from runner.store import cache as cache
from runner.store import outputs as outputs
from runner.train import plan as plan_phase
import runner.store as storage
from runner.report import tracking as tracking
from runner.api import errors, status
from runner.api.errors import INVALID_SPEC, PermanentError, SpecError
from runner.store.outputs import checkpoint_location
from runner.store import local as local_storage
from runner.report.events import Reporter
from runner.api.spec import FineTuneJobSpec, Job
from runner.train.trainer import StopFlag, train


def _uri_problem(field: str, value: str) -> storage.Location:
    try:
        return storage.Location.parse(value)
    except ValueError as e:
        raise PermanentError(f"{field}: {e}", reason=INVALID_SPEC) from e


def _validate(job: Job) -> dict:
    """Settings this machine can run, sources reachable, credentials present, destination writable and this
    job's to replace - before any download or GPU time."""
    spec = job.spec
    plan_phase.check_spec(spec, plan_phase.Machine.here())
    tracking.check(spec)  # every tracker of training.reportTo reachable
    locations = {
        "model": _uri_problem("model.source", spec.model.source),
        "data": _uri_problem("dataset.source", spec.dataset.source),
        "eval": _uri_problem("dataset.evalSource", spec.dataset.eval_source) if spec.dataset.eval_source else None,
    }
    dest = _uri_problem("output.destination", spec.output.destination)
    ckpt_loc = checkpoint_location(spec)
    problems = data_phase.template_problems(spec.dataset) + outputs.local_problems(job)
    if problems:
        raise SpecError(problems)
    storage.check_source(locations["model"], repo_type="model")
    if problem := outputs.remote_model_problem(spec):  # an S3 prefix or Hub repo with no config or weights
        raise SpecError([problem])
    storage.check_source(locations["data"], repo_type="dataset")
    if locations["eval"]:
        storage.check_source(locations["eval"], repo_type="dataset")
    storage.check_destination(dest, outputs.identity(job))
    if ckpt_loc.scheme == "s3":
        storage.check_writable(ckpt_loc)
    elif ckpt_loc.scheme == "local":
        local_storage.check_writable(Path(ckpt_loc.path), f"checkpoints {ckpt_loc}",
                                     "set output.checkpoints to a writable place")
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
    paths["model"] = cache.download(loc["model"], work / "model", log=reporter.log)  # FINETUNE_MODEL_CACHE
    model_phase.check_target_modules(spec.lora, _linear_layers(spec, paths["model"]))
    return paths


def _linear_layers(spec: FineTuneJobSpec, model_dir: Path) -> set[str]:
    """The model's adaptable layers, from its config; a model that cannot load this way fails permanently."""
    try:
        return model_phase.linear_module_names(model_dir, spec.model)
    except (OSError, ValueError, KeyError) as e:
        if "trust_remote_code" in str(e):
            raise PermanentError(
                f"model.trustRemoteCode: {spec.model.source} ships its own Python code, which runs only with "
                "model.trustRemoteCode: true; set it if you trust that repo, or pick a model transformers supports",
                reason=INVALID_SPEC) from e
        raise PermanentError(
            f"model.source: {spec.model.source} is not a model transformers can load ({e.__class__.__name__}: "
            f"{str(e)[:300]}); give a folder or repo holding config.json, the weights and the tokenizer",
            reason=INVALID_SPEC) from e


def run_job(job: Job, reporter: Reporter, *, work_dir: Path | None = None, stop: StopFlag | None = None) -> dict:
    spec = job.spec
    stop = stop or StopFlag()
    own_work = work_dir is None
    work = Path(work_dir or tempfile.mkdtemp(prefix=f"finetune-{job.name[:64]}-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _run(job, spec, reporter, work, stop)
    except Exception as e:  # noqa: BLE001 - a full disk is the user's to fix (exit 2); anything else unchanged
        full = errors.disk_full(e, work, status.PHASE_REASON.get(reporter.phase_name or "", errors.TRAINING_FAILED))
        if full is None:
            raise
        raise full from e
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


def _run(job: Job, spec: FineTuneJobSpec, reporter: Reporter, work: Path, stop: StopFlag) -> dict:
    done = outputs.already_complete(job)  # every rank decides alike, before any joins the group
    if done is not None:
        reporter.phase(status.VALIDATING)
        reporter.log(done["message"])
        return done if distributed.is_main() else {}
    distributed.init()
    paths = _fetch(job, work, reporter)
    tokenizer, data = _tokenize(spec, paths, reporter)
    trained = _train(spec, paths["model"], tokenizer, data, work, reporter, stop, tracking.Tracking(job, reporter))
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


def _fetch(job: Job, work: Path, reporter: Reporter) -> dict:
    """Validating and Downloading, by the first process of each node (its own work directory) first; the node's
    other ranks reuse its files."""
    spec = job.spec
    with distributed.node_first():
        if distributed.is_node_main():
            reporter.phase(status.VALIDATING)
            locations = _validate(job)
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


def _plan(spec: FineTuneJobSpec, model_dir: Path) -> plan_phase.Plan:
    """Made once, by rank 0 (free GPU memory differs a little between ranks; the plan must not), and sent to
    every rank, on every node."""
    plan = plan_phase.make_plan(spec, model_dir) if distributed.is_main() else None
    shared = distributed.from_main(plan.to_dict() if plan is not None else None)
    return plan if plan is not None else plan_phase.Plan.from_dict(shared)


def _train(spec: FineTuneJobSpec, model_dir: Path, tokenizer, data, work: Path, reporter: Reporter,
           stop: StopFlag, tracker: tracking.Tracking | None = None) -> _Trained:
    reporter.phase(status.TRAINING)
    plan = _plan(spec, model_dir)
    model = parallel.load_base(spec, model_dir, plan)
    # Under FSDP every rank takes part in generating (after training); no before-training samples there.
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
    torch.manual_seed(spec.training.seed)  # LoRA's initial A matrices: training.seed makes a run repeatable
    model = parallel.add_lora(model, spec.lora)  # under FSDP the sharded loader added them
    ckpt_loc = checkpoint_location(spec)
    result = train(
        spec, model, tokenizer, data, work_dir=work, store=storage.CheckpointStore(ckpt_loc),
        checkpoints_uri=str(ckpt_loc), reporter=reporter, stop=stop, plan=plan, tracker=tracker,
    )
    after = None if spec.merge.enabled else model_phase.generate(model, tokenizer, prompts, spec.eval_max_new_tokens)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    distributed.leave_group()
    metrics = {**result.metrics, metrics_file.RESUMED_FROM: result.resumed_from, "format": data.fmt,
               "packing": plan.packing,
               "strategy": plan.strategy, "processes": plan.processes, "plan": plan.to_dict(),
               "examples": len(data.train), metrics_file.TRUNCATED_EXAMPLES: data.truncated,
               "checkpoints": str(ckpt_loc)}
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
        metrics[metrics_file.MERGE_CHECK] = {
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
    # Merging complete; Uploading is in the result and status.metrics
    metrics[metrics_file.PHASE_SECONDS] = reporter.phase_times()
    samples = [{"prompt": p, "before": b, "after": a}
               for p, b, a in zip(spec.eval_prompts, trained.samples_before, after or [])]
    reporter.details.update(samples=samples, metrics=metrics)  # for the terminal's summary
    artifacts.write_report(staging / "report", job=job, metrics=metrics, history=trained.history,
                           lengths=data.lengths, samples=samples)
    tracking.publish(work, staging / "report")  # report/tensorboard/
    card = artifacts.model_card(job, metrics, merged=spec.merge.enabled, samples=samples)
    (staging / "README.md").write_text(card)
    if (staging / "adapter").is_dir():  # the adapter's own card, not peft's boilerplate
        (staging / "adapter" / "README.md").write_text(
            artifacts.model_card(job, metrics, merged=True, samples=samples, adapter=True))
    return staging


def _upload(job: Job, spec: FineTuneJobSpec, staging: Path, metrics: dict, reporter: Reporter) -> dict:
    reporter.phase(status.UPLOADING)
    method = "QLoRA" if spec.quantization.bits == 4 else "LoRA"
    published = storage.publish(staging, storage.Location.parse(spec.output.destination),
                                private=spec.output.private,
                                commit_message=f"FineTuneJob {job.name}: {method} fine-tune of {spec.model.source}",
                                job=outputs.identity(job))
    summary = {k: metrics[k] for k in ("train_loss", "final_train_loss", "eval_loss", "global_step",
                                       "num_input_tokens_seen", "train_runtime") if k in metrics}
    if isinstance(metrics.get("published"), dict):
        summary["published_step"] = metrics["published"]["step"]
    return {"output": published, "metrics": summary, "samples": len(spec.eval_prompts),
            "checkpoints": metrics["checkpoints"]}
