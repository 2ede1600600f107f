"""A new user's first hour, as they meet it: the commands the quickstart prints run as printed from a fresh shell,
a second quickstart in the same folder keeps what the user changed, console text wraps (never cut) on a terminal
of 0, 80 and 120 columns, Ctrl-C reads as a pause with the command that resumes, and the mistakes a newcomer makes
in a job file get an error that says what to do. The quickstart itself runs once for the module (under a terminal
that reports 0 columns, as `script` and some CI runners do)."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
import yaml

import runner
from runner.api import errors, names
from runner.quickstart import JOB
from tests.conftest import ROOT, job_doc
from tests.runner.report.test_console import render

FRESH_SHELL = {"PATH": "/usr/bin:/bin"}  # no VIRTUAL_ENV, no venv on PATH, no PYTHONPATH


@dataclass
class Screen:
    code: int
    raw: str

    @property
    def text(self) -> str:
        return render(self.raw)


class Terminal:
    """`python -m runner ARGS` under a pseudo-terminal of `columns` columns (0: a terminal that does not know)."""

    def __init__(self, args: list[str], cwd: Path, *, columns: int):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "xterm-256color"}
        env.pop("COLUMNS", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "runner", *args], stdin=slave, stdout=slave,
                                     stderr=slave, cwd=cwd, env=env, close_fds=True)
        os.close(slave)
        self.master, self.raw = master, b""

    def read_until(self, pattern: str, timeout: float = 600) -> bool:
        """Read what the terminal shows until `pattern` is on it (True) or the program ended (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.raw.decode("utf-8", "replace")):
                return True
            ready, _, _ = select.select([self.master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # EIO: the program closed the terminal
                    return False
                if not data:
                    return False
                self.raw += data
        raise TimeoutError(pattern)

    def finish(self, timeout: float = 600) -> Screen:
        try:
            while self.read_until(r"(?!x)x", timeout):
                pass
            code = self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            os.close(self.master)
        return Screen(code, self.raw.decode("utf-8", "replace"))


def quickstart(directory: Path, *, columns: int, args: tuple = ()) -> Screen:
    return Terminal(["quickstart", "--dir", str(directory), *args], directory.parent, columns=columns).finish()


def printed_commands(screen: str) -> list[str]:
    """The shell commands the screen offers after 'run it again with:' or 'Resume with': the rest of that line,
    or the line under it."""
    lines = screen.splitlines()
    found = []
    for i, line in enumerate(lines[:-1]):
        m = re.search(r"(?:run it again with:|Resume with)(.*)$", line)
        if m:
            found.append(m[1].strip().rstrip(")") or lines[i + 1].strip())
    return found


def in_fresh_shell(command: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], env={**FRESH_SHELL, "HOME": str(cwd)}, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def first(tmp_path_factory) -> tuple[Path, Screen]:
    """The quickstart as a new user runs it first, on a terminal that reports 0 columns."""
    directory = tmp_path_factory.mktemp("newcomer") / "finetune-quickstart"
    screen = quickstart(directory, columns=0)
    assert screen.code == 0, screen.text
    return directory, screen


# ------------------------------------------------------------------------------- commands as printed
def test_each_command_the_quickstart_prints_runs_as_printed_from_a_fresh_shell(first):
    directory, screen = first
    commands = printed_commands(screen.text)
    assert len(commands) == 1, screen.text
    for command in commands:
        done = in_fresh_shell(command, directory.parent)
        assert done.returncode == 0, (command, done.stderr[-2000:])
        result = json.loads(done.stdout.splitlines()[-1])
        assert result["phase"] == "Succeeded" and result["alreadyComplete"] is True


def test_runner_commands_in_the_readme_run_without_an_activated_venv():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    bare = [ln for block in blocks for ln in block.splitlines()
            if re.search(r"(?<![/\w.])python3? -m (runner|controller)\b", ln)]
    assert not bare, bare
    assert ".venv/bin/python -m runner quickstart" in readme


# ---------------------------------------------------------------------------- a second quickstart
def test_a_second_quickstart_reuses_what_is_there_says_so_and_keeps_the_checkpoints(first):
    directory, _ = first
    checkpoints = directory / "output.checkpoints"
    assert any(checkpoints.iterdir())
    before = {p: p.read_bytes() for p in (directory / JOB, directory / "capitals.jsonl")}
    again = quickstart(directory, columns=120)
    assert again.code == 0, again.text
    assert re.search(r"reusing .*capitals\.jsonl.*job\.yaml.*base-model.* already in", again.text), again.text
    assert "nothing was changed" in again.text  # on one line, at 120 columns
    assert any(checkpoints.iterdir())
    assert {p: p.read_bytes() for p in before} == before


def test_a_quickstart_over_changed_files_refuses_naming_dir_and_force_and_touches_nothing(tmp_path):
    directory = tmp_path / "qs"
    shipped = (Path(runner.__file__).parent / "quickstart" / JOB).read_text(encoding="utf-8")
    edited = shipped.replace("@DIR@", str(directory)).replace("epochs: 100", "epochs: 3")
    (directory / "output.checkpoints" / "checkpoint-40").mkdir(parents=True)
    (directory / "output.checkpoints" / "checkpoint-40" / "COMPLETE").write_text("")
    (directory / JOB).write_text(edited)
    (directory / "capitals.jsonl").write_text('{"country": "Peru", "capital": "Lima"}\n')
    proc = subprocess.run([sys.executable, "-m", "runner", "quickstart", "--dir", str(directory)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == errors.EXIT_PERMANENT, proc.stderr
    assert "--dir" in proc.stderr and "--force" in proc.stderr and "Traceback" not in proc.stderr
    assert "capitals.jsonl and job.yaml differ from the quickstart's own" in proc.stderr
    assert (directory / JOB).read_text() == edited
    assert (directory / "capitals.jsonl").read_text().startswith('{"country": "Peru"')
    assert (directory / "output.checkpoints" / "checkpoint-40" / "COMPLETE").exists()
    assert not (directory / "base-model").exists()
    command = re.search(r"To run the job as it is there now: (.*?) \. ", proc.stderr)[1]
    assert command.endswith(f"-m runner run {directory / JOB}") and Path(command.split()[0]).is_absolute()


def test_force_puts_the_quickstarts_files_back_and_keeps_the_users_beside_them(tmp_path):
    from runner.quickstart import check, prepare

    directory = tmp_path / "qs"
    directory.mkdir()
    (directory / "capitals.jsonl").write_text("mine\n")
    (directory / "capitals.jsonl.yours").write_text("kept earlier\n")
    with pytest.raises(errors.PermanentError):
        check(directory)
    done = prepare(directory, force=True)
    assert [p.name for p in done.kept] == ["capitals.jsonl.yours.1"]
    assert (directory / "capitals.jsonl.yours.1").read_text() == "mine\n"
    assert (directory / "capitals.jsonl.yours").read_text() == "kept earlier\n"
    assert '"country": "France"' in (directory / "capitals.jsonl").read_text()
    assert (directory / "base-model" / "config.json").exists() and not (directory / "base-model.partial").exists()
    assert check(directory) == []


# -------------------------------------------------------------------------------- console width
def _joined(text: str) -> str:
    """The screen's words as one line: what a person reads across wrapped lines."""
    return " ".join(text.split())


def _overlong(text: str, columns: int) -> list[str]:
    """Lines wider than `columns` that wrapping should have broken: all but a path too long for any line (alone
    after its indent and label), and code - a shell command to copy, the Python that loads the result - which is
    never wrapped."""
    def fine(line: str) -> bool:
        words = line.split()
        return (len(line) <= columns or "from_pretrained(" in line or " -m runner " in line
                or ("/" in words[-1] and len(words) <= 2 and len(words[-1]) > columns - 16))
    return [ln for ln in text.splitlines() if not fine(ln)]


def _paths(text: str, under: Path) -> set[str]:
    return set(re.findall(rf"{re.escape(str(under))}[^\s)',;]*", text))


def test_a_terminal_of_0_columns_gets_whole_lines_and_paths(first):
    directory, screen = first
    text = screen.text
    assert f"Output       {directory}/output" in text and f"Log          {directory}/runner.log" in text, text
    assert f"{directory}/output (merged float16 model, adapter in adapter/)" in _joined(text)
    assert re.search(r"plan: .*\n.*packing=True", text), text  # the whole plan, wrapped over lines
    assert not [ln for ln in text.splitlines() if ln.endswith("…")], text
    for path in _paths(text, directory):  # every path printed is one that exists: none was cut
        assert Path(path).exists(), path
    assert not _overlong(text, 100), text  # drawn 100 wide, not cut to 40


def test_a_terminal_of_80_columns_wraps_at_80_and_cuts_no_path(first):
    directory, _ = first
    screen = quickstart(directory, columns=80)
    assert screen.code == 0, screen.text
    lines = screen.text.splitlines()
    assert not _overlong(screen.text, 80), screen.text
    assert not [ln for ln in lines if ln.endswith("…")], screen.text
    assert str(directory / "output") in screen.text
    assert f"already complete: {directory}/output holds this job's output" in _joined(screen.text), screen.text


# --------------------------------------------------------------------------- Ctrl-C and the lease
def test_ctrl_c_shows_a_pause_with_the_command_that_resumes_it(tiny_llama, qa_jsonl, tmp_path):
    doc = job_doc(tiny_llama, qa_jsonl, tmp_path / "out",
                  training={"maxSteps": 60, "saveSteps": 1000, "loggingSteps": 1})
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    term = Terminal(["run", str(job)], tmp_path, columns=100)
    assert term.read_until(r"step [2-9]/60"), render(term.raw.decode())
    term.proc.send_signal(signal.SIGINT)
    screen = term.finish()
    text = screen.text
    assert screen.code == errors.EXIT_RETRYABLE, text
    assert re.search(r"■ Stopped in Training after [\d:]+  \(Ctrl-C, exit code 75\)", text), text
    assert "Failed" not in text and "TrainingFailed" not in text
    assert "holding the lease" not in text and " pid " not in text and "attempt -" not in text
    assert "checkpoints go to" in _joined(text)
    [command] = printed_commands(text)
    assert command.endswith(f"-m runner run {job}")
    done = in_fresh_shell(command, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    events = [json.loads(ln) for ln in done.stdout.splitlines()]
    assert [e for e in events if e["event"] == "resumed"] and events[-1]["phase"] == "Succeeded"


def test_the_checkpoint_lock_is_said_in_words(first):
    _, screen = first
    assert "holding the lease" not in screen.text and "job - attempt -" not in screen.text
    assert re.search(r"checkpoints go to \S+output\.checkpoints; no other run writes there", _joined(screen.text))


# ---------------------------------------------------------------------------- job-file mistakes
def _validate(tmp_path: Path, text: str, name: str = "job.yaml") -> subprocess.CompletedProcess:
    path = tmp_path / name
    path.write_text(text)
    return subprocess.run([sys.executable, "-m", "runner", "validate", "--spec-only", str(path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_a_file_with_only_spec_says_what_is_missing(tmp_path):
    spec = job_doc("./m", "d.jsonl", "./o")["spec"]
    proc = _validate(tmp_path, yaml.safe_dump({"spec": spec}))
    assert proc.returncode == errors.EXIT_PERMANENT
    assert f"add `apiVersion: {names.API_VERSION}` and `kind: {names.KIND}`" in proc.stderr, proc.stderr
    assert "drop the `spec:` line" in proc.stderr and "unknown field" not in proc.stderr


def test_yaml_errors_name_the_file_and_the_line(tmp_path):
    proc = _validate(tmp_path, "model:\n  source: [a\n", name="my-job.yaml")
    assert proc.returncode == errors.EXIT_PERMANENT
    assert f"{tmp_path / 'my-job.yaml'}: not valid YAML at line 3" in proc.stderr, proc.stderr
    assert "<unicode string>" not in proc.stderr and "Traceback" not in proc.stderr


def test_field_paths_are_written_one_way_in_every_error(tiny_llama, qa_jsonl, tmp_path):
    bare = {"model": {"source": "./m", "trustRemoteCod": True}, "dataset": {"source": "d.jsonl"},
            "output": {"destination": "./o"}}
    from_bare = _validate(tmp_path, yaml.safe_dump(bare)).stderr
    from_manifest = _validate(tmp_path, yaml.safe_dump({"apiVersion": names.API_VERSION, "kind": names.KIND,
                                                       "metadata": {"name": "j"}, "spec": bare})).stderr
    line = "spec.model.trustRemoteCod: unknown field; did you mean `trustRemoteCode`?"
    assert line in from_bare and line in from_manifest, from_bare + from_manifest
    # an error found while running (the data's columns) is written the same way
    doc = job_doc(tiny_llama, qa_jsonl, tmp_path / "o")
    doc["spec"]["dataset"] = {"source": str(qa_jsonl), "format": "prompt-completion", "columns": {"prompt": "nope"}}
    job = tmp_path / "run.yaml"
    job.write_text(yaml.safe_dump(doc))
    proc = subprocess.run([sys.executable, "-m", "runner", "run", str(job)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["message"].startswith("spec.dataset.columns.prompt: column 'nope'"), result


def test_the_published_job_yaml_is_the_whole_spec_with_its_defaults(first):
    from runner.api.parse import load_job

    directory, _ = first
    report = directory / "output" / "report"
    published = yaml.safe_load((report / "job.yaml").read_text())
    spec = published["spec"]
    assert spec["lora"]["dropout"] == 0.0 and "computeDtype" in spec["quantization"]  # one set, one defaulted
    assert spec["training"]["optimizer"] and spec["merge"]["dtype"] == "float16"
    assert load_job(report / "job.yaml").spec == load_job(directory / JOB).spec
    assert "the whole spec, every default filled in, is in `report/job.yaml`" in (directory / "output" /
                                                                                  "README.md").read_text()


@pytest.mark.parametrize("cli", ["runner", "controller"])
def test_both_command_lines_say_their_version(cli):
    proc = subprocess.run([sys.executable, "-m", cli, "--version"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    dist = metadata.packages_distributions()[cli][0]
    assert proc.returncode == 0 and proc.stdout.strip().endswith(f" {metadata.version(dist)}"), proc
