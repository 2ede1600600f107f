"""output.publish: best and training.earlyStopping on CPU with the tiny Llama: the published weights are those of the
evaluation with the lowest eval loss, recorded in metrics.json, the card, the events and the status; early stopping
ends training and a rerun trains no further; a resumed attempt keeps the best of the attempt before it. Also: one
eval event per evaluation, the final train loss and every phase's seconds.

The data make the eval loss go up and down: training answers every question "yes", the eval set answers "no".
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from runner.__main__ import main
from runner.api import errors
from runner.api.parse import manifest, parse_job
from runner.api.status import FineTuneJobStatus
from runner.report.console import Console
from runner.job import run_job
from runner.report.events import Reporter
from runner.train.trainer import StopFlag
from tests.conftest import QA_ROWS, job_doc, run_cli, write_jsonl
from tests.runner.report.test_kube_status import Recorder

ADAPTER = "adapter_model.safetensors"


def _job(tiny_llama, tmp_path: Path, **training):
    data = write_jsonl(tmp_path / "yes.jsonl", [{**r, "answer": "yes"} for r in QA_ROWS])
    evals = write_jsonl(tmp_path / "no.jsonl", [{**r, "answer": "no"} for r in QA_ROWS[::4]])
    publish = training.pop("publish", "best")
    doc = job_doc(tiny_llama, data, tmp_path / "out", dataset={"evalSource": str(evals)},
                  training={"maxSteps": 8, "evalSteps": 2, "saveSteps": 2, "loggingSteps": 2, "learningRate": 0.01,
                            "lrScheduler": "constant", **training},
                  output={"publish": publish, "keepCheckpoints": 10})
    return parse_job(doc)


def _run(job, tmp_path: Path, work: str, *, stop=None, sinks=(), console=None):
    out = io.StringIO()
    reporter = Reporter(stdout=out, stderr=io.StringIO(), termination_log=str(tmp_path / "term.log"), sinks=list(sinks),
                        console=console)
    result = run_job(job, reporter, work_dir=tmp_path / work, stop=stop)
    reporter.result(succeeded=True, exit_code=errors.EXIT_OK, **result)  # as `python -m runner run` ends
    return result, [json.loads(line) for line in out.getvalue().splitlines()]


def _same(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)


def test_publish_best_merges_the_step_with_the_lowest_eval_loss(tiny_llama, tmp_path):
    status, screen = Recorder(), io.StringIO()
    result, events = _run(_job(tiny_llama, tmp_path), tmp_path, "w", sinks=[status],
                          console=Console(screen, color=False, tick=None, width=120))
    out, ckpts = tmp_path / "out", tmp_path / "out.checkpoints"
    evals = [(e["step"], e["evalLoss"]) for e in events if e["event"] == "eval"]
    assert [s for s, _ in evals] == [2, 4, 6, 8]  # one eval event per evaluation, the last step's once
    best_step, best_loss = min(evals, key=lambda e: e[1])
    assert best_step != 8, "these data are meant to make the last step worse than an earlier one"

    metrics = json.loads((out / "report/metrics.json").read_text())
    published = metrics["published"]
    assert (published["step"], published["choice"], published["lastStep"]) == (best_step, "best", 8)
    assert published["evalLoss"] == pytest.approx(best_loss) == metrics["eval_loss"]
    assert metrics["last_eval_loss"] == pytest.approx(evals[-1][1])
    assert f"step {best_step} had the lowest eval loss" in published["reason"]
    # The weights published are the ones the Trainer saved at that step, not the last step's.
    assert _same(out / "adapter" / ADAPTER, ckpts / f"checkpoint-{best_step}" / ADAPTER)
    assert not _same(out / "adapter" / ADAPTER, ckpts / "checkpoint-8" / ADAPTER)

    card = (out / "README.md").read_text()
    assert f"| published step | {best_step} (best) |" in card and published["reason"] in card
    assert result["metrics"]["published_step"] == best_step
    patch = next(p for p in status.sent if "published" in p)
    assert patch["published"]["step"] == best_step and patch["published"]["choice"] == "best"
    FineTuneJobStatus.model_validate(patch)  # the shape the CRD's status schema is generated from
    line = next(ln for ln in screen.getvalue().splitlines() if ln.strip().startswith("Published"))
    assert line.split(None, 1)[1] == f"step {best_step} (lowest eval loss, {best_loss:.4g}; last step 8)"

    # metrics.json: the final train loss beside the mean, and every phase up to the report (Merging included);
    # the result (status.metrics, the terminal) has Uploading's too.
    history = json.loads((out / "report/history.json").read_text())
    assert metrics["final_train_loss"] == [h["loss"] for h in history if "loss" in h][-1]
    assert set(metrics["phase_seconds"]) == {"Validating", "Downloading", "Training", "Merging"}
    assert metrics["phase_seconds"]["Merging"] > 0
    term = json.loads((tmp_path / "term.log").read_text())
    assert set(term["phaseSeconds"]) == {"Validating", "Downloading", "Training", "Merging", "Uploading"}
    assert term["metrics"]["uploading_seconds"] == term["phaseSeconds"]["Uploading"]


def test_publish_last_names_the_best_step_it_did_not_publish(tiny_llama, tmp_path):
    _run(_job(tiny_llama, tmp_path, publish="last", maxSteps=6), tmp_path, "w")
    out = tmp_path / "out"
    published = json.loads((out / "report/metrics.json").read_text())["published"]
    assert (published["step"], published["choice"]) == (6, "last")
    assert _same(out / "adapter" / ADAPTER, tmp_path / "out.checkpoints/checkpoint-6" / ADAPTER)
    if published["bestStep"] != 6:
        assert f"was at step {published['bestStep']}" in published["reason"]


def test_early_stopping_stops_and_a_rerun_trains_no_further(tiny_llama, tmp_path):
    job = _job(tiny_llama, tmp_path, maxSteps=20, earlyStopping={"patience": 1})
    _, events = _run(job, tmp_path, "w1")
    evals = [(e["step"], e["evalLoss"]) for e in events if e["event"] == "eval"]
    # patience 1: training stops at the first evaluation that does not beat the best so far
    stop_at = next(s for i, (s, loss) in enumerate(evals) if i and loss >= min(v for _, v in evals[:i]))
    assert evals[-1][0] == stop_at < 20
    assert max(e["step"] for e in events if e["event"] == "progress") == stop_at
    out = tmp_path / "out"
    metrics = json.loads((out / "report/metrics.json").read_text())
    assert metrics["global_step"] == stop_at and metrics["published"]["stoppedEarly"] is True
    assert f"training stopped early at step {stop_at}" in metrics["published"]["reason"]
    assert (tmp_path / f"out.checkpoints/checkpoint-{stop_at}").is_dir()  # saved where it stopped
    first_adapter = tmp_path / "first.safetensors"
    shutil.copy(out / "adapter" / ADAPTER, first_adapter)

    shutil.rmtree(out)  # the output is lost (say): the rerun resumes from that checkpoint and trains nothing
    _, events = _run(job, tmp_path, "w2")
    assert not [e for e in events if e["event"] == "progress"]
    again = json.loads((out / "report/metrics.json").read_text())
    assert again["published"]["step"] == metrics["published"]["step"]
    assert again["published"]["stoppedEarly"] is True
    assert _same(out / "adapter" / ADAPTER, first_adapter)


def test_a_resumed_attempt_keeps_the_best_of_the_attempt_before(tiny_llama, tmp_path):
    job = _job(tiny_llama, tmp_path, maxSteps=12, saveSteps=4)
    stop = StopFlag()

    def preempt(event):  # SIGTERM during step 7: checkpoint-7 is saved, then the attempt ends
        if event.get("event") == "progress" and event["step"] == 6:
            stop.requested = True

    with pytest.raises(errors.Preempted, match="resumes from step 7"):
        _run(job, tmp_path, "w1", stop=stop, sinks=[preempt])
    saved = tmp_path / "out.checkpoints" / "checkpoint-7" / "finetune-best"
    kept = json.loads((saved / "best.json").read_text())
    first_best = tmp_path / "first-best.safetensors"
    shutil.copy(saved / ADAPTER, first_best)

    _, events = _run(job, tmp_path, "w2")
    assert min(e["step"] for e in events if e["event"] == "progress") == 8  # resumed, not restarted
    history = json.loads((tmp_path / "out/report/history.json").read_text())
    evals = [(h["step"], h["evalLoss"]) for h in history if "evalLoss" in h]
    assert [s for s, _ in evals] == [2, 4, 6, 8, 10, 12]  # the whole run's evaluations, each once
    best_step, best_loss = min(evals, key=lambda e: e[1])
    published = json.loads((tmp_path / "out/report/metrics.json").read_text())["published"]
    assert published["step"] == best_step and published["evalLoss"] == pytest.approx(best_loss)
    assert best_step == kept["step"] <= 6, "these data are meant to put the best in the first attempt"
    assert _same(tmp_path / "out/adapter" / ADAPTER, first_best)


@pytest.mark.parametrize("spec, needle", [
    ({"training": {"earlyStopping": {"patience": 2}}}, "spec.training.earlyStopping: watches the eval loss, and this "
                                                       "job has no eval set; set dataset.evalSource"),
    ({"output": {"publish": "best"}}, "spec.output.publish: best picks the checkpoint by its eval loss, and this job "
                                      "has no eval set"),
    ({"output": {"publish": "first"}}, "spec.output.publish: 'first' is not allowed; use one of 'last' or 'best'"),
    ({"training": {"earlyStopping": {"patience": 0}}}, "spec.training.earlyStopping.patience"),
])
def test_best_and_early_stopping_without_an_eval_set_are_refused_at_validate(spec, needle, tmp_path, capsys):
    doc = {"model": {"source": "hf://org/base"}, "dataset": {"source": "hf://datasets/org/data"},
           "output": {"destination": "s3://bucket/out"}}
    for key, value in spec.items():
        doc[key] = {**doc.get(key, {}), **value}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest("best-job", doc)))
    assert main(["validate", "--spec-only", str(path)]) == errors.EXIT_PERMANENT
    text = "".join(capsys.readouterr())
    assert needle in text and "Traceback" not in text


def test_two_processes_agree_on_the_best_step_and_publish_its_weights(tiny_llama, tmp_path):
    """Data parallel on CPU (FINETUNE_NPROC=2): every rank evaluates, only rank 0 keeps the adapter aside."""
    job = _job(tiny_llama, tmp_path)
    doc = manifest(job.name, job.spec.model_dump(by_alias=True, exclude_defaults=True, mode="json"))
    (tmp_path / "cli").mkdir()
    code, events, stderr, result = run_cli(tmp_path / "cli", doc, env={"FINETUNE_NPROC": "2"})
    assert code == 0, stderr[-3000:]
    evals = [(e["step"], e["evalLoss"]) for e in events if e["event"] == "eval"]
    assert [s for s, _ in evals] == [2, 4, 6, 8]
    best_step = min(evals, key=lambda e: e[1])[0]
    published = json.loads((tmp_path / "out/report/metrics.json").read_text())["published"]
    assert published["step"] == best_step and result["metrics"]["published_step"] == best_step
    assert _same(tmp_path / "out/adapter" / ADAPTER, tmp_path / f"out.checkpoints/checkpoint-{best_step}" / ADAPTER)


def test_min_delta_counts_evaluations_that_do_not_improve_enough_while_the_best_follows_the_lowest(tmp_path):
    from runner.train.best import Best

    job = parse_job(job_doc("hf://org/base", "hf://datasets/org/d", "s3://b/out", dataset={"evalFraction": 0.1},
                            training={"earlyStopping": {"patience": 3, "minDelta": 0.01}}, output={"publish": "best"}))
    best = Best(job.spec, tmp_path)
    losses = [3.0, 2.0, 1.995, 1.99, 1.985]  # the last three are each less than 0.01 below the best before them
    for i, loss in enumerate(losses[:-1]):
        best.observe(10 * (i + 1), loss)
        assert not best.should_stop()
    best.observe(50, losses[-1])
    assert best.should_stop() and best.stopped_early == 50
    assert (best.step, best.loss) == (50, 1.985)  # the best is the lowest, however small the step down
    # No adapter was kept (nothing trained here): the last step is published, and the reason says so.
    published = best.published(job.spec, 50, 1.985)
    assert published["choice"] == "best" and published["step"] == 50 and published["stoppedEarly"] is True
    assert "training stopped early at step 50: 3 evaluation(s) in a row" in published["reason"]
