"""Experiment tracking: TensorBoard event files in every published report/, and training.reportTo's trackers
against a real MLflow tracking server on loopback (and W&B in its offline mode)."""
from __future__ import annotations

import http.server
import io
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from runner.report import metrics_file, tracking
from runner.api.errors import PermanentError, Preempted
from runner.api.parse import parse_job
from runner.job import run_job
from runner.report.events import Reporter
from runner.train.trainer import StopFlag, fingerprint
from tests.conftest import job_doc, run_cli

SECRET = "s3cr3t-tracker-password"


def _reporter(tmp_path: Path, sinks=()) -> tuple[Reporter, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    return Reporter(stdout=out, stderr=err, termination_log=str(tmp_path / "term.log"), sinks=list(sinks)), out, err


def _events(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scalars(report: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(report / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _preempt_after(step: int, stop: StopFlag):
    def sink(event):  # plays SIGTERM arriving during the next step
        if event.get("event") == "progress" and event["step"] == step:
            stop.requested = True
    return sink


# ------------------------------------------------------------------------------------ TensorBoard
def test_report_holds_tensorboard_events_with_the_loss_of_every_logging_step(tiny_llama, qa_jsonl, tmp_path):
    out = tmp_path / "out"
    job = parse_job(job_doc(tiny_llama, qa_jsonl, out, dataset={"evalFraction": 0.25},
                            training={"maxSteps": 6, "loggingSteps": 2, "evalSteps": 3}))
    reporter, buf, _ = _reporter(tmp_path)
    run_job(job, reporter, work_dir=tmp_path / "work")
    progress = [e for e in _events(buf) if e["event"] == "progress"]

    scalars = _scalars(out / "report")
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second",
            "eval/loss"} <= set(scalars), sorted(scalars)
    # the loss at each logging step, as reported
    steps = [p["step"] for p in progress]
    assert {1, 2, 4, 6} <= set(steps) and [s for s, _ in scalars["train/loss"]] == steps
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([p["loss"] for p in progress], rel=1e-5)
    assert [s for s, _ in scalars["train/tokens_per_second"]] == steps
    assert all(v > 0 for _, v in scalars["train/tokens_per_second"])
    assert {s for s, _ in scalars["eval/loss"]} == {3, 6}
    metrics = json.loads((out / "report/metrics.json").read_text())
    assert metrics["tensorboard"] == "report/tensorboard" and "tracking" not in metrics
    assert "report/tensorboard/" in (out / "README.md").read_text()


def test_a_resumed_16bit_job_publishes_the_events_of_the_whole_run(tiny_llama, qa_jsonl, tmp_path):
    out = tmp_path / "out"
    job = parse_job(job_doc(tiny_llama, qa_jsonl, out, quantization={"bits": 16},
                            training={"maxSteps": 6, "saveSteps": 2, "loggingSteps": 1}))
    stop = StopFlag()
    with pytest.raises(Preempted):
        run_job(job, _reporter(tmp_path, [_preempt_after(3, stop)])[0], work_dir=tmp_path / "w1", stop=stop)
    reporter, buf, _ = _reporter(tmp_path)
    run_job(job, reporter, work_dir=tmp_path / "w2")
    resumed = [e["step"] for e in _events(buf) if e["event"] == "progress"]
    assert min(resumed) == 5  # the second attempt trained steps 5 and 6 only

    scalars = _scalars(out / "report")
    assert sorted({s for s, _ in scalars["train/loss"]}) == [1, 2, 3, 4, 5, 6]  # both attempts' steps
    assert sorted({s for s, _ in scalars["train/tokens_per_second"]}) == [1, 2, 3, 4, 5, 6]
    metrics = json.loads((out / "report/metrics.json").read_text())
    assert metrics["resumed_from"] == "checkpoint-4" and metrics["plan"]["bits"] == 16
    assert [k for k in metrics if k not in metrics_file.DEPRECATED and k != k.lower()] == []  # one style


# ----------------------------------------------------------------------------------------- MLflow
@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (sqlite backend) on a free loopback port, for this module's tests."""
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--default-artifact-root", str(root / "art")],
        stdout=log, stderr=subprocess.STDOUT, cwd=root,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_mlflow_gets_params_and_per_step_metrics_and_a_resumed_attempt_continues_the_run(
        mlflow_server, tiny_llama, qa_jsonl, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "finetune-tests")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "tester")  # the server has no auth: sent and ignored
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    out = tmp_path / "out"
    job = parse_job(job_doc(tiny_llama, qa_jsonl, out, quantization={"bits": 16},
                            training={"maxSteps": 6, "saveSteps": 2, "loggingSteps": 1, "reportTo": ["mlflow"]}))
    stop = StopFlag()
    first, _, err1 = _reporter(tmp_path, [_preempt_after(3, stop)])
    with pytest.raises(Preempted):
        run_job(job, first, work_dir=tmp_path / "w1", stop=stop)
    reporter, buf, err2 = _reporter(tmp_path)
    run_job(job, reporter, work_dir=tmp_path / "w2")

    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("finetune-tests")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # the resumed attempt continued the run, it did not start another
    run = runs[0]
    assert run.info.run_name == "test-job" and run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["finetune.dev/job"] == "test-job" and tags["finetune.dev/attempt"] == "2"
    assert tags["finetune.dev/bits"] == "16"
    params = run.data.params
    assert params["spec.lora.r"] == "8" and params["spec.quantization.bits"] == "16"
    assert params["spec.training.learningRate"] == "0.003"
    assert float(params["learning_rate"]) == 0.003  # the Trainer's own params too
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert sorted({m.step for m in losses}) == [1, 2, 3, 4, 5, 6]  # every step, across both attempts
    assert {m.step for m in client.get_metric_history(run.info.run_id, "tokens_per_second")} >= {5, 6}
    assert {m.step for m in client.get_metric_history(run.info.run_id, "grad_norm")} >= {5, 6}

    metrics = json.loads((out / "report/metrics.json").read_text())
    assert metrics["tracking"]["mlflow"]["runId"] == run.info.run_id
    url = metrics["tracking"]["mlflow"]["url"]
    assert url.startswith(mlflow_server) and run.info.run_id in url
    assert url in (out / "README.md").read_text()  # the model card links the run
    # no credential in logs, events or published files
    logs = err1.getvalue() + err2.getvalue() + buf.getvalue()
    assert "continuing run" in err2.getvalue() and SECRET not in logs
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_an_unreachable_mlflow_fails_in_validating_naming_the_endpoint(tiny_llama, qa_jsonl, tmp_path):
    pytest.importorskip("mlflow")
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    doc = job_doc(tiny_llama, qa_jsonl, tmp_path / "out", training={"reportTo": ["mlflow"]})
    code, events, stderr, result = run_cli(tmp_path, doc, env={"MLFLOW_TRACKING_URI": uri,
                                                              "MLFLOW_TRACKING_TOKEN": SECRET})
    assert code == 2, stderr[-2000:]
    assert result["failedPhase"] == "Validating" and result["reason"] == "InvalidSpec"
    assert f"training.reportTo: mlflow: cannot reach the tracking server at {uri}" in result["message"]
    assert [e["phase"] for e in events if e["event"] == "phase"] == ["Validating"]  # nothing downloaded
    assert SECRET not in stderr + json.dumps(events)


def test_tracker_checks_name_what_to_fix_and_never_the_credential(tmp_path):
    class Refusing(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(401)
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        pytest.importorskip("mlflow")
        with pytest.raises(PermanentError, match=f"mlflow: the tracking server at {base} refused the credentials "
                                                 r"\(HTTP 401\)") as e:
            tracking.check_mlflow({"MLFLOW_TRACKING_URI": base + "/", "MLFLOW_TRACKING_TOKEN": SECRET})
        assert SECRET not in str(e.value)
        with pytest.raises(PermanentError, match="holds a password; give the address alone") as e:
            tracking.check_mlflow({"MLFLOW_TRACKING_URI": f"http://user:{SECRET}@127.0.0.1:5000"})
        assert SECRET not in str(e.value) and "http://127.0.0.1:5000" in str(e.value)
        with pytest.raises(PermanentError, match="mlflow needs MLFLOW_TRACKING_URI"):
            tracking.check_mlflow({})
        tracking.check_mlflow({"MLFLOW_TRACKING_URI": f"file://{tmp_path}/mlruns"})  # a local store: no request
        if tracking._installed("wandb"):
            with pytest.raises(PermanentError, match=f"wandb: {base} refused WANDB_API_KEY"):
                tracking.check_wandb({"WANDB_API_KEY": SECRET, "WANDB_BASE_URL": base})
            with pytest.raises(PermanentError, match="wandb needs WANDB_API_KEY"):
                tracking.check_wandb({})
            tracking.check_wandb({"WANDB_MODE": "offline"})
    finally:
        server.shutdown()
    with pytest.raises(PermanentError, match="tensorboard: cannot write to TENSORBOARD_LOGGING_DIR"):
        blocker = tmp_path / "file"
        blocker.write_text("")
        tracking.check_tensorboard({"TENSORBOARD_LOGGING_DIR": str(blocker / "tb")})


def test_the_trainer_gets_report_to_and_a_run_name_and_tracking_does_not_change_the_fingerprint():
    job = parse_job(job_doc("m", "d.jsonl", "/o", training={"reportTo": ["mlflow", "tensorboard"]}))
    assert tracking.Tracking(job, env={}).trainer_args() == {"report_to": ["mlflow"], "run_name": "test-job"}
    in_cluster = tracking.Tracking(job, env={"FINETUNE_JOB_NAMESPACE": "team-a", "TENSORBOARD_LOGGING_DIR": "/tb"})
    assert in_cluster.trainer_args() == {"report_to": ["mlflow", "tensorboard"], "run_name": "team-a/test-job"}
    plain = parse_job(job_doc("m", "d.jsonl", "/o"))
    assert tracking.Tracking(plain, env={}).trainer_args()["report_to"] == "none"
    assert fingerprint(job.spec) == fingerprint(plain.spec)  # adding a tracker still resumes the checkpoints
    one = parse_job(job_doc("m", "d.jsonl", "/o", training={"reportTo": "wandb"}))
    assert one.spec.training.report_to == ["wandb"]


def _wandb_records(path: Path):
    """The records of an offline W&B run file (LevelDB log blocks of protobuf Records, after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, payload = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6] if left >= 7 else 0
        if kind == 0:  # the rest of a block is padding
            pos += left
            continue
        payload, pos = payload + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or its last part
            record = pb.Record()
            record.ParseFromString(payload)
            payload = b""
            yield record


@pytest.mark.skipif(not tracking._installed("wandb"), reason="wandb is not installed")
def test_wandb_offline_run_directory_holds_the_metrics(tiny_llama, qa_jsonl, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_PROJECT", "finetune-tests")
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-dir").mkdir()
    out = tmp_path / "out"
    job = parse_job(job_doc(tiny_llama, qa_jsonl, out, quantization={"bits": 16},
                            training={"maxSteps": 4, "loggingSteps": 1, "reportTo": ["wandb"]}))
    reporter, buf, _ = _reporter(tmp_path)
    run_job(job, reporter, work_dir=tmp_path / "work")
    progress = {e["step"]: e["loss"] for e in _events(buf) if e["event"] == "progress"}
    run_id = json.loads((out / "report/metrics.json").read_text())["tracking"]["wandb"]["runId"]
    [run_dir] = list((tmp_path / "wandb-dir" / "wandb").glob(f"offline-run-*-{run_id}"))

    records = list(_wandb_records(run_dir / f"run-{run_id}.wandb"))
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "test-job" and run.project == "finetune-tests"
    assert {"job:test-job", "attempt:1", "bits:16"} <= set(run.tags)
    assert "spec.lora.r" in {item.key for item in run.config.update}
    logged = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            if "train/loss" in items:
                logged[items["train/global_step"]] = items["train/loss"]
    assert logged == pytest.approx(progress) and sorted(logged) == [1, 2, 3, 4]
