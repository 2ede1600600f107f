"""Experiment tracking: TensorBoard event files for every job, and the trackers training.reportTo names.

Always: the loss, eval loss, learning rate, grad norm and tokens/s of every logging step are written as
TensorBoard event files (torch.utils.tensorboard; the `tensorboard` package) and published in
report/tensorboard/, so `tensorboard --logdir report` works on the downloaded output. A resumed attempt first
writes the steps before its checkpoint again, from the Trainer's log history restored with the checkpoint
(tokens/s is kept in that history for this), so the published files hold the whole run.

Opt-in, `training.reportTo`: `mlflow`, `wandb` and `tensorboard`, the Trainer's own integrations (report_to),
configured from the environment only (in a cluster: `env` entries, the credentials from Secrets):
  mlflow       MLFLOW_TRACKING_URI; MLFLOW_TRACKING_USERNAME/_PASSWORD or MLFLOW_TRACKING_TOKEN;
               MLFLOW_EXPERIMENT_NAME; MLFLOW_TRACKING_INSECURE_TLS
  wandb        WANDB_API_KEY, WANDB_PROJECT, WANDB_ENTITY, WANDB_BASE_URL; WANDB_MODE=offline (+ WANDB_DIR)
  tensorboard  TENSORBOARD_LOGGING_DIR: the event files written live there too (else report/ has them)
Validating (`check`) refuses a tracker that is not installed, lacks its address or key, or cannot be reached,
naming the endpoint and never a credential. The runs are started here, before the Trainer's callbacks would
start their own (they then log into these): named after the job (`namespace/name` in a cluster), tagged with
its name, namespace and attempt, the spec's fields as params. Their ids are kept beside the checkpoints
(tracking.json), so a resumed attempt continues the same run rather than starting another.
"""
from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Mapping

from runner.api import names
from runner.api.errors import INVALID_SPEC, PermanentError
from runner.api.spec import FineTuneJobSpec, Job

TB_DIR = "tensorboard"  # in the work directory while training, and in the published report/
RUNS_FILE = "tracking.json"  # in the checkpoint store: the attempt count and the runs' ids
TIMEOUT = 10  # seconds for a tracker's reachability check
TAG = names.GROUP  # tag prefix: finetune.dev/job, finetune.dev/attempt, ...


# ------------------------------------------------------------------------------------------- checks
def endpoint(uri: str) -> str:
    """A URI as it may be shown: scheme, host, port and path; never user info, query or fragment."""
    p = urllib.parse.urlsplit(uri)
    host = p.hostname or ""
    if p.port:
        host += f":{p.port}"
    return urllib.parse.urlunsplit((p.scheme, host, p.path.rstrip("/"), "", ""))


def _fail(message: str) -> PermanentError:
    return PermanentError(f"training.reportTo: {message}", reason=INVALID_SPEC)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _status(url: str, headers: dict, *, data: bytes | None = None, insecure: bool = False) -> int:
    """The HTTP status a GET (a POST with `data`) gets; OSError when nothing answers."""
    request = urllib.request.Request(url, headers=headers, data=data)
    context = ssl._create_unverified_context() if insecure else None  # noqa: S323 - the user's explicit choice
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT, context=context) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def _reason(e: Exception) -> str:
    return str(getattr(e, "reason", None) or e) or e.__class__.__name__


def check_mlflow(env: Mapping[str, str]) -> None:
    if not _installed("mlflow"):
        raise _fail("mlflow needs the mlflow package in the runner image (pip install mlflow-skinny)")
    uri = env.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise _fail("mlflow needs MLFLOW_TRACKING_URI, the tracking server's address, in the environment (in a "
                    "cluster: an env entry of the FineTuneJob)")
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return  # a local store (file:, sqlite:) or databricks: mlflow checks it when the run starts
    where = endpoint(uri)
    if parts.password:
        raise _fail(f"mlflow: MLFLOW_TRACKING_URI holds a password; give the address alone ({where}) and the "
                    "password in MLFLOW_TRACKING_PASSWORD, from a Secret")
    headers = {"Accept": "application/json"}
    if env.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {env['MLFLOW_TRACKING_TOKEN']}"
    elif env.get("MLFLOW_TRACKING_USERNAME"):
        pair = f"{env['MLFLOW_TRACKING_USERNAME']}:{env.get('MLFLOW_TRACKING_PASSWORD', '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    api = f"{where}/api/2.0/mlflow/experiments/search?max_results=1"
    insecure = env.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("1", "true")
    try:
        code = _status(api, headers, insecure=insecure)
    except (OSError, ValueError) as e:
        raise _fail(f"mlflow: cannot reach the tracking server at {where} (MLFLOW_TRACKING_URI): {_reason(e)}; "
                    "check the address and that the server is running") from None
    if code in (401, 403):
        raise _fail(f"mlflow: the tracking server at {where} refused the credentials (HTTP {code}); set "
                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN")
    if code != 200:
        raise _fail(f"mlflow: {where} answered HTTP {code} to the MLflow API (GET /api/2.0/mlflow/experiments/"
                    "search); is MLFLOW_TRACKING_URI the address of an MLflow tracking server?")


def check_wandb(env: Mapping[str, str]) -> None:
    if not _installed("wandb"):
        raise _fail("wandb needs the wandb package in the runner image (pip install wandb)")
    if env.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return
    key = env.get("WANDB_API_KEY")
    if not key:
        raise _fail("wandb needs WANDB_API_KEY in the environment (in a cluster: an env entry from a Secret), or "
                    "WANDB_MODE=offline")
    where = endpoint(env.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    auth = base64.b64encode(f"api:{key}".encode()).decode()
    query = json.dumps({"query": "query { viewer { id } }"}).encode()
    try:
        code = _status(f"{where}/graphql", {"Authorization": f"Basic {auth}", "Content-Type": "application/json"},
                       data=query)
    except (OSError, ValueError) as e:
        raise _fail(f"wandb: cannot reach {where} (WANDB_BASE_URL): {_reason(e)}") from None
    if code in (401, 403):
        raise _fail(f"wandb: {where} refused WANDB_API_KEY (HTTP {code}); check the key")
    if code != 200:
        raise _fail(f"wandb: {where} answered HTTP {code} to the W&B API; is WANDB_BASE_URL a W&B server?")


def check_tensorboard(env: Mapping[str, str]) -> None:
    if not _installed("tensorboard"):
        raise _fail("tensorboard needs the tensorboard package in the runner image (pip install tensorboard)")
    live = env.get("TENSORBOARD_LOGGING_DIR")
    if live:
        try:
            Path(live).mkdir(parents=True, exist_ok=True)
            probe = Path(live) / ".finetune-write-check"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise _fail(f"tensorboard: cannot write to TENSORBOARD_LOGGING_DIR {live}: {e.strerror}") from None


CHECKS = {"mlflow": check_mlflow, "wandb": check_wandb, "tensorboard": check_tensorboard}


def check(spec: FineTuneJobSpec, env: Mapping[str, str] | None = None) -> None:
    """Validating: every tracker training.reportTo names is installed, configured and reachable."""
    env = os.environ if env is None else env
    for name in dict.fromkeys(spec.training.report_to):
        CHECKS[name](env)


# ------------------------------------------------------------------------------------------- params
def spec_params(spec: FineTuneJobSpec) -> dict[str, str]:
    """The spec's training-relevant fields as flat `spec.section.field` params."""
    out: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        else:
            out[prefix] = value if isinstance(value, str) else json.dumps(value)

    dump = spec.model_dump(by_alias=True, include={"model", "dataset", "quantization", "lora", "training", "merge"})
    walk("spec", dump)
    return {k: v[:500] for k, v in out.items()}


# --------------------------------------------------------------------------------------- the runs
class Tracking:
    """One job's tracking: the TensorBoard files, and the runs of training.reportTo's trackers (rank 0)."""

    def __init__(self, job: Job, reporter=None, env: Mapping[str, str] | None = None):
        self.job, self.reporter = job, reporter
        self.env = os.environ if env is None else env
        self.trackers = list(dict.fromkeys(job.spec.training.report_to))
        namespace = self.env.get(names.ENV_JOB_NAMESPACE)
        self.namespace = namespace
        self.run_name = f"{namespace}/{job.name}" if namespace else job.name
        self.runs: dict[str, dict] = {}
        self.tb_dir: Path | None = None
        self._events = None
        self._saved_env: dict[str, str | None] = {}

    def _log(self, message: str) -> None:
        if self.reporter is not None:
            self.reporter.log(message)

    def trainer_args(self) -> dict:
        """SFTConfig's report_to and run_name. `tensorboard` goes to the Trainer only to write live to
        TENSORBOARD_LOGGING_DIR: the files for report/ are written by this module's callback."""
        report = [t for t in self.trackers if t != "tensorboard" or self.env.get("TENSORBOARD_LOGGING_DIR")]
        return {"report_to": report or "none", "run_name": self.run_name}

    def start(self, store, work_dir: Path) -> list:
        """Start (or, resuming, continue) the runs, and the TensorBoard writer; the callbacks for the Trainer.
        Every rank calls this; only rank 0 tracks."""
        from runner.parallel import distributed

        self.tb_dir = Path(work_dir) / TB_DIR
        if not distributed.is_main():
            return []
        saved = _read(store)
        attempt = self.env.get(names.ENV_ATTEMPT) or str(int(saved.get("attempts") or 0) + 1)
        tags = {f"{TAG}/job": self.job.name, f"{TAG}/attempt": attempt, f"{TAG}/model": self.job.spec.model.source,
                f"{TAG}/bits": str(self.job.spec.quantization.bits)}
        if self.namespace:
            tags[f"{TAG}/namespace"] = self.namespace
        params = spec_params(self.job.spec)
        if "mlflow" in self.trackers:
            self.runs["mlflow"] = _start_mlflow(saved.get("mlflow", {}).get("runId"), self.run_name, tags, params,
                                                self.env)
        if "wandb" in self.trackers:
            self.runs["wandb"] = _start_wandb(saved.get("wandb", {}).get("runId"), self.run_name, tags, params,
                                              self.env)
        for name, run in self.runs.items():
            how = "continuing" if run["resumed"] else "started"
            self._log(f"{name}: {how} run {run['runId']}" + (f" ({run['url']})" if run.get("url") else ""))
        if self.runs:
            state = {"attempts": int(attempt) if attempt.isdigit() else attempt,
                     **{k: {"runId": v["runId"]} for k, v in self.runs.items()}}
            store.write_text(RUNS_FILE, json.dumps(state, indent=2))
        if self.runs.get("mlflow", {}).get("resumed"):
            # The first attempt logged the Trainer's params; logged again they would differ in paths (and in
            # the cadence a resumed attempt may change), which MLflow refuses. Read as the Trainer starts.
            self._set_env("MLFLOW_MAX_LOG_PARAMS", "0")
        self._events = _events_callback(self.tb_dir, self._log, mlflow="mlflow" in self.runs,
                                        on_begin=self._restore_env)
        return [self._events]

    def _set_env(self, key: str, value: str) -> None:
        self._saved_env.setdefault(key, os.environ.get(key))
        os.environ[key] = value

    def _restore_env(self) -> None:
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env.clear()

    def finish(self) -> dict:
        """End the runs (after the last evaluation); what metrics.json and the model card say about them."""
        out: dict = {}
        self._restore_env()
        if self._events is not None:
            self._events.close()
            if self.tb_dir is not None and any(self.tb_dir.glob("events.out.tfevents.*")):
                out["tensorboard"] = f"report/{TB_DIR}"
        if "mlflow" in self.runs:
            import mlflow

            mlflow.end_run()
        if "wandb" in self.runs:
            import wandb

            wandb.finish()
        if self.runs:
            out["tracking"] = {k: {"runId": v["runId"], "url": v.get("url")} for k, v in self.runs.items()}
        return out



def publish(work_dir: Path, report_dir: Path) -> None:
    """Copy the event files written while training into the report folder to be published (report/tensorboard/)."""
    events = Path(work_dir) / TB_DIR
    if events.is_dir():
        shutil.copytree(events, Path(report_dir) / TB_DIR, dirs_exist_ok=True)


def _read(store) -> dict:
    try:
        saved = json.loads(store.read_text(RUNS_FILE) or "{}")
    except ValueError:
        return {}
    return saved if isinstance(saved, dict) else {}


def _start_mlflow(run_id: str | None, run_name: str, tags: dict, params: dict, env: Mapping[str, str]) -> dict:
    import mlflow

    if mlflow.active_run() is not None:  # left over from an earlier job in this process
        mlflow.end_run("KILLED")
    if env.get("MLFLOW_TRACKING_URI"):  # the environment is the configuration, also when a URI was set before
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    if not run_id and env.get("MLFLOW_EXPERIMENT_NAME"):
        mlflow.set_experiment(env["MLFLOW_EXPERIMENT_NAME"])
    try:
        run = mlflow.start_run(run_id=run_id, run_name=run_name, tags=tags)
    except mlflow.exceptions.MlflowException:
        if not run_id:
            raise
        run_id = None  # the saved run is gone (deleted on the server): a new one
        run = mlflow.start_run(run_name=run_name, tags=tags)
    if not run_id:
        mlflow.log_params(params)
    uri = env.get("MLFLOW_TRACKING_URI", "")
    url = None
    if urllib.parse.urlsplit(uri).scheme in ("http", "https"):
        url = f"{endpoint(uri)}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    return {"runId": run.info.run_id, "url": url, "resumed": bool(run_id)}


def _start_wandb(run_id: str | None, run_name: str, tags: dict, params: dict, env: Mapping[str, str]) -> dict:
    import wandb

    if wandb.run is not None:
        wandb.finish()
    run = wandb.init(project=env.get("WANDB_PROJECT") or "finetune", name=run_name,
                     id=run_id or uuid.uuid4().hex[:12], resume="allow", config=params,
                     tags=[f"{k.split('/')[-1]}:{v}"[:64] for k, v in tags.items() if not k.endswith("/model")])
    return {"runId": run.id, "url": getattr(run, "url", None), "resumed": bool(run_id)}


# ------------------------------------------------------------------------------------ event files
def _scalars(logs: dict) -> dict[str, float]:
    """A log entry as TensorBoard scalars, named as transformers' TensorBoardCallback names them."""
    out = {}
    for key, value in logs.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"] = float(value)
    return out


def _events_callback(log_dir: Path, log, *, mlflow: bool, on_begin=lambda: None):
    from transformers import TrainerCallback

    class TensorBoardEvents(TrainerCallback):
        """Writes each log entry (plus tokens/s) to event files in `log_dir`, on rank 0."""

        def __init__(self) -> None:
            self.writer = None
            self.last: tuple[float, int] | None = None

        def _open(self):
            if self.writer is None:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    log("tensorboard is not installed: no event files in report/ (pip install tensorboard)")
                    self.writer = False
                else:
                    self.writer = SummaryWriter(str(log_dir))
            return self.writer or None

        def on_train_begin(self, args, state, control, **kw):
            on_begin()  # after the Trainer's tracker callbacks have started (they come first)
            if not state.is_world_process_zero:
                return
            self.last = (time.monotonic(), state.num_input_tokens_seen)
            writer = self._open()
            if writer is None:
                return
            for entry in state.log_history:  # resumed: the steps up to the checkpoint, as logged then
                if isinstance(entry.get("step"), int) and entry["step"] <= state.global_step:
                    for tag, value in _scalars(entry).items():
                        writer.add_scalar(tag, value, entry["step"])
            writer.flush()

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            logs = dict(logs)
            if "loss" in logs and self.last is not None:
                now, tokens = time.monotonic(), state.num_input_tokens_seen
                logs["tokens_per_second"] = round((tokens - self.last[1]) / max(now - self.last[0], 1e-9), 1)
                self.last = (now, tokens)
                entry = state.log_history[-1] if state.log_history else {}
                if entry.get("step") == state.global_step:  # kept with the checkpoint, for a resumed attempt
                    entry["tokens_per_second"] = logs["tokens_per_second"]
                if mlflow:  # the Trainer's MLflow callback has logged the rest of this entry
                    import mlflow as mlflow_client

                    mlflow_client.log_metric("tokens_per_second", logs["tokens_per_second"], step=state.global_step)
            writer = self._open()
            if writer is not None:
                for tag, value in _scalars(logs).items():
                    writer.add_scalar(tag, value, state.global_step)
                writer.flush()

        def close(self) -> None:
            if self.writer:
                self.writer.close()

    return TensorBoardEvents()
