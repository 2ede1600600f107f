"""`python -m runner run job.yaml` - the container entrypoint.

Commands:
  run JOB        run a FineTuneJob (manifest or bare spec) end to end
  validate JOB   check the spec only; print every problem and exit 2 if there is one
  preview JOB    show what will be trained: examples with the loss mask, token lengths, steps (no weights read)
  quickstart     run the embedded default job on this machine (tiny model, local files, CPU is fine)
  schema         print the spec's JSON schema
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

from runner.model import notices
from runner.api import cost, errors, names, status
from runner.api.errors import RunnerError, redact
from runner.report.summary import INTERRUPTED, RESUME


def oom_advice(spec) -> str:
    t, d = spec.training, spec.dataset
    tips = [
        f"lower training.batchSize (now {t.batch_size}) and raise training.gradientAccumulationSteps "
        f"(now {t.gradient_accumulation_steps}) to keep the effective batch",
        f"lower dataset.maxLength (now {d.max_length})",
    ]
    if t.memory_budget is None:
        tips.append("set training.memoryBudget a few GiB under the GPU's memory: the plan then fits checkpointing, "
                    "offloading and micro-batches under it (one process or data parallel)")
    else:
        tips.append(f"lower training.memoryBudget (now {t.memory_budget:g} GiB)")
    if t.gradient_checkpointing is not True:
        tips.append("set training.gradientCheckpointing: true")
    if spec.lora.r > 16:
        tips.append(f"lower lora.r (now {spec.lora.r})")
    if t.optimizer in ("adamw_torch", "adamw_torch_fused"):
        tips.append("use training.optimizer: paged_adamw_8bit")
    tips.append("or request a GPU with more memory (resources.gpuResourceName / nodeSelector)")
    return "CUDA out of memory. To fit: " + "; ".join(tips)


def runner_command(*args: str) -> str:
    """A command line that runs this runner as printed, from a fresh shell: this interpreter by its full path (no
    virtual environment to activate), with this checkout on PYTHONPATH where the package is not installed."""
    import runner

    words = [shlex.quote(sys.executable), "-m", "runner", *(shlex.quote(a) for a in args)]
    if runner.version() == "unknown":
        words.insert(0, "PYTHONPATH=" + shlex.quote(str(Path(runner.__file__).resolve().parents[1])))
    return " ".join(words)


def _human(args) -> bool:
    """A person at a terminal (stdout is one): the console view. Pods, CI and pipes get JSON lines."""
    return sys.stdout.isatty() and not os.environ.get(names.ENV_LAUNCHED) and not args.json


def _run(args, before=None) -> int:
    """`before(console)` runs first, inside the same view (the quickstart writes its files there)."""
    from runner.report.console import Tee

    events_file = open(args.events, "w", encoding="utf-8", buffering=1) if args.events else None
    try:
        if _human(args):
            from runner.report.console import default_log_path, session

            log_path = Path(args.log) if args.log else default_log_path(args.work_dir, getattr(args, "log_dir", None))
            with session(log_path, verbose=args.verbose) as (console, log):
                if before:
                    before(console)
                # The JSON events go to --events (if given) and the log; the terminal shows the console.
                return _run_job(args, Tee(events_file, log), console=console, log=log)
        if before:
            before(None)
        # stdout carries only the runner's JSON events: anything a library prints goes to stderr.
        events_out, sys.stdout = sys.stdout, sys.stderr
        try:
            return _run_job(args, Tee(events_out, events_file) if events_file else events_out)
        finally:
            sys.stdout = events_out
    finally:
        if events_file:
            events_file.close()


def _run_job(args, events_out, *, console=None, log=None) -> int:
    from runner.report.events import Reporter
    from runner.api.parse import load_job

    from runner.parallel import distributed
    from runner.report.kube_status import sink_from_env

    if distributed.is_main():
        sink = sink_from_env()  # under the controller: live phase and progress into this job's status
        reporter = Reporter(stdout=events_out, stderr=log, termination_log=args.termination_log,
                            sinks=[sink] if sink else None, console=console)
    else:  # ranks > 0 train silently (failures aside); rank 0 reports for all
        from runner.report.console import FailuresOnly

        reporter = Reporter(stdout=open(os.devnull, "w"), stderr=FailuresOnly(sys.stderr, distributed.rank()),
                            termination_log=os.devnull)
    if not sys.stderr.isatty():
        _quiet_progress_bars()
    job = None
    try:
        if console is not None:  # what the summary offers after a Ctrl-C
            reporter.details[RESUME] = runner_command("run", str(Path(args.job).resolve()))
        job = load_job(args.job)
        reporter.details["job"] = job
        nproc = distributed.processes_for(job.spec)
        if distributed.launcher_needed(job.spec, nproc):  # several GPUs, or several nodes
            return distributed.launch(args.job, nproc, work_dir=args.work_dir, reporter=reporter, job=job)
        if distributed.world_size() == 1:
            distributed.pin_one_gpu()
        from runner.job import run_job
        from runner.train.trainer import CTRL_C, StopFlag

        stop = StopFlag()
        stop.install()
        try:
            result = run_job(job, reporter, work_dir=Path(args.work_dir) if args.work_dir else None, stop=stop)
        except errors.Preempted as e:
            return _fail(reporter, e, interrupted=stop.signal_name == CTRL_C)
        reporter.result(succeeded=True, exit_code=errors.EXIT_OK, **result)
        return errors.EXIT_OK
    except RunnerError as e:
        return _fail(reporter, e)
    except KeyboardInterrupt:
        return _fail(reporter, errors.RetryableError(
            "stopped by Ctrl-C; running the same job again resumes from its newest complete checkpoint (if one was "
            "saved) and leaves an output already published alone", reason=_reason(reporter)), interrupted=True)
    except Exception as e:  # noqa: BLE001 - every failure must end in a result and an exit code
        import torch

        if isinstance(e, torch.OutOfMemoryError) and job is not None:
            return _fail(reporter, errors.OutOfMemory(oom_advice(job.spec)))
        err = RunnerError(f"{e.__class__.__name__}: {e}", reason=_reason(reporter))
        err.exit_code, err.retryable = errors.EXIT_UNEXPECTED, True
        import traceback

        reporter.log(redact(traceback.format_exc()))
        return _fail(reporter, err)


def _quiet_progress_bars() -> None:
    """Library progress bars are noise in a pod log; the runner reports progress itself."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def _reason(reporter) -> str:
    return status.PHASE_REASON.get(reporter.phase_name or "", errors.TRAINING_FAILED)


def _fail(reporter, e: RunnerError, *, interrupted: bool = False) -> int:
    """The failure's result; `interrupted`: a person stopped the run (Ctrl-C), which the console shows as a
    pause with the command that resumes it, not as a failure (the exit code stays retryable)."""
    from runner.report.events import failure_reason

    from runner.api.parse import field_paths

    reason = failure_reason(e.reason, reporter.phase_name, retryable=e.retryable)  # named for the phase it failed in
    message = field_paths(e.message)
    reporter.log(f"failed ({reason}): {message}")
    reporter.result(
        succeeded=False,
        exit_code=e.exit_code,
        reason=reason,
        message=message,
        retryable=e.retryable,
        failedPhase=reporter.phase_name,
        **({INTERRUPTED: True} if interrupted else {}),
    )
    return e.exit_code


def _validate(args) -> int:
    from runner.api.errors import SpecError
    from runner.api.parse import field_paths, load_job
    from runner.data.dataset import template_problems
    from runner.store.outputs import local_problems

    try:
        job = load_job(args.job)
        # Templates; local paths that do not exist, overlaps, a destination holding files the runner did not write.
        problems = template_problems(job.spec.dataset) + ([] if args.spec_only else local_problems(job))
        if not args.spec_only and not problems:
            from runner.train.tokens import local_problems as data_problems

            problems = data_problems(job)  # local data that is empty, a FIFO or a device
        if any(not p.startswith("dataset.template.") for p in problems):
            problems.append("(local paths are checked on this machine; for a job whose volumes are mounted "
                            "only where it runs, pass --spec-only)")
        if problems:
            raise SpecError(problems)
    except RunnerError as e:
        print(field_paths(e.message), file=sys.stderr)
        if args.json:
            print(json.dumps({"job": args.job, "valid": False, "message": field_paths(e.message)}))
        return e.exit_code
    if args.json:
        from runner.store import backend_for
        from runner.train import estimate

        model = job.places.model
        found = estimate.for_job(job.spec, args.gpu, model_dir=backend_for(model).local_path(model))
        print(json.dumps({"job": args.job, "name": job.name, "valid": True,
                          "estimate": found.model_dump(by_alias=True, exclude_none=True)}, indent=1))
        return 0
    print(f"{args.job}: valid FineTuneJob {job.name!r}")
    return 0


def _preview(args) -> int:
    from runner import preview
    from runner.api.parse import field_paths, load_job

    try:
        job = load_job(args.job)
        found = preview.gather(job, n=args.examples, work=Path(args.work_dir) if args.work_dir else None,
                               gpu=args.gpu, full=args.full)
    except RunnerError as e:
        print(f"preview: {field_paths(e.message)}", file=sys.stderr)
        return e.exit_code
    color = {"always": True, "never": False}.get(args.color, sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    sys.stdout.write(preview.render(found, color=color, width=min(shutil.get_terminal_size().columns, 120)))
    return errors.EXIT_PERMANENT if any(w.startswith("ERROR") for w in found.warnings) else 0


def _quickstart(args) -> int:
    from runner.quickstart import JOB, check, prepare

    directory = Path(args.dir).resolve()
    args.log_dir = directory
    again = runner_command("run", str(directory / JOB))
    try:  # before the console starts: a folder holding the user's changes is refused, naming --dir and --force
        check(directory, force=args.force, run_command=again)
    except RunnerError as e:
        print(f"quickstart: {e.message}", file=sys.stderr)
        return e.exit_code

    def prepare_job(console) -> None:
        def say(text: str) -> None:
            console.note(text) if console else print(f"[quickstart] {text}", file=sys.stderr)

        done = prepare(directory, force=args.force, run_command=again)
        args.job = str(done.job)
        head = "quickstart: " if console else ""
        if not done.reused:
            say(f"{head}a tiny Llama and 40 country capitals, written to {directory}")
        else:
            say(f"{head}reusing {', '.join(done.reused)} already in {directory}, as they are"
                + (f"; wrote {', '.join(done.written)}" if done.written else ""))
        for kept in done.kept:
            say(f"your changed copy is kept as {kept.name}; the quickstart's own is back in its place")
        say(f"job file: {args.job}")
        say("run it again with:")
        if console:
            console.command(again)
        else:
            print(f"  {again}", file=sys.stderr)

    human = _human(args)
    try:
        code = _run(args, before=prepare_job)
    except KeyboardInterrupt:  # while its files were being written, before the job started
        print(f"\nquickstart: stopped by Ctrl-C before the job started; nothing half-written is kept as complete. "
              f"Start it again with: {runner_command('quickstart', '--dir', str(directory))}", file=sys.stderr)
        return errors.EXIT_RETRYABLE
    if code == 0 and not human:  # on a terminal the console's summary says this
        out = directory / "output"
        print(
            f"[quickstart] done. Merged model: {out}  (AutoModelForCausalLM.from_pretrained({str(out)!r}))\n"
            f"[quickstart] before/after answers: {out / 'report' / 'samples.json'}",
            file=sys.stderr,
        )
    return code


def main(argv: list[str] | None = None) -> int:
    import runner

    parser = argparse.ArgumentParser(prog="runner", description="QLoRA fine-tuning from one FineTuneJob YAML")
    runner.add_version_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run a FineTuneJob")
    p_run.add_argument("job", help="YAML file: a FineTuneJob manifest or its spec")
    p_val = sub.add_parser("validate", help="check a FineTuneJob spec")
    p_val.add_argument("job")
    p_val.add_argument("--spec-only", action="store_true",
                       help="check the spec alone, not the local paths it names (for a job that runs elsewhere)")
    p_pre = sub.add_parser("preview", help="show what a FineTuneJob will train on (tokenizer only, no weights)")
    p_pre.add_argument("job")
    p_pre.add_argument("-n", "--examples", type=int, default=3, help="examples to show (default 3)")
    p_pre.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                       help="colour the loss mask (auto: on a terminal); without colour it is marked ⟦…⟧")
    p_pre.add_argument("--work-dir", default=None, help="where a remote dataset and tokenizer are downloaded")
    p_pre.add_argument("--full", action="store_true",
                       help="read and tokenize every row (default: a sample, the first 1000 rows and 1000 at random)")
    p_val.add_argument("--json", action="store_true",
                       help="print the result as JSON, with the cost estimate (time and GPU-hours)")
    for p in (p_val, p_pre):
        p.add_argument("--gpu", type=str.lower, choices=cost.gpu_kinds(), default=None,
                       help="the GPU kind to estimate the cost for (default: the one the spec's nodeSelector names, "
                       f"else {cost.DEFAULT_GPU})")
    p_qs = sub.add_parser("quickstart", help="run the embedded default job (tiny model, CPU)")
    p_qs.add_argument("--dir", default="finetune-quickstart", help="where the model, data and output go")
    p_qs.add_argument("--force", action="store_true",
                      help="put the quickstart's own job.yaml and data back where they were changed (yours are kept "
                      "as NAME.yours); without it a changed file stops the quickstart")
    sub.add_parser("schema", help="print the spec's JSON schema")
    for p in (p_run, p_qs):
        p.add_argument("--work-dir", default=os.environ.get(names.ENV_WORK_DIR),
                       help="scratch space for downloads and the trainer (default: a temp dir)")
        p.add_argument("--termination-log", default=None, help="where the final result is also written")
        p.add_argument("--events", metavar="FILE", default=None,
                       help="also write the JSON events to FILE (on a terminal, stdout shows the console view)")
        p.add_argument("--verbose", "-v", action="store_true",
                       help="on a terminal: show every library's warnings, logs and progress bars too")
        p.add_argument("--json", action="store_true", help="JSON events on stdout even on a terminal")
        p.add_argument("--log", metavar="FILE", default=None,
                       help="on a terminal: where library output goes (default: runner.log in the work dir, "
                       "the quickstart's dir, or a temp file)")
    args = parser.parse_args(argv)
    notices.quiet()  # before any library that logs them is imported
    if args.command == "run":
        return _run(args)
    if args.command == "validate":
        return _validate(args)
    if args.command == "quickstart":
        return _quickstart(args)
    if args.command == "preview":
        return _preview(args)
    from runner.api.spec import schema_doc

    print(json.dumps(schema_doc(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
