"""Progress reporting: one JSON object per line on stdout, a progress bar on stderr when it is a terminal,
and the final result in the termination-message file.

Events:
  {"event": "phase", "phase": "Training", "time": ...}
  {"event": "progress", "step": 10, "totalSteps": 100, "epoch": 0.4, "loss": 2.1, "learningRate": 1e-4,
   "tokensPerSecond": 5123.0, "time": ...}
  {"event": "result", "phase": "Succeeded" | "Failed", "reason": ..., "message": ..., "output": ...,
   "metrics": {...}, "exitCode": 0, "time": ...}
Other sinks (the controller's status patcher) receive the same dicts.
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


class Reporter:
    def __init__(
        self,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
        termination_log: str | None = None,
        sinks: list[Sink] | None = None,
    ):
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.termination_log = termination_log or os.environ.get(names.ENV_TERMINATION_LOG,
                                                                       names.TERMINATION_LOG)
        self.sinks = list(sinks or [])
        self.phase_name: str | None = None
        self.phase_started: dict[str, float] = {}
        self.phase_seconds: dict[str, float] = {}
        self._tty = hasattr(self.stderr, "isatty") and self.stderr.isatty()

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

    def phase(self, name: str, **fields: Any) -> None:
        assert name in status.RUNNER_STEPS, name
        self._close_phase()
        self.phase_name = name
        self.phase_started[name] = time.monotonic()
        self.log(f"phase {name}")
        self.emit({"event": "phase", "phase": name, **fields})

    def progress(self, **fields: Any) -> None:
        self.emit({"event": "progress", **fields})
        if self._tty:
            step, total = fields.get("step", 0), fields.get("totalSteps") or 0
            width = 30
            done = int(width * step / total) if total else 0
            loss = fields.get("loss")
            tps = fields.get("tokensPerSecond")
            self.stderr.write(
                f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total}"
                + (f" loss {loss:.4f}" if isinstance(loss, float) else "")
                + (f" {tps:,.0f} tok/s" if isinstance(tps, float) else "")
            )
            if total and step >= total:
                self.stderr.write("\n")
            self.stderr.flush()

    def log(self, message: str) -> None:
        self.stderr.write(f"[runner] {redact(message)}\n")
        self.stderr.flush()

    # ------------------------------------------------------------------ the end
    def _close_phase(self) -> None:
        if self.phase_name in self.phase_started:
            self.phase_seconds[self.phase_name] = round(
                time.monotonic() - self.phase_started[self.phase_name], 3
            )

    def result(self, *, succeeded: bool, exit_code: int, **fields: Any) -> dict:
        self._close_phase()
        phase = status.SUCCEEDED if succeeded else status.FAILED
        self.phase_name = phase
        event = {"event": "result", "phase": phase, "exitCode": exit_code, "phaseSeconds": self.phase_seconds}
        event.update(fields)
        self.emit(event)
        self.write_termination(event)
        return event

    def write_termination(self, event: dict) -> None:
        """Kubernetes shows this file as the container's termination message (4 KiB kept)."""
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
