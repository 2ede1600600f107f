"""The human view of a run on a terminal: one header per phase, one live progress line, and a summary.

`python -m runner run` / `quickstart` use it when stdout is a terminal; pods, CI and pipes get the JSON events
instead (runner/report/events.py). Long lines are wrapped at spaces, never cut (a path stays whole on its line);
a terminal that reports no width, or a tiny one, is drawn FALLBACK_WIDTH wide. Everything else that would reach the terminal - Python warnings, library logging,
progress bars, native libraries writing to file descriptors 1 and 2 - goes to a log file instead (`session`),
unless `--verbose`.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from runner.api import status
from runner.report.events import clock
from runner.report.summary import summary

_CODES = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "blue": "34", "cyan": "36"}
TICK_SECONDS = 1.0
MIN_WIDTH = 40  # narrower is taken for a terminal that does not know its width (0 from `script`, some CI runners)
FALLBACK_WIDTH = 100


class Console:
    def __init__(self, out: TextIO, *, color: bool | None = None, verbose: bool = False,
                 log_path: Path | None = None, tick: float | None = TICK_SECONDS, width: int | None = None):
        self.out = out
        self.color = _wants_color(out) if color is None else color
        self.verbose = verbose
        self.log_path = log_path
        self.fixed_width = width
        self.details: dict[str, Any] = {}  # the Reporter's: job, samples, metrics
        self.phase: str | None = None
        self.phase_start = self.started = time.monotonic()
        self.progress: dict | None = None
        self.first_progress: tuple[float, int] | None = None
        self.first_loss: float | None = None
        self.last_progress_time = 0.0
        self.eval_loss: float | None = None
        self.checkpoint: int | None = None
        self.result: dict | None = None
        self._live = False  # a live line is on screen (no newline after it yet)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if tick:
            self._ticker = threading.Thread(target=self._tick, args=(tick,), name="console", daemon=True)
            self._ticker.start()

    # ------------------------------------------------------------------------------------- drawing
    def style(self, text: str, *styles: str) -> str:
        if not self.color or not styles:
            return text
        return "\x1b[" + ";".join(_CODES[s] for s in styles) + "m" + text + "\x1b[0m"

    def width(self) -> int:
        if self.fixed_width:
            return self.fixed_width
        try:
            columns = os.get_terminal_size(self.out.fileno()).columns
        except (OSError, ValueError, AttributeError):
            columns = shutil.get_terminal_size((0, 0)).columns  # $COLUMNS, else 0
        return columns if columns >= MIN_WIDTH else FALLBACK_WIDTH

    def wrap(self, text: str, indent: int = 0) -> list[str]:
        """`text` as lines that fit beside `indent` columns: broken at spaces; a word too long for a line gets one
        of its own, whole if it is a path or URI (never cut), else in pieces."""
        room = max(self.width() - 1 - indent, 20)
        lines: list[str] = []
        current = ""
        for word in text.split(" "):
            if current and len(current) + 1 + len(word) > room:
                lines.append(current)
                current = ""
            if len(word) > room and not _is_path(word):
                if current:
                    lines.append(current)
                pieces = [word[i:i + room] for i in range(0, len(word), room)]
                lines += pieces[:-1]
                current = pieces[-1]
                continue
            current = f"{current} {word}" if current else word
        lines.append(current)
        return lines

    def _fit(self, text: str, indent: int = 0) -> str:
        """One line (the live line is redrawn in place, so it cannot wrap): cut only where it cannot fit."""
        room = self.width() - 1 - indent
        return text if len(text) <= room else text[: max(room - 1, 1)] + "…"

    def line(self, text: str = "") -> None:
        """A permanent line (the live line, if any, is redrawn below it)."""
        with self._lock:
            self.out.write("\r\x1b[2K" + text + "\n")
            self._live = False
            self._draw_live()

    def _draw_live(self) -> None:
        text = self._live_text()
        if text is None or self.result is not None:
            return
        self.out.write("\r\x1b[2K" + text)
        self.out.flush()
        self._live = True

    def _end_live(self, keep: bool) -> None:
        if self._live:
            self.out.write("\n" if keep else "\r\x1b[2K")
            self._live = False
        self.out.flush()

    def _live_text(self) -> str | None:
        if self.phase is None:
            return None
        now = time.monotonic()
        elapsed = now - self.phase_start
        if self.phase != status.TRAINING or self.progress is None:
            if elapsed < 1:
                return None
            doing = "loading the model, starting to train" if self.phase == status.TRAINING else "working"
            return "      " + self.style(self._fit(f"{doing} · {clock(elapsed)}", 6), "dim")
        p = self.progress
        step, total = p.get("step", 0), p.get("totalSteps") or 0
        if total and step >= total:  # trained: the clock stops at the last step
            elapsed = self.last_progress_time - self.phase_start
        parts = [f"step {step}/{total}" + (f" ({100 * step // total}%)" if total else "")]
        if p.get("epoch") is not None:
            parts.append(f"epoch {p['epoch']:g}")
        if isinstance(p.get("loss"), (int, float)):
            parts.append(f"loss {_num(p['loss'])}")
        if self.eval_loss is not None:
            parts.append(f"eval loss {_num(self.eval_loss)}")
        if isinstance(p.get("tokensPerSecond"), (int, float)):
            parts.append(f"{p['tokensPerSecond']:,.0f} tok/s")
        parts.append(f"{clock(elapsed)} elapsed")
        eta = self._eta(now, step, total)
        parts.append("done" if total and step >= total else f"ETA {clock(eta) if eta is not None else '…'}")
        for optional in ("tok/s", "epoch ", "elapsed", "eval loss"):  # dropped first where the line is too narrow
            if len(" · ".join(parts)) + 7 <= self.width():
                break
            parts = [p for p in parts if optional not in p]
        text = " · ".join(parts)
        if len(text) + 19 < self.width():  # the bar only where it fits beside the numbers
            text = _bar(step, total, 12) + " " + text
        return "      " + self._fit(text, 6)

    def _eta(self, now: float, step: int, total: int) -> float | None:
        if not total or not step:
            return None
        t0, s0 = self.first_progress or (self.phase_start, step)
        if step <= s0:  # one point so far: the time to it includes loading the model, no rate yet
            return None
        per_step = (self.last_progress_time - t0) / (step - s0)
        return max(per_step * (total - step) - (now - self.last_progress_time), 0.0)

    def _tick(self, every: float) -> None:
        while not self._stop.wait(every):
            with self._lock:
                if self.result is None and self._live_text() is not None:
                    self._draw_live()

    # -------------------------------------------------------------------------------------- events
    def note(self, text: str) -> None:
        for i, part in enumerate(self.wrap(text, 2)):
            self.line(("  " if i else "") + self.style(part, "dim"))

    def command(self, text: str) -> None:
        """A shell command on a line of its own, never wrapped: it runs as printed when copied."""
        self.line("    " + self.style(text, "cyan"))

    def event(self, event: dict) -> None:
        kind = event.get("event")
        with self._lock:
            if kind == "phase":
                self._phase(event["phase"])
            elif kind == "progress":
                now = time.monotonic()
                if self.first_progress is None:
                    self.first_progress, self.first_loss = (now, event.get("step", 0)), event.get("loss")
                self.progress, self.last_progress_time = event, now
                self._draw_live()
            elif kind == "eval":
                self.eval_loss = event.get("evalLoss")
                self._draw_live()
            elif kind == "checkpoint":
                self.checkpoint = event.get("step")
            elif kind == "result" and self.result is None:
                self._end_live(keep=self.phase == status.TRAINING and self.progress is not None)
                self.result = event
                for text in summary(self, event):
                    self.out.write(text + "\n")
                self.out.flush()

    def _phase(self, name: str) -> None:
        self._end_live(keep=self.phase == status.TRAINING and self.progress is not None)
        self.phase, self.phase_start = name, time.monotonic()
        steps = list(status.RUNNER_STEPS)
        job = self.details.get("job")
        if job is not None and not job.spec.merge.enabled:
            steps.remove(status.MERGING)
        number = f"[{steps.index(name) + 1}/{len(steps)}] " if name in steps else ""
        self.line(self.style(number, "dim") + self.style(name, "bold", "cyan"))

    def log(self, message: str) -> None:
        lines = [ln for ln in message.splitlines() if ln.strip()] or [""]
        if not self.verbose:
            if lines[0].startswith("failed ("):
                return  # the summary says it
            if lines[0].startswith("Traceback"):
                lines = ["a traceback went to the log" + (f": {self.log_path}" if self.log_path else "")]
            elif len(lines) > 1:
                lines = [lines[0] + f" … ({len(lines) - 1} more lines in the log)"]
            lines = [("  " if i else "") + part for i, part in enumerate(self.wrap(lines[0], 8))]
        for text in lines:
            self.line("      " + self.style(text, "dim"))

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2)
        with self._lock:
            self._end_live(keep=True)


def _is_path(word: str) -> bool:
    return "/" in word or "\\" in word


def _bar(step: int, total: int, width: int) -> str:
    done = int(width * step / total) if total else 0
    return "█" * done + "░" * (width - done)


def _num(x: float) -> str:
    return f"{x:.4f}" if abs(x) < 10 else f"{x:.3g}"


def _wants_color(out: TextIO) -> bool:
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return hasattr(out, "isatty") and out.isatty()


# ------------------------------------------------------------------------------------------ session
def default_log_path(work_dir: str | None, fallback_dir: Path | None = None) -> Path:
    """Where library output goes on a terminal: the work dir, else `fallback_dir` (the quickstart's), else
    a new file in the system's temp dir."""
    if work_dir:
        return Path(work_dir) / "runner.log"
    if fallback_dir is not None:
        return Path(fallback_dir) / "runner.log"
    import tempfile

    return Path(tempfile.gettempdir()) / f"finetune-runner-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


@contextlib.contextmanager
def session(log_path: Path, *, verbose: bool = False):
    """On a terminal: yields (console, log stream). The console draws on the terminal (a copy of fd 1); fds 1
    and 2 - Python's sys.stdout/sys.stderr, warnings, logging, tqdm bars, C and Rust libraries - go to
    `log_path`, unless `verbose`, when they stay on the terminal too."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "a", encoding="utf-8", buffering=1)
    sys.stdout.flush()
    sys.stderr.flush()
    tty = os.fdopen(os.dup(1), "w", encoding="utf-8", errors="replace", buffering=1)
    saved: tuple[int, int] | None = None
    if not verbose:
        saved = (os.dup(1), os.dup(2))
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        _quiet_libraries()
    console = Console(tty, verbose=verbose, log_path=log_path)
    try:
        yield console, log
    finally:
        console.close()
        sys.stdout.flush()
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        tty.close()
        log.close()


def _quiet_libraries() -> None:
    """Their output goes to the log now; keep it short there too (no progress bars)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")


class Tee:
    """A text stream that writes to several (the JSON events to stdout and an --events file)."""

    def __init__(self, *streams: TextIO):
        self.streams = [s for s in streams if s is not None]

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


class FailuresOnly:
    """The stderr of a rank other than global rank 0: rank 0 prints the `[runner]` lines for every rank, so the
    others pass on only their failures (the `failed (...)` line and a traceback), marked with their rank."""

    FAILURES = ("[runner] failed", "[runner] Traceback")

    def __init__(self, out: TextIO, rank: int):
        self.out, self.rank = out, rank

    def write(self, text: str) -> int:
        if text.startswith(self.FAILURES):
            self.out.write(f"[rank {self.rank}] {text}")
        return len(text)

    def flush(self) -> None:
        self.out.flush()

    def isatty(self) -> bool:
        return False
