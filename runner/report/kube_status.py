"""Runner-side status sink: patches the runner's own FineTuneJob's status from the runner's events.

    sink = sink_from_env()          # None unless running under the controller
    Reporter(sinks=[sink] if sink else [])

The controller starts the runner with the job's name, namespace, pod and attempt in its environment
(runner/api/names.py), under a ServiceAccount whose Role allows only `get`/`patch` on the `status` of that one
FineTuneJob. The sink writes only the runner's part of the status (see runner/api/status.py):

  status.runner          {phase, pod, attempt, updated}        on every phase event; plus `result`
                                                               (Succeeded/Failed) at the end
  status.progress        {step, totalSteps, percent, summary, epoch, loss, evalLoss, learningRate,
                          tokensPerSecond, eta, updated}      at most every ENV_STATUS_INTERVAL s
  status.lastCheckpoint  {name, step, time}                    on every durable checkpoint
  status.published       {step, choice, evalLoss, reason}      when training ends (output.publish)

Credentials: the file named by $KUBECONFIG (current context; token or tokenFile, CA file or data), else
the pod's service account (token re-read on every request, as bound tokens rotate). Standard library
only, so the runner image needs no Kubernetes client. A failed request is logged by the Reporter and
never stops training; after a failure, progress patches pause for a minute (phase changes still try).
"""
from __future__ import annotations

import base64
import json
import os
import ssl
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from runner.api import names

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
PROGRESS_INTERVAL = 5.0
PAUSE_AFTER_FAILURE = 60.0
TIMEOUT = 5.0


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiTarget:
    """Where and how to reach the API server."""

    def __init__(self, server: str, token: Callable[[], str], context: ssl.SSLContext):
        self.server, self.token, self.context = server.rstrip("/"), token, context

    @classmethod
    def from_kubeconfig(cls, path: str) -> "ApiTarget":
        import yaml

        cfg = yaml.safe_load(Path(path).read_text()) or {}
        ctx_name = cfg.get("current-context")
        ctx = next((c["context"] for c in cfg.get("contexts", []) if c.get("name") == ctx_name), None) or {}
        cluster = next((c["cluster"] for c in cfg.get("clusters", []) if c.get("name") == ctx.get("cluster")), {})
        user = next((u["user"] for u in cfg.get("users", []) if u.get("name") == ctx.get("user")), {}) or {}
        context = ssl.create_default_context()
        if cluster.get("insecure-skip-tls-verify"):
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        elif cluster.get("certificate-authority-data"):
            context.load_verify_locations(cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
        elif cluster.get("certificate-authority"):
            context.load_verify_locations(cafile=cluster["certificate-authority"])
        if user.get("tokenFile"):
            token_file = user["tokenFile"]
            return cls(cluster["server"], lambda: Path(token_file).read_text().strip(), context)
        token = user.get("token") or ""
        return cls(cluster["server"], lambda: token, context)

    @classmethod
    def in_cluster(cls, env=None) -> "ApiTarget | None":
        env = os.environ if env is None else env
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
        if not host or not (SA_DIR / "token").exists():
            return None
        if ":" in host:
            host = f"[{host}]"
        context = ssl.create_default_context(cafile=str(SA_DIR / "ca.crt"))
        return cls(f"https://{host}:{port}", lambda: (SA_DIR / "token").read_text().strip(), context)


class StatusSink:
    """Callable sink for `runner.report.events.Reporter`: event dict in, status patch out."""

    def __init__(self, target: ApiTarget, name: str, namespace: str, *, pod: str | None = None,
                 attempt: int | None = None, interval: float = PROGRESS_INTERVAL, clock=time.monotonic):
        self.target = target
        self.url = f"{target.server}/apis/{names.API_VERSION}/namespaces/{namespace}/{names.PLURAL}/{name}/status"
        self.pod, self.attempt, self.interval, self.clock = pod, attempt, interval, clock
        self._last_progress = -1e18
        self._paused_until = -1e18
        self._first: tuple[float, int] | None = None  # (time, step) of the first progress report, for the eta
        self._eval_loss: float | None = None
        self._phase: str | None = None
        self.patches = 0
        self._resumed: dict | None = None

    def __call__(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "phase":
            self._phase = event.get("phase")
            self._patch({"runner": self._runner()}, force=True)
        elif kind == "result":  # the stage stays what it was; the pod's exit decides the job's phase
            self._patch({"runner": {**self._runner(), "result": event.get("phase")}}, force=True)
        elif kind == "progress":
            last = event.get("step") is not None and event.get("step") == event.get("totalSteps")
            if last or self.clock() - self._last_progress >= self.interval:
                self._last_progress = self.clock()
                self._patch({"progress": self._progress(event)}, force=last)
        elif kind == "eval" and event.get("evalLoss") is not None:
            self._eval_loss = event["evalLoss"]
        elif kind == "published":
            self._patch({"published": {k: event[k] for k in ("step", "choice", "evalLoss", "reason")
                                       if event.get(k) is not None}}, force=True)
        elif kind == "resumed":
            self._resumed = {"name": event.get("name"), "step": event.get("step")}
            self._patch({"runner": self._runner()}, force=True)
        elif kind == "checkpoint":
            self._patch({"lastCheckpoint": {"name": event.get("name"), "step": event.get("step"),
                                            "time": event.get("time") or _now()}}, force=True)

    def _runner(self) -> dict:
        r: dict = {"phase": self._phase, "updated": _now()}
        if self.pod:
            r["pod"] = self.pod
        if self.attempt is not None:
            r["attempt"] = self.attempt
        if self._resumed:
            r["resumedFrom"] = self._resumed
        return r

    def _progress(self, e: dict) -> dict:
        step, total = e.get("step"), e.get("totalSteps")
        p = {k: e.get(k) for k in ("step", "totalSteps", "epoch", "loss", "learningRate", "tokensPerSecond")}
        p["updated"] = _now()
        if self._eval_loss is not None:
            p["evalLoss"] = self._eval_loss
        if isinstance(step, int) and isinstance(total, int) and total > 0:
            p["percent"] = int(100 * step / total)
            p["summary"] = f"{step}/{total} ({p['percent']}%)"
            now = self.clock()
            if self._first is None:
                self._first = (now, step)
            t0, s0 = self._first
            if step > s0:
                remaining = (total - step) * (now - t0) / (step - s0)
                p["eta"] = datetime.fromtimestamp(time.time() + remaining, timezone.utc).strftime(
                    "%Y-%m-%dT%H:%M:%SZ")
        return {k: v for k, v in p.items() if v is not None}

    def _patch(self, status: dict, *, force: bool) -> None:
        if not force and self.clock() < self._paused_until:
            return
        body = json.dumps({"status": status}).encode()
        req = urllib.request.Request(self.url, data=body, method="PATCH", headers={
            "Content-Type": "application/merge-patch+json", "Accept": "application/json",
            "Authorization": f"Bearer {self.target.token()}"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                             urllib.request.HTTPSHandler(context=self.target.context))
        try:
            with opener.open(req, timeout=TIMEOUT) as r:
                r.read()
            self.patches += 1
        except urllib.error.HTTPError as e:
            self._paused_until = self.clock() + PAUSE_AFTER_FAILURE
            detail = e.read()[:300].decode("utf-8", "replace")
            raise RuntimeError(f"status patch refused: HTTP {e.code}: {detail}") from None
        except (OSError, ssl.SSLError) as e:
            self._paused_until = self.clock() + PAUSE_AFTER_FAILURE
            raise RuntimeError(f"status patch failed: {e}") from None


def sink_from_env(env: dict | None = None) -> StatusSink | None:
    """The sink for this process, or None when not running under the controller."""
    env = os.environ if env is None else env
    name, namespace = env.get(names.ENV_JOB_NAME), env.get(names.ENV_JOB_NAMESPACE)
    if not name or not namespace:
        return None
    kubeconfig = env.get("KUBECONFIG")
    if kubeconfig:
        target = ApiTarget.from_kubeconfig(kubeconfig.split(os.pathsep)[0])
    else:
        target = ApiTarget.in_cluster(env)
    if target is None:
        return None
    attempt = env.get(names.ENV_ATTEMPT)
    interval = float(env.get(names.ENV_STATUS_INTERVAL, PROGRESS_INTERVAL))
    return StatusSink(target, name, namespace, pod=env.get(names.ENV_POD_NAME),
                      attempt=int(attempt) if attempt and attempt.isdigit() else None, interval=interval)


__all__ = ["StatusSink", "ApiTarget", "sink_from_env"]
