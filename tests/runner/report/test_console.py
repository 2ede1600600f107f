"""`python -m runner run` as a person at a terminal sees it: rendered under a real pseudo-terminal, the
screen is asserted (phase headers, a live progress line with an ETA, the summary), and so is the absence of
every library's noise; the JSON events stay as they are off a terminal and in `--events`."""
from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import yaml

from runner.api import errors
from runner.report.console import Console
from runner.report.events import Reporter, clock
from tests.conftest import ROOT, job_doc, run_cli

NOISE = ("gemm_4bit", "pip install kernels", "FutureWarning", "warnings.warn", "Loading weights",
         "Writing model shards", "Pre-processing sequences", "mtime may not be reliable", '{"event"', "[runner]")
_CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")


def render(raw: str) -> str:
    """The screen a terminal shows for `raw` (carriage returns overwrite, ESC[2K clears the line)."""
    lines, row, col, i = [[]], 0, 0, 0
    while i < len(raw):
        m = _CSI.match(raw, i)
        if m:
            if m.group(2) == "K":
                lines[row] = [] if m.group(1) == "2" else lines[row][:col]
            i = m.end()
            continue
        ch, i = raw[i], i + 1
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row, col = row + 1, 0
            if row == len(lines):
                lines.append([])
        elif ch != "\x1b":
            line = lines[row]
            line.extend(" " * (col - len(line)))
            line[col:col + 1] = [ch]
            col += 1
    return "\n".join("".join(ln).rstrip() for ln in lines)


def run_in_pty(args: list[str], cwd, *, timeout: float = 600, env: dict | None = None) -> tuple[int, str]:
    """Run `python -m runner ARGS` with a pseudo-terminal as its stdin, stdout and stderr: (exit code, raw
    text the terminal received)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 140, 0, 0))
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "xterm-256color", **(env or {})}
    full_env.pop("NO_COLOR", None)
    proc = subprocess.Popen([sys.executable, "-m", "runner", *args], stdin=slave, stdout=slave, stderr=slave,
                            cwd=cwd, env=full_env, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return code, b"".join(chunks).decode("utf-8", "replace")


def _write_job(tmp_path, doc) -> str:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc, allow_unicode=True))
    return str(job)


# ------------------------------------------------------------------------------ under a real terminal
def test_terminal_shows_phases_a_live_line_and_a_summary_without_library_noise(tiny_llama, qa_jsonl, tmp_path):
    out = tmp_path / "out"
    doc = job_doc(tiny_llama, qa_jsonl, out, dataset={"evalFraction": 0.25},
                  training={"maxSteps": 8, "loggingSteps": 2, "saveSteps": 4, "evalSteps": 4},
                  evalPrompts=["Q: What is 2 plus 3 ?\nA:"], evalMaxNewTokens=2)
    events = tmp_path / "events.jsonl"
    code, raw = run_in_pty(["run", _write_job(tmp_path, doc), "--work-dir", str(tmp_path / "work"),
                            "--termination-log", str(tmp_path / "term"), "--events", str(events)], tmp_path)
    screen = render(raw)
    assert code == 0, screen
    headers = re.findall(r"^\[(\d)/5\] (\w+)$", screen, re.M)
    assert headers == [("1", "Validating"), ("2", "Downloading"), ("3", "Training"), ("4", "Merging"),
                       ("5", "Uploading")], screen
    live = [ln for ln in re.split(r"[\r\n]", raw) if "step " in ln and "ETA" in ln]
    assert any(re.search(r"step \d/8 .*loss \d.*tok/s.*elapsed · ETA \d+:\d\d", ln) for ln in live), live
    assert re.search(r"step 8/8 \(100%\) · epoch [\d.]+ · loss [\d.]+ · eval loss [\d.]+ · .* · done", screen)
    assert "✓ Succeeded in" in screen and "test-job" in screen
    assert re.search(rf"Output +{re.escape(str(out))}  \(merged float16 model", screen), screen
    assert re.search(r"Loss +train [\d.e-]+ → [\d.e-]+ \(mean [\d.e-]+\) · eval [\d.e-]+", screen), screen
    assert re.search(r"Time +Validating [\d.]+s · Downloading .* · Training .* · Merging .* · Uploading", screen)
    assert "Q: What is 2 plus 3 ? ⏎ A:" in screen and re.search(r"before +\S", screen) and "after " in screen
    assert f"model = AutoModelForCausalLM.from_pretrained({str(out)!r})" in screen
    log = tmp_path / "work" / "runner.log"
    assert f"Log          {log}" in screen
    for noise in NOISE:
        assert noise not in screen, noise
    # What the terminal does not show went to the log; the events went to --events, as off a terminal.
    logged = log.read_text()
    assert "[runner] phase Training" in logged and '"event": "result"' in logged
    assert any(noise in logged for noise in ("gemm_4bit", "FutureWarning"))  # produced, and kept off the screen
    kinds = [json.loads(line)["event"] for line in events.read_text().splitlines()]
    assert kinds[0] == "phase" and kinds[-1] == "result" and "progress" in kinds and "eval" in kinds
    # The published cards are real ones (runner/report/card.py; tests/runner/report/test_card.py has the details).
    assert "## Before and after" in (out / "README.md").read_text()
    assert "[More Information Needed]" not in (out / "adapter" / "README.md").read_text()
    for card in (out / "README.md", out / "adapter" / "README.md"):  # their Python runs as written
        code = re.search(r"```python\n(.*?)```", card.read_text(), re.S)[1]
        exec(compile(code, str(card), "exec"), {"__name__": "card"})


def test_terminal_failure_says_why_in_words(tmp_path):
    doc = {"model": {"source": "./m", "trustRemoteCod": True}, "dataset": {"source": "d.jsonl"},
           "output": {"destination": "./o"}}
    code, raw = run_in_pty(["run", _write_job(tmp_path, doc), "--log", str(tmp_path / "run.log")], tmp_path,
                           timeout=120)
    screen = render(raw)
    assert code == errors.EXIT_PERMANENT, screen
    assert re.search(r"✗ Failed after [\d:]+  \(InvalidSpec, exit code 2\)", screen), screen
    assert "model.trustRemoteCod: unknown field; did you mean `trustRemoteCode`?" in screen
    assert '{"event"' not in screen and "failed (" not in screen
    assert "InvalidSpec" in (tmp_path / "run.log").read_text()


def test_session_sends_library_output_to_the_log_unless_verbose(tmp_path):
    """Native writes to fd 2, Python warnings and prints: in the log, not on the terminal; --verbose keeps them."""
    script = (
        "import os, sys, warnings\n"
        "from pathlib import Path\n"
        "from runner.report.console import session\n"
        "with session(Path(sys.argv[1]), verbose=sys.argv[2] == 'v') as (console, log):\n"
        "    os.write(2, b'native noise\\n'); print('printed noise'); warnings.warn('a FutureWarning', FutureWarning)\n"
        "    console.event({'event': 'phase', 'phase': 'Training'}); console.log('kept line')\n"
        "print('after the session')\n"
    )
    for mode in ("q", "v"):
        log = tmp_path / f"{mode}.log"
        master, slave = pty.openpty()
        proc = subprocess.Popen([sys.executable, "-c", script, str(log), mode], stdout=slave, stderr=slave,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        os.close(slave)
        raw = b""
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            raw += data
        proc.wait(timeout=60)
        os.close(master)
        screen = render(raw.decode())
        assert "Training" in screen and "kept line" in screen and "after the session" in screen
        noisy = ("native noise" in screen, "printed noise" in screen, "FutureWarning" in screen)
        assert noisy == ((False,) * 3 if mode == "q" else (True,) * 3), screen
        if mode == "q":
            assert {"native noise", "printed noise", "FutureWarning"} <= {
                w for w in ("native noise", "printed noise", "FutureWarning") if w in log.read_text()}


# ------------------------------------------------------------------------------------- off a terminal
def test_events_file_holds_the_same_json_lines_as_stdout(tmp_path):
    doc = {"model": {"source": "./m"}, "dataset": {"source": "d.jsonl", "packing": "maybe"},
           "output": {"destination": "./o"}}
    events = tmp_path / "events.jsonl"
    code, stdout_events, stderr, _ = run_cli(tmp_path, doc, args=("--events", str(events)))
    assert code == errors.EXIT_PERMANENT
    assert [json.loads(line) for line in events.read_text().splitlines()] == stdout_events
    assert stdout_events[-1]["event"] == "result" and "dataset.packing" in stdout_events[-1]["message"]


# ------------------------------------------------------------------------------------ the console alone
def _console():
    out = io.StringIO()
    return Console(out, color=False, tick=None, log_path=None, width=120), out


def test_console_eta_comes_from_the_measured_rate_not_the_model_load():
    console, out = _console()
    reporter = Reporter(stdout=io.StringIO(), stderr=io.StringIO(), termination_log=os.devnull, console=console)
    reporter.phase("Training")
    reporter.progress(step=1, totalSteps=101, epoch=0.1, loss=3.0, tokensPerSecond=100.0)
    assert "ETA …" in out.getvalue()  # the first point holds the model's load time: no rate yet
    console.first_progress = (console.first_progress[0] - 10, 1)  # ten seconds for the next 10 steps
    reporter.progress(step=11, totalSteps=101, epoch=1.1, loss=2.0, tokensPerSecond=100.0)
    eta = re.findall(r"ETA (\d+:\d\d)", out.getvalue())[-1]
    assert eta in ("1:29", "1:30"), out.getvalue()  # 90 steps left at 1 s each
    assert "loss 2.0000" in out.getvalue() and "step 11/101 (10%)" in out.getvalue()


def test_console_log_lines_are_short_and_failures_are_left_to_the_summary():
    console, out = _console()
    console.log("data: 40 training rows")
    console.log("Traceback (most recent call last):\n  File x\nValueError: boom")
    console.log("failed (TrainingFailed): boom")
    console.log("plan: " + "x" * 500)
    text = out.getvalue()
    assert "data: 40 training rows" in text and "a traceback went to the log" in text
    assert "failed (" not in text and max(len(ln) for ln in render(text).splitlines()) < 140


def test_summary_shows_how_to_load_an_adapter_and_a_hub_model():
    from runner.api.parse import parse_job
    from runner.report.summary import load_code

    def job(**output):
        doc = job_doc("hf://org/base", "data.jsonl", "out", **output)
        return parse_job(doc)

    assert load_code(job(merge={"enabled": False}), "/tmp/out") == [
        "from peft import AutoPeftModelForCausalLM", "model = AutoPeftModelForCausalLM.from_pretrained('/tmp/out')"]
    hub = job(output={"destination": "hf://me/tuned", "checkpoints": "/tmp/ck"})
    assert load_code(hub, "https://huggingface.co/me/tuned")[1] == \
        "model = AutoModelForCausalLM.from_pretrained('me/tuned')"


def test_clock():
    assert [clock(s) for s in (0, 7.4, 65, 3723, None)] == ["0:00", "0:07", "1:05", "1:02:03", "-"]
