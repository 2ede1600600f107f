"""The embedded default job: a tiny model and dataset generated or shipped here, run on CPU.

`prepare` writes the job's files into a folder once; a later quickstart in the same folder reuses them as they
are and never rewrites or deletes a file the user changed (nor the checkpoints, from which a stopped run
resumes): where a file differs from the quickstart's own, it refuses (QuickstartConflict) unless forced, and
even forced it keeps the user's copy beside the new one.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from runner.api.errors import PermanentError

DATA, JOB, MODEL = "capitals.jsonl", "job.yaml", "base-model"
KEPT_SUFFIX = ".yours"  # where --force keeps a file the user changed


@dataclass
class Prepared:
    """What `prepare` did: the job file, and which of the quickstart's files it wrote, reused or set aside."""

    job: Path
    written: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)  # the user's changed files, renamed to NAME.yours (--force)


class QuickstartConflict(PermanentError):
    """The folder holds files of the quickstart's names that differ from the quickstart's own."""

    def __init__(self, directory: Path, changed: list[str], run_command: str):
        self.changed = changed
        names, one = " and ".join(changed), len(changed) == 1
        super().__init__(
            f"{directory}: {names} {'differs' if one else 'differ'} from the quickstart's own (changed since it "
            f"wrote {'it' if one else 'them'}); nothing was written or deleted. To run the job as it is there now: "
            f"{run_command} . To start a new quickstart elsewhere: --dir ANOTHER_FOLDER. To put the quickstart's "
            f"own back: --force (yours kept as {' and '.join(n + KEPT_SUFFIX for n in changed)}).")


def _shipped(directory: Path) -> dict[str, str]:
    """The quickstart's own text files for `directory`: name -> content."""
    pkg = resources.files(__package__)
    return {
        DATA: pkg.joinpath(DATA).read_text(encoding="utf-8"),
        JOB: pkg.joinpath(JOB).read_text(encoding="utf-8").replace("@DIR@", str(directory)),
    }


def check(directory: Path, *, force: bool = False, run_command: str = "") -> list[str]:
    """The quickstart's files in `directory` that differ from its own (its changed files); QuickstartConflict if
    there are any and not `force`. A model folder that is not the quickstart's is refused even so."""
    directory = directory.resolve()
    changed = [name for name, text in _shipped(directory).items()
               if (directory / name).exists() and _read(directory / name) != text]
    if changed and not force:
        raise QuickstartConflict(directory, changed, run_command or f"runner run {directory / JOB}")
    model_dir = directory / MODEL
    if not (model_dir / "config.json").exists() and model_dir.is_dir() and any(model_dir.iterdir()):
        raise PermanentError(f"{model_dir} holds files but no config.json, so it is not the quickstart's model; "
                             "move it away, or run the quickstart with --dir ANOTHER_FOLDER")
    return changed


def prepare(directory: Path, *, force: bool = False, run_command: str = "") -> Prepared:
    """Write the quickstart's base model, data and job file under `directory` where they are missing; reuse
    those already there (`check` first). With `force` a changed file is renamed to NAME.yours and the
    quickstart's written. Nothing else there is touched."""
    directory = directory.resolve()
    changed = check(directory, force=force, run_command=run_command)
    directory.mkdir(parents=True, exist_ok=True)
    files = _shipped(directory)
    done = Prepared(job=directory / JOB)
    for name, text in files.items():
        path = directory / name
        if name in changed:
            kept = _free(path.with_name(name + KEPT_SUFFIX))
            os.replace(path, kept)
            done.kept.append(kept)
        if path.exists():
            done.reused.append(name)
        else:
            _write_atomically(path, text)
            done.written.append(name)
    model_dir = directory / MODEL
    if (model_dir / "config.json").exists():
        done.reused.append(MODEL)
    else:
        _build_model(model_dir, files[DATA])
        done.written.append(MODEL)
    return done


def _free(path: Path) -> Path:
    """`path`, or PATH.1, PATH.2, ... : the first name not taken (a copy kept earlier is never replaced)."""
    n, free = 0, path
    while free.exists():
        n += 1
        free = path.with_name(f"{path.name}.{n}")
    return free


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _write_atomically(path: Path, text: str) -> None:
    part = path.with_name(path.name + ".partial")
    part.write_text(text, encoding="utf-8")
    os.replace(part, path)


def _build_model(model_dir: Path, data: str) -> None:
    """The tiny Llama, built beside its place and moved there whole (a stopped build never looks complete)."""
    from runner.quickstart.tiny import build_tiny_model

    part = model_dir.with_name(model_dir.name + ".partial")
    shutil.rmtree(part, ignore_errors=True)  # an earlier build stopped halfway: the quickstart's own files
    rows = [json.loads(line) for line in data.splitlines() if line.strip()]
    texts = [f"Q: What is the capital of {r['country']} ?\nA: {r['capital']}" for r in rows]
    # A wide init lets the frozen output head express confident answers once LoRA has learned them.
    build_tiny_model("llama", part, texts, init_std=0.2)
    if model_dir.exists():
        model_dir.rmdir()  # empty (check() refuses one holding files)
    os.replace(part, model_dir)
