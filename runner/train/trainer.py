"""Training phase: trl's SFTTrainer over the tokenized data, durable checkpoints, resume, progress."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from runner.parallel import distributed
from runner.train import compiled
from runner.train import fsdp as parallel
from runner.train import patches
from runner.train.best import Best, callback as best_callback
from runner.api.errors import PermanentError, Preempted, TRAINING_FAILED
from runner.api.spec import FineTuneJobSpec
from runner.train.plan import Plan
from runner.report.events import Reporter
from runner.store.checkpoints import step_of
from runner.store.lease import Lease

FINGERPRINT_FILE = "job-fingerprint.json"
# Inside every checkpoint: the progress history up to its step, so that a resumed run reports the whole run.
HISTORY_FILE = "finetune-history.json"
CTRL_C = "Ctrl-C"  # StopFlag.signal_name when a person pressed it (SIGINT), not a pod's SIGTERM


# --------------------------------------------------------------------------------------- preemption
class StopFlag:
    """Set by SIGTERM (pod eviction, node drain, `kubectl delete`) or a Ctrl-C during training: save a
    checkpoint and stop. A Ctrl-C outside training, or a second one, interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = "SIGTERM"
        self.training = False
        self.saved: tuple[str, int] | None = None  # the newest durable checkpoint of this run: (name, step)

    def install(self) -> None:
        def on_term(signum, frame):  # noqa: ARG001
            self.requested, self.signal_name = True, "SIGTERM"

        def on_interrupt(signum, frame):  # noqa: ARG001
            if not self.training or self.requested:
                raise KeyboardInterrupt
            self.requested, self.signal_name = True, CTRL_C

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_interrupt)

    def stopped(self, checkpoints_uri: str) -> Preempted:
        if self.saved is None:
            return Preempted(f"received {self.signal_name}; stopped before a checkpoint could be saved: running "
                             "the same job again starts over")
        name, step = self.saved
        return Preempted(f"received {self.signal_name}; stopped after saving {name} to {checkpoints_uri}: "
                         f"running the same job again resumes from step {step}")


class _AlreadyTrained(Exception):
    """Resumed from a checkpoint at or past the last step: there is nothing left to train."""


# ------------------------------------------------------------------------------------- fingerprint
def fingerprint(spec: FineTuneJobSpec) -> dict:
    """What must match for a checkpoint to be resumed: the model, data and everything that shapes the
    optimisation. Logging/saving cadence and output places may change between runs."""
    # early stopping decides when to stop, not what a step does; compiling changes how a step computes, not what
    training = spec.training.model_dump(
        by_alias=True, exclude={"logging_steps", "save_steps", "eval_steps", "report_to", "early_stopping",
                                  "memory_budget", "compile"}
    )
    q = spec.quantization  # bits 4 fingerprints as before bits existed: those checkpoints still resume
    parts = {
        "model": spec.model.model_dump(by_alias=True),
        "dataset": spec.dataset.model_dump(by_alias=True,  # as before chatTemplate existed, when unset
                                           exclude={"chat_template"} if spec.dataset.chat_template is None else None),
        "quantization": q.model_dump(by_alias=True, exclude={"bits"} if q.bits == 4 else None),
        "lora": spec.lora.model_dump(by_alias=True),
        "training": training,
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return {"sha256": digest, "spec": parts}


def check_fingerprint(store, spec: FineTuneJobSpec, checkpoints_uri: str) -> None:
    want = fingerprint(spec)
    have_text = store.read_text(FINGERPRINT_FILE)
    if have_text is None:
        store.write_text(FINGERPRINT_FILE, json.dumps(want, indent=2, sort_keys=True))
        return
    have = json.loads(have_text)
    if have.get("sha256") != want["sha256"]:
        changed = sorted(k for k in want["spec"] if have.get("spec", {}).get(k) != want["spec"][k])
        raise PermanentError(
            f"output.checkpoints: {checkpoints_uri} holds checkpoints of a job with a different "
            f"{', '.join(changed) or 'spec'}; delete them, or set output.checkpoints to a new place",
            reason=TRAINING_FAILED,
        )


# ---------------------------------------------------------------------------------------- callbacks
def _callbacks(reporter: Reporter, store, keep: int, stop: StopFlag, history: list[dict], lease=None,
               best: Best | None = None):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def __init__(self) -> None:
            self.last_time: float | None = None
            self.last_tokens = 0
            self.history: list[dict] = history

        def on_train_begin(self, args, state, control, **kw):
            self.last_time, self.last_tokens = time.monotonic(), state.num_input_tokens_seen

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "loss" not in logs:
                if "eval_loss" in logs:
                    self.history.append({"step": state.global_step, "evalLoss": logs["eval_loss"]})
                    reporter.emit({"event": "eval", "step": state.global_step, "evalLoss": logs["eval_loss"]})
                return
            now = time.monotonic()
            tokens = state.num_input_tokens_seen
            tps = (tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
            self.last_time, self.last_tokens = now, tokens
            point = {
                "step": state.global_step,
                "totalSteps": state.max_steps,
                "epoch": round(float(state.epoch or 0), 4),
                "loss": float(logs["loss"]),
                "learningRate": float(logs.get("learning_rate", 0.0)),
                "tokensPerSecond": round(float(tps), 1),
            }
            self.history.append(point)
            reporter.progress(**point)
            if logs.get("nonfinite_losses"):  # runner/train/host_syncs.py counts them
                reporter.log(f"step {state.global_step}: {logs['nonfinite_losses']} micro-batch losses since the "
                             "previous log were NaN or infinite; the logged loss has the mean of the others in their "
                             "place")

    progress = Progress()

    class DurableCheckpoints(TrainerCallback):
        """After the Trainer writes checkpoint-N locally, copy it to the durable store complete-or-absent,
        with the history up to step N in it."""

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step >= state.max_steps or (best is not None and best.should_stop()):
                raise _AlreadyTrained()  # resumed from the last step, or after early stopping (the Trainer would go on)

        def on_step_end(self, args, state, control, **kw):
            if state.global_step >= state.max_steps or stop.requested:
                control.should_save = True  # the last step (and a preempted one) is always durable
            if stop.requested:
                control.should_training_stop = True
            if control.should_save or (control.should_evaluate and best is not None and best.early is not None):
                control.should_log = True  # every checkpoint's history ends at its step: the run's loss adds up
                #                            (early stopping may save at any evaluation)

        def on_save(self, args, state, control, **kw):
            local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and local.is_dir():
                (local / HISTORY_FILE).write_text(json.dumps(progress.history))
                if best is not None:
                    best.persist(local)
                if lease is not None:
                    lease.renew()  # heartbeat; raises if another runner took the location over
                name = store.save(local)
                store.prune(keep)
                stop.saved = (name, state.global_step)
                reporter.emit({"event": "checkpoint", "name": name, "step": state.global_step})

    return progress, DurableCheckpoints()


def _history_before(checkpoint: Path | None, step: int) -> list[dict]:
    """The progress history saved in a checkpoint (up to its step), or [] for one saved without it."""
    if checkpoint is None:
        return []
    try:
        saved = json.loads((checkpoint / HISTORY_FILE).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(saved, list):
        return []
    return [h for h in saved if isinstance(h, dict) and isinstance(h.get("step"), int) and h["step"] <= step]


def run_loss(history: list[dict], global_step: int) -> float | None:
    """The mean training loss over every step of the run, from the logged losses (each the mean since the
    previous log); None unless the logs reach the last step."""
    points = [(h["step"], h["loss"]) for h in history if "loss" in h]
    if not points or points[-1][0] != global_step or global_step <= 0:
        return None
    total, previous = 0.0, 0
    for step, loss in points:
        total += loss * (step - previous)
        previous = step
    return total / global_step


# --------------------------------------------------------------------------------------- the trainer
@dataclass
class TrainResult:
    adapter_dir: Path
    history: list[dict]
    metrics: dict
    resumed_from: str | None


def _training_args(spec: FineTuneJobSpec, out_dir: Path, plan: Plan, has_eval: bool, has_mask: bool, *,
                   model=None, **overrides):
    """SFTConfig from the spec and the plan. `overrides` (the benchmark's) must name SFTConfig fields."""
    import trl
    from trl import SFTConfig

    if plan.packing is None:
        raise ValueError("the plan's packing is not settled: call plan.with_packing(model) after loading it")
    t, d = spec.training, spec.dataset
    on_cuda = torch.cuda.is_available()
    gc = plan.mode.checkpointed and not plan.mode.offloaded  # offloaded: runner/train/offload.py's units instead
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    kwargs = dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=plan.micro_batch,
        per_device_eval_batch_size=plan.micro_batch,
        gradient_accumulation_steps=plan.accumulation,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        gradient_checkpointing=gc,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gc else None,
        use_liger_kernel=False,  # deprecated in trl 1.x: runner/train/layer_kernels.py applies the same kernels
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=1,  # scratch copy only; the durable store keeps output.keepCheckpoints
        eval_strategy="steps" if has_eval else "no",
        eval_steps=(t.eval_steps or t.save_steps) if has_eval else None,
        bf16=plan.compute_dtype == torch.bfloat16,
        fp16=plan.compute_dtype == torch.float16 and on_cuda,
        use_cpu=not on_cuda,
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        logging_nan_inf_filter=False,  # runner/train/host_syncs.py filters NaN/inf losses on the device instead
        dataloader_pin_memory=on_cuda,
        dataloader_num_workers=2 if on_cuda else 0,
        dataloader_persistent_workers=on_cuda,
        max_length=d.max_length,
        packing=plan.packing,
        packing_strategy="bfd",
        completion_only_loss=has_mask,
        shuffle_dataset=True,
        dataset_num_proc=None,
        remove_unused_columns=True,
        ddp_find_unused_parameters=False,  # every LoRA parameter is used in every step
        ddp_timeout=1800,
    )
    # Across the transformers versions we support: warmup_ratio became a float warmup_steps, and
    # group_by_length became train_sampling_strategy. Only these keys are chosen by what SFTConfig has.
    if "warmup_ratio" in fields:
        kwargs["warmup_ratio"] = t.warmup_ratio
    else:
        kwargs["warmup_steps"] = t.warmup_ratio
    if t.group_by_length and not plan.packing:
        if "train_sampling_strategy" in fields:
            kwargs["train_sampling_strategy"] = "group_by_length"
        else:
            kwargs["group_by_length"] = True
    if plan.fsdp:
        kwargs.update(parallel.trainer_args(model))
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"trainer overrides that trl {trl.__version__}'s SFTConfig does not have: "
                        f"{', '.join(unknown)}")
    kwargs.update(overrides)
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise TypeError(f"training arguments that trl {trl.__version__}'s SFTConfig does not have: "
                        f"{', '.join(unknown)}")
    return SFTConfig(**kwargs)


def _train_holding_lease(
    spec: FineTuneJobSpec,
    model,
    tokenizer,
    data,
    *,
    work_dir: Path,
    store,
    checkpoints_uri: str,
    reporter: Reporter,
    stop: StopFlag,
    plan: Plan,
    tracker=None,
    lease: Lease,
) -> TrainResult:
    scratch = work_dir / "trainer"
    with distributed.node_first():  # each node's first process checks and fetches; the others read its copy
        if distributed.is_main():
            lease.acquire()  # one writer per checkpoint location: waits, or fails retryable naming the holder
        if distributed.is_node_main():
            check_fingerprint(store, spec, checkpoints_uri)
            scratch.mkdir(parents=True, exist_ok=True)
            complete = store.list_complete()
            if complete:
                store.fetch(complete[-1], scratch)
                reporter.log(f"resuming from {complete[-1]} in {checkpoints_uri}")
                reporter.emit({"event": "resumed", "name": complete[-1], "step": step_of(complete[-1])})
            (scratch / "resume.json").write_text(json.dumps(complete[-1] if complete else None))
    name = json.loads((scratch / "resume.json").read_text())
    resume = scratch / name if name else None
    history = _history_before(resume, step_of(name) or 0) if name else []
    best = Best(spec, scratch)
    best.replay(history)
    best.restore(resume, copy=distributed.is_main())

    progress, durable = _callbacks(reporter, store, spec.output.keep_checkpoints, stop, history, lease, best)
    tracked = tracker.start(store, work_dir) if tracker is not None else []
    trainer = None
    watch = best_callback(best, reporter, lambda where: parallel.save_adapter(trainer, where))
    trainer = make_trainer(spec, model, tokenizer, data, scratch, plan,
                           callbacks=[progress, durable, watch, *tracked,
                                      *([compiled.callback(reporter.log)] if plan.compile else [])],
                           **(tracker.trainer_args() if tracker is not None else {}))
    stop.training = True
    try:
        output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        metrics = dict(output.metrics)
    except _AlreadyTrained:
        reporter.log(f"training already complete at step {trainer.state.global_step} ({name}): nothing to train")
        metrics = {"train_runtime": 0.0, "epoch": trainer.state.epoch}
    finally:
        stop.training = False
        patches.remove(trainer)  # also when training ended by an exception
    if stop.requested:
        raise stop.stopped(checkpoints_uri)
    whole = run_loss(progress.history, trainer.state.global_step)
    if whole is not None:
        metrics["train_loss"] = whole  # the Trainer's counts only the steps since the resume
    last_step = trainer.state.global_step
    if data.eval is not None:  # the Trainer evaluates at the last step itself: once is enough
        last_eval = next((h["evalLoss"] for h in reversed(progress.history) if h.get("step") == last_step
                          and "evalLoss" in h), None)
        if last_eval is None:
            metrics.update(trainer.evaluate())
        else:
            metrics["eval_loss"] = last_eval
    final = [h["loss"] for h in progress.history if "loss" in h]
    if final:
        metrics["final_train_loss"] = final[-1]  # the last logged loss (the mean since the log before it)
    if tracker is not None:
        metrics.update(tracker.finish())
    metrics["num_input_tokens_seen"] = trainer.state.num_input_tokens_seen
    metrics["global_step"] = last_step
    published = best.published(spec, last_step, metrics.get("eval_loss"))
    metrics["published"] = published
    reporter.emit({"event": "published", **{k: published.get(k) for k in ("step", "choice", "evalLoss", "reason")}})
    adapter_dir = work_dir / "adapter"
    parallel.save_adapter(trainer, adapter_dir)
    if published["step"] != last_step:  # the best step's adapter is published (rank 0 wrote and merges it)
        metrics["last_eval_loss"], metrics["eval_loss"] = metrics.get("eval_loss"), published.get("evalLoss")
        adapter_dir = best.dir
        if not plan.fsdp and distributed.is_main():  # its weights answer the eval prompts when nothing is merged
            parallel.load_adapter(trainer.model, best.dir)
    return TrainResult(adapter_dir, progress.history, metrics, name)


def train_adapter(spec: FineTuneJobSpec, model, tokenizer, data, **kw) -> TrainResult:
    """The LoRA adapter trained, resumed from the newest durable checkpoint if there is one. `tracker`
    (runner.report.tracking.Tracking): TensorBoard files and the runs of training.reportTo. Rank 0 holds the
    checkpoint location's lease (runner/store/lease.py) from before its first read to the end."""
    lease = Lease(kw["store"].loc, log=kw["reporter"].log)
    try:
        return _train_holding_lease(spec, model, tokenizer, data, lease=lease, **kw)
    finally:
        lease.release()


def make_trainer(spec: FineTuneJobSpec, model, tokenizer, data, out_dir: Path, plan: Plan, *, callbacks=(),
                 **overrides):
    """trl's SFTTrainer configured from the spec and the plan (the benchmark passes `overrides`, SFTConfig
    fields, for its baseline recipe)."""
    from transformers import PrinterCallback

    args = _training_args(spec, out_dir, plan, data.eval is not None, data.has_completion_mask, model=model,
                          **overrides)
    trainer = parallel.sft_trainer_class()(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        callbacks=[*callbacks, patches.callback(patches.for_plan(plan))],  # applied while training only
    )
    trainer.remove_callback(PrinterCallback)  # progress is reported as JSON events instead
    return trainer
