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

from runner import store
from runner.api import errors, status
from runner.api.errors import INVALID_SPEC, PermanentError, SpecError
from runner.api.spec import FineTuneJobSpec, Job
from runner.train import tokens
from runner.data.dataset import build_formatter, peek, template_problems
from runner.merge import fold
from runner.model import cuda_driver
from runner.model.load import check_target_modules, generate, linear_module_names, load_tokenizer
from runner.parallel import distributed
from runner.report import artifacts, metrics_file, tracking
from runner.report.events import Reporter
from runner.store import cache, outputs, timeouts
from runner.train import estimate, fsdp
from runner.train.plan import Machine, Plan, check_spec, make_plan
from runner.train.trainer import StopFlag, train_adapter


@dataclass(frozen=True)
class Downloads:
    """Where the job's inputs are on this node."""

    model: Path
    data: Path
    eval_data: Path | None

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({k: str(v) if v else None for k, v in vars(self).items()}))

    @classmethod
    def load(cls, path: Path) -> Downloads:
        return cls(**{k: Path(v) if v else None for k, v in json.loads(path.read_text()).items()})


def _validate(job: Job) -> None:
    """Settings this machine can run, sources reachable, credentials present, destination writable and this
    job's to replace, checkpoints writable - before any download or GPU time."""
    spec, places = job.spec, job.places
    cuda_driver.check(torch.version.cuda)  # a driver too old for torch's CUDA build: exit 2, not a CPU run
    check_spec(spec, Machine.here())
    tracking.check(spec)  # every tracker of training.reportTo reachable
    problems = template_problems(spec.dataset) + outputs.local_problems(job)
    problems = problems or tokens.local_problems(job)  # empty or unreadable local data, before any download
    if problems:
        raise SpecError(problems)
    store.check_source(places.model)
    if problem := outputs.remote_model_problem(job):  # a prefix or repo with no config or weights
        raise SpecError([problem])
    for source in filter(None, (places.data, places.eval_data)):
        store.check_source(source)
    store.check_destination(places.destination, outputs.identity(job))
    store.check_writable(places.checkpoints)


def _download(job: Job, work: Path, reporter: Reporter) -> Downloads:
    """Data first, checked against the format before the (large) model download; then the model, whose
    layers are checked against lora.targetModules."""
    spec, places, d = job.spec, job.places, job.spec.dataset
    data = store.download(places.data, work / "data")
    columns, count = peek(data, split=d.split, subset=d.subset, cache_dir=work / "rows")
    build_formatter(d, columns, chat_template=lambda *a, **k: "")
    reporter.log(f"data: {count:,} training rows; {tokens.disk_line(work, data)}")
    eval_data = store.download(places.eval_data, work / "eval-data") if places.eval_data else None
    model = cache.download(places.model, work / "model", log=reporter.log, cache_root=places.cache,
                           fill=not spec.model.trust_remote_code)  # the model's own code never writes the cache
    check_target_modules(spec.lora, _linear_layers(spec, model))
    return Downloads(model, data, eval_data)


def _linear_layers(spec: FineTuneJobSpec, model_dir: Path) -> set[str]:
    """The model's adaptable layers, from its config; a model that cannot load this way fails permanently."""
    try:
        return linear_module_names(model_dir, spec.model)
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
    timeouts.apply_job(spec.store_timeouts, reporter.log)  # spec.storeTimeouts, within the environment's ceiling
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
    inputs = _fetch(job, work, reporter)
    tokenizer, data = _tokenize(job, inputs, work, reporter)
    trained = _fine_tune(job, inputs.model, tokenizer, data, work, reporter, stop, tracking.Tracking(job, reporter))
    if not distributed.is_main():
        return {}  # rank 0 merges and publishes
    staging = _assemble(job, spec, inputs.model, tokenizer, data, trained, work, reporter)
    return _publish(job, staging, trained.metrics, reporter)


@dataclass
class _Trained:
    adapter_dir: Path
    history: list[dict]
    metrics: dict
    samples_before: list[str]
    samples_after: list[str] | None


def _fetch(job: Job, work: Path, reporter: Reporter) -> Downloads:
    """Validating and Downloading, by the first process of each node (its own work directory) first; the node's
    other ranks reuse its files."""
    with distributed.node_first():
        if distributed.is_node_main():
            reporter.phase(status.VALIDATING)
            _validate(job)
            reporter.phase(status.DOWNLOADING)
            inputs = _download(job, work, reporter)
            inputs.save(work / "downloads.json")
        else:
            inputs = Downloads.load(work / "downloads.json")
    return inputs


def _tokenize(job: Job, inputs: Downloads, work: Path, reporter: Reporter):
    spec, d = job.spec, job.spec.dataset
    tokenizer = load_tokenizer(inputs.model, spec.model)
    data = tokens.tokenized_data(job, inputs.data, inputs.eval_data, inputs.model, tokenizer, work, reporter.log)
    reporter.log(
        f"tokenized {len(data.train)} examples as {data.fmt}; {data.truncated} truncated to {d.max_length} tokens"
    )
    return tokenizer, data


def _plan(spec: FineTuneJobSpec, model_dir: Path) -> Plan:
    """Made once, by rank 0 (free GPU memory differs a little between ranks; the plan must not), and sent to
    every rank, on every node."""
    plan = make_plan(spec, model_dir) if distributed.is_main() else None
    shared = distributed.from_main(plan.to_dict() if plan is not None else None)
    return plan if plan is not None else Plan.from_dict(shared)


def _fine_tune(job: Job, model_dir: Path, tokenizer, data, work: Path, reporter: Reporter,
               stop: StopFlag, tracker: tracking.Tracking | None = None) -> _Trained:
    """Training: the plan, the base loaded with LoRA, the adapter trained with durable checkpoints."""
    spec, checkpoints = job.spec, job.places.checkpoints
    reporter.phase(status.TRAINING)
    plan = _plan(spec, model_dir)
    model = fsdp.load_base(spec, model_dir, plan)
    # Under FSDP every rank takes part in generating (after training); no before-training samples there.
    prompts = spec.eval_prompts if plan.fsdp or distributed.is_main() else []
    if plan.fsdp:
        before = [None] * len(prompts)
    else:
        before = generate(model, tokenizer, prompts, spec.eval_max_new_tokens)
    plan = plan.with_packing(model)
    if spec.dataset.packing and not plan.packing:
        reporter.log(f"packed examples could attend to each other here ({plan.attention} attention, strategy "
                     f"{plan.strategy}); training unpacked instead")
    reporter.log(plan.line())
    cost = estimate.at_training(spec, plan, data.lengths, len(data.train), model_dir)
    if cost is not None:
        reporter.log("estimate: " + estimate.lines(cost)[0])
    torch.manual_seed(spec.training.seed)  # LoRA's initial A matrices: training.seed makes a run repeatable
    model = fsdp.add_lora(model, spec.lora)  # under FSDP the sharded loader added them
    result = train_adapter(
        spec, model, tokenizer, data, work_dir=work, store=store.CheckpointStore(checkpoints),
        checkpoints_uri=str(checkpoints), reporter=reporter, stop=stop, plan=plan, tracker=tracker,
    )
    after = None if spec.merge.enabled else generate(model, tokenizer, prompts, spec.eval_max_new_tokens)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    distributed.leave_group()
    metrics = {**result.metrics, metrics_file.RESUMED_FROM: result.resumed_from, "format": data.fmt,
               "packing": plan.packing, "strategy": plan.strategy, "processes": plan.processes, "plan": plan.to_dict(),
               "examples": len(data.train), metrics_file.TRUNCATED_EXAMPLES: data.truncated,
               "checkpoints": str(checkpoints),
               estimate.METRIC: cost.model_dump(by_alias=True, exclude_none=True) if cost else None}
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
        probe = fold.probe_inputs(tokenizer, texts)
        check = fold.merge(spec, model_dir, trained.adapter_dir, tokenizer, probe, staging, spec.eval_prompts)
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


def _publish(job: Job, staging: Path, metrics: dict, reporter: Reporter) -> dict:
    """Uploading: the staged folder published all-or-nothing to the destination; the result to report."""
    spec = job.spec
    reporter.phase(status.UPLOADING)
    method = "QLoRA" if spec.quantization.bits == 4 else "LoRA"
    published = store.publish(staging, job.places.destination, private=spec.output.private,
                              commit_message=f"FineTuneJob {job.name}: {method} fine-tune of {spec.model.source}",
                              job=outputs.identity(job))
    summary = {k: metrics[k] for k in ("train_loss", "final_train_loss", "eval_loss", "global_step",
                                       "num_input_tokens_seen", "train_runtime") if k in metrics}
    if isinstance(metrics.get("published"), dict):
        summary["published_step"] = metrics["published"]["step"]
    return {"output": published, "metrics": summary, "samples": len(spec.eval_prompts),
            "checkpoints": metrics["checkpoints"]}
