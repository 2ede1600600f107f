"""The final screen of a run on a terminal: where the output is, the losses, the time per phase, the eval
prompts' answers before and after training, and how to load the result. A run a person stopped (Ctrl-C) is
shown as stopped, with the command that resumes it; an output already complete, as left alone."""
from __future__ import annotations

import json
import time
from pathlib import Path

from runner.api import status
from runner.report.events import clock
from runner.store.outputs import ALREADY_COMPLETE

INTERRUPTED = "interrupted"  # a result field: true where a person stopped the run (Ctrl-C)
RESUME = "resume"  # the Reporter's details: the command line that runs the same job again


def summary(console, result: dict) -> list[str]:
    st = console.style
    total = clock(time.monotonic() - console.started)
    job = console.details.get("job")
    name = f"  ·  {job.name}" if job is not None else ""
    if result.get(INTERRUPTED):
        return _stopped(console, result, total, name)
    if result.get("phase") != status.SUCCEEDED:
        return _failure(console, result, total, name)
    out = [""]
    if result.get(ALREADY_COMPLETE):
        out.append(st("✓ Already complete: nothing was changed", "bold", "green") + name)
    else:
        out.append(st(f"✓ Succeeded in {total}", "bold", "green") + name)
    out.append("")
    rows = []
    output = result.get("output")
    if output:
        rows.append(("Output", f"{output}  ({_what(job)})" if job is not None else str(output)))
    loss = _loss_text(console, result)
    if loss:
        rows.append(("Loss", loss))
    published = (console.details.get("metrics") or {}).get("published")
    if isinstance(published, dict) and (published.get("choice") == "best" or "bestStep" in published
                                        or published.get("stoppedEarly")):
        rows.append(("Published", _published_text(published)))
    seconds = result.get("phaseSeconds") or {}
    if seconds:
        rows.append(("Time", " · ".join(f"{p} {_secs(s)}" for p, s in seconds.items())))
    cost = _estimate_text(console, result)
    if cost:
        rows.append(("Estimate", cost))
    if output and "://" not in str(output):
        rows.append(("Report", f"{output}/report  (metrics.json, loss.png, token_lengths.png, samples.json)"))
    elif output:
        rows.append(("Report", "report/ in the output (metrics.json, loss.png, token_lengths.png, samples.json)"))
    if result.get("checkpoints"):
        rows.append(("Checkpoints", str(result["checkpoints"])))
    if console.log_path:
        rows.append(("Log", str(console.log_path)))
    out += _table(console, rows)
    samples = console.details.get("samples")
    if samples is None:
        samples = read_samples(output)
    if samples:
        out += ["", st("  Eval prompts, before → after training", "bold")]
        for s in samples:
            out += ["    " + part for part in console.wrap(_flat(s.get("prompt")), 4)]
            for label, key, color in (("before", "before", "dim"), ("after ", "after", "green")):
                if s.get(key) is not None:
                    parts = console.wrap(_flat(s[key]), 14) if _flat(s[key]) else []
                    out.append("      " + st(label, "dim") + "  " + (st(parts[0], color) if parts else
                                                                       st("(nothing)", "dim")))
                    out += [" " * 14 + st(part, color) for part in parts[1:]]
    code = load_code(job, output)
    if code:
        out += ["", st("  Load it in Python", "bold")] + ["    " + st(c, "cyan") for c in code]
    out.append("")
    return out


def _failure(console, result: dict, total: str, name: str) -> list[str]:
    st = console.style
    where = f" in {result['failedPhase']}" if result.get("failedPhase") else ""
    why = result.get("reason") or "Failed"
    retry = ", retryable" if result.get("retryable") else ""
    out = ["", st(f"✗ Failed{where} after {total}", "bold", "red") + f"  ({why}{retry}, exit code "
           f"{result.get('exitCode')}){name}", ""]
    out += _message(console, result)
    if console.log_path:
        out += ["", "  " + st("Log", "dim") + f"  {console.log_path}"]
    out.append("")
    return out


def _stopped(console, result: dict, total: str, name: str) -> list[str]:
    """Ctrl-C: a pause the user asked for, with the command that goes on from the newest checkpoint."""
    st = console.style
    where = f" in {result['failedPhase']}" if result.get("failedPhase") else ""
    out = ["", st(f"■ Stopped{where} after {total}", "bold", "yellow") + f"  (Ctrl-C, exit code "
           f"{result.get('exitCode')}){name}", ""]
    out += _message(console, result)
    resume = console.details.get(RESUME)
    if resume:
        out += ["", st("  Resume with", "bold"), "    " + st(resume, "cyan")]
    if console.log_path:
        out += ["", "  " + st("Log", "dim") + f"  {console.log_path}"]
    out.append("")
    return out


def _message(console, result: dict) -> list[str]:
    out = []
    for para in str(result.get("message") or "").splitlines() or [""]:
        out += ["  " + ln for ln in console.wrap(para, 2)]
    return out


def _table(console, rows: list[tuple[str, str]]) -> list[str]:
    pad = max((len(k) for k, _ in rows), default=0)
    out = []
    for k, v in rows:
        parts = console.wrap(v, pad + 4)
        out.append("  " + console.style(k.ljust(pad), "dim") + "  " + parts[0])
        out += [" " * (pad + 4) + part for part in parts[1:]]
    return out


def _loss_text(console, result: dict) -> str:
    metrics = {**(result.get("metrics") or {}), **(console.details.get("metrics") or {})}
    parts = []
    last = (console.progress or {}).get("loss", metrics.get("final_train_loss"))
    if isinstance(last, (int, float)):
        first = console.first_loss
        parts.append(f"train {first:.4g} → {last:.4g}" if isinstance(first, (int, float)) else f"train {last:.4g}")
        if isinstance(metrics.get("train_loss"), (int, float)):
            parts[-1] += f" (mean {metrics['train_loss']:.4g})"
    elif isinstance(metrics.get("train_loss"), (int, float)):
        parts.append(f"train {metrics['train_loss']:.4g} (mean)")
    ev = metrics.get("eval_loss", console.eval_loss)
    if isinstance(ev, (int, float)):
        parts.append(f"eval {ev:.4g}")
    return " · ".join(parts)


def _estimate_text(console, result: dict) -> str:
    """The cost estimated as training started (metrics.json's `estimate`) beside the measured training time."""
    metrics = {**(result.get("metrics") or {}), **(console.details.get("metrics") or {})}
    e, actual = metrics.get("estimate"), metrics.get("train_runtime")
    if not isinstance(e, dict) or not e.get("summary"):
        return ""
    text = f"{e['summary']} of training on {e.get('gpus', 1)} x {e.get('gpu')}"
    if isinstance(e.get("seconds"), (int, float)) and isinstance(actual, (int, float)) and e["seconds"] > 0:
        text += f" · actual {_secs(actual)} ({100 * (actual / e['seconds'] - 1):+.0f}%)"
    return text + (f" · from the measured row {e['row']}" if e.get("row") else "")


def _published_text(p: dict) -> str:
    """One line; the whole reason is in metrics.json and the card."""
    if p.get("choice") == "best":
        loss = f", {p['evalLoss']:.4g}" if isinstance(p.get("evalLoss"), (int, float)) else ""
        text = f"step {p.get('step')} (lowest eval loss{loss}; last step {p.get('lastStep')})"
    else:
        text = f"step {p.get('step')}, the last"
        if p.get("bestStep") not in (None, p.get("step")) and isinstance(p.get("bestEvalLoss"), (int, float)):
            text += f" (lowest eval loss {p['bestEvalLoss']:.4g} at step {p['bestStep']})"
    return text + (" · stopped early" if p.get("stoppedEarly") else "")


def _secs(s: float) -> str:
    return f"{s:.1f}s" if s < 60 else clock(s)


def _flat(text) -> str:
    return "" if text is None else str(text).replace("\n", " ⏎ ").strip()


def _what(job) -> str:
    s = job.spec
    if s.merge.enabled:
        return f"merged {s.merge.dtype} model" + (", adapter in adapter/" if s.output.push_adapter else "")
    return "LoRA adapter"


def load_code(job, output: str | None) -> list[str]:
    """Two lines of Python that load the result."""
    if job is None or not output:
        return []
    dest = job.places.destination
    merged = job.spec.merge.enabled
    cls = "AutoModelForCausalLM" if merged else "AutoPeftModelForCausalLM"
    pkg = "transformers" if merged else "peft"
    if dest.hub_id:
        where = dest.hub_id
    elif copy := dest.copy_command("./model"):
        return [f"# {copy}   (then:)", f"from {pkg} import {cls}; model = {cls}.from_pretrained('./model')"]
    else:
        where = str(output)
    return [f"from {pkg} import {cls}", f"model = {cls}.from_pretrained({where!r})"]


def read_samples(output: str | None) -> list[dict] | None:
    """The before/after answers of a local output's report (when the run did not hand them over)."""
    if not output or "://" in str(output):
        return None
    try:
        return json.loads((Path(output) / "report" / "samples.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
