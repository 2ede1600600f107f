"""Progress reporting: one JSON object per line on stdout, a progress bar on stderr when it is a terminal,
and the final result in the termination-message file.

Events:
  {"event": "phase", "phase": "Training", "time": ...}
  {"event": "progress", "step": 10, "totalSteps": 100, "epoch": 0.4, "loss": 2.1, "learningRate": 1e-4,
   "tokensPerSecond": 5123.0, "time": ...}
  {"event": "eval", "step": 25, "evalLoss": 1.9, "time": ...}                 once per evaluation
  {"event": "checkpoint", "name": "checkpoint-100", "step": 100, "time": ...}
  {"event": "published", "step": 75, "choice": "best" | "last", "evalLoss": 1.7, "reason": ..., "time": ...}
                                                                                 at the end of Training
  {"event": "result", "phase": "Succeeded" | "Failed", "reason": ..., "message": ..., "output": ...,
   "metrics": {..., "training_seconds": 80.1, "uploading_seconds": 0.4}, "phaseSeconds": {...}, "exitCode": 0,
   "time": ...}
Other sinks (the controller's status patcher) receive the same dicts. On a terminal, a `console`
(runner/report/console.py) renders the same events and log lines for a person instead; `details` carries what only the
human summary shows (the eval prompts' answers, the job), never emitted.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from datetime import datetime, timezone
from typing import Any, Callable, TextIO

from runner.api import names, status
from runner.api.errors import redact


Sink = Callable[[dict], None]


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def clock(seconds: float | None) -> str:
    """0:07, 4:05, 1:02:03."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = int(round(max(seconds, 0)))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


# The reasons that name a phase's work (reading, training, merging, publishing), as opposed to the job itself.
STEP_REASONS = (status.DOWNLOAD_FAILED, status.TRAINING_FAILED, status.MERGE_FAILED, status.UPLOAD_FAILED)


def failure_reason(reason: str, phase: str | None, *, retryable: bool) -> str:
    """The reason a failure is reported with: the phase it happened in, not the operation that raised it. A store
    check run while Validating raises its operation's reason (an output found not writable: UploadFailed), but
    nothing was uploaded: a permanent failure there is InvalidSpec (the job as written cannot run; the message
    says what to fix), a retryable one keeps the store's reason (nothing in the spec to fix). In the later phases
    a step's reason is that phase's (a checkpoint upload refused while Training is TrainingFailed). Reasons about
    the job itself (InvalidSpec, OutOfMemory) are kept."""
    own = status.PHASE_REASON.get(phase or "")
    if own is None or reason not in STEP_REASONS or (phase == status.VALIDATING and retryable):
        return reason
    return own


class Reporter:
    def __init__(
        self,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
        termination_log: str | None = None,
        sinks: list[Sink] | None = None,
        console: Any = None,
    ):
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.termination_log = termination_log or os.environ.get(names.ENV_TERMINATION_LOG,
                                                                       names.TERMINATION_LOG)
        self.sinks = list(sinks or [])
        self.phase_name: str | None = None
        self.phase_started: dict[str, float] = {}
        self.phase_seconds: dict[str, float] = {}
        self.console = console  # the human view on a terminal (runner.report.console.Console), or None
        self.details: dict[str, Any] = {}  # for the console's summary only
        if console is not None:
            console.details = self.details
        self._tty = console is None and hasattr(self.stderr, "isatty") and self.stderr.isatty()
        self._started = time.monotonic()

    # ------------------------------------------------------------------ events
    def emit(self, event: dict) -> None:
        event = _clean({**event, "time": _now()})
        self.stdout.write(json.dumps(event, ensure_ascii=False) + "\n")
        self.stdout.flush()
        for sink in self.sinks:
            try:
                sink(event)
            except Exception as e:  # a status sink must never kill training
                self.log(f"status sink failed: {e.__class__.__name__}: {e}")
        if self.console is not None:
            self.console.event(event)

    def phase(self, name: str, **fields: Any) -> None:
        assert name in status.RUNNER_STEPS, name
        self._close_phase()
        self.phase_name = name
        self.phase_started[name] = time.monotonic()
        self._line(f"phase {name}")  # the console draws its own header
        self.emit({"event": "phase", "phase": name, **fields})

    def progress(self, **fields: Any) -> None:
        self.emit({"event": "progress", **fields})
        if self._tty:
            step, total = fields.get("step", 0), fields.get("totalSteps") or 0
            width = 30
            done = int(width * step / total) if total else 0
            loss = fields.get("loss")
            tps = fields.get("tokensPerSecond")
            elapsed = time.monotonic() - self.phase_started.get(self.phase_name or "", self._started)
            eta = elapsed / step * (total - step) if step and total else None
            self.stderr.write(
                f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total}"
                + (f" loss {loss:.4f}" if isinstance(loss, float) else "")
                + (f" {tps:,.0f} tok/s" if isinstance(tps, float) else "")
                + f" {clock(elapsed)}" + (f" ETA {clock(eta)}" if eta is not None else "")
            )
            if total and step >= total:
                self.stderr.write("\n")
            self.stderr.flush()

    def log(self, message: str) -> None:
        self._line(message)
        if self.console is not None:
            self.console.log(redact(message))

    def _line(self, message: str) -> None:
        self.stderr.write(f"[runner] {redact(message)}\n")
        self.stderr.flush()

    # ------------------------------------------------------------------ the end
    def _close_phase(self) -> None:
        if self.phase_name in self.phase_started:
            self.phase_seconds[self.phase_name] = round(
                time.monotonic() - self.phase_started[self.phase_name], 3
            )

    def phase_times(self) -> dict[str, float]:
        """Seconds of every phase so far, the current one up to now (what the report records: it is written at
        the end of Merging, before Uploading)."""
        times = dict(self.phase_seconds)
        if self.phase_name in self.phase_started:
            times[self.phase_name] = round(time.monotonic() - self.phase_started[self.phase_name], 3)
        return times

    def result(self, *, succeeded: bool, exit_code: int, **fields: Any) -> dict:
        self._close_phase()
        phase = status.SUCCEEDED if succeeded else status.FAILED
        self.phase_name = phase
        event = {"event": "result", "phase": phase, "exitCode": exit_code, "phaseSeconds": self.phase_seconds}
        event.update(fields)
        if isinstance(event.get("metrics"), dict):  # every phase's seconds as numbers: status.metrics shows them
            event["metrics"] = {**event["metrics"],
                                **{f"{p.lower()}_seconds": s for p, s in self.phase_seconds.items()}}
        self.emit(event)
        self.write_termination(event)
        return event

    def write_termination(self, event: dict) -> None:
        """Kubernetes shows this file as the container's termination message (4 KiB kept)."""
        if self.console is not None and event.get("event") == "result":
            self.console.event(_clean(event))  # a launcher's rank-0 result (result() showed its own already)
        message = json.dumps(_clean(event), ensure_ascii=False)
        if len(message.encode()) > names.TERMINATION_MESSAGE_LIMIT:
            slim = {k: event.get(k) for k in ("event", "phase", "exitCode", "reason", "output")}
            slim["message"] = str(event.get("message", ""))[:1500]
            message = json.dumps(_clean(slim), ensure_ascii=False)[:names.TERMINATION_MESSAGE_LIMIT]
        try:
            with open(self.termination_log, "w", encoding="utf-8") as f:
                f.write(message)
        except OSError:
            pass  # not under Kubernetes, or not writable: stdout already has the result
