"""Where a job may write, and whether anything is left to do - answered before any download, from the job's
places (job.places, parsed once) and the Backends of their stores.

    identity(job)            {"name", "spec"}: what a published manifest records about the job that wrote it
    local_problems(job)      what this machine can tell without downloading: a local model or data path that does
                             not exist (or a model folder without config, weights or tokenizer, or with a
                             file that is a device, a FIFO or an outsized JSON file), a destination
                             that overlaps a source or the checkpoints, a local destination holding files the
                             runner did not write
    remote_model_problem(job)  a remote model.source without config, weights or tokenizer
    already_complete(job)    the result of an earlier run of this same job whose output is published complete
                             (its manifest names this job and spec, every file it lists is there); else None
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import stat
from pathlib import Path

from runner.api.errors import RunnerError
from runner.api.places import FIELDS
from runner.api.cluster import ClusterFields
from runner.api.spec import Job
from runner.api.uris import Location

from . import local
from .backend import backend_for
from .manifest import job_of

ALREADY_COMPLETE = "alreadyComplete"  # a result field: the output was already there, nothing was run or changed

_MODEL_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")
JSON_MAX_BYTES = 256 << 20  # config.json, tokenizer.json, ...: the largest real ones are tens of MiB
_KINDS = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFIFO: "a FIFO",
          stat.S_IFSOCK: "a socket"}
_SUMMARY = ("train_loss", "eval_loss", "global_step", "num_input_tokens_seen", "train_runtime")
METRICS_FILE = "report/metrics.json"  # in a published output (runner/report writes it)


def identity(job: Job) -> dict:
    """The job's name and a fingerprint of everything in its spec that shapes the output (the cluster-only
    fields - resources, scheduling, credentials references - do not). Fields left at their defaults are left
    out, so that a runner with a new (defaulted) field still knows its earlier outputs."""
    doc = job.spec.model_dump(by_alias=True, mode="json", exclude_defaults=True,
                              exclude=set(ClusterFields.model_fields))
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return {"name": job.name, "spec": digest}


# --------------------------------------------------------------------------------------- checks
def _missing_source(field: str, path: Path) -> str | None:
    if not path.exists():
        return (f"{field}: local path {path} does not exist (relative paths are read from {os.getcwd()}); fix the "
                "path, or mount the volume that holds it")
    if field != FIELDS["model"]:
        return None
    if not path.is_dir():
        return f"{field}: {path} is a file; give the model's folder (config.json, weights and tokenizer)"
    return _odd_file(field, path) or _not_a_model(field, path, [p.name for p in path.iterdir() if p.is_file()],
                                                  "folder")


def _odd_file(field: str, folder: Path) -> str | None:
    """A file of a local model folder that loading would hang or exhaust memory on: not a regular file (a link
    to /dev/zero, a FIFO, a socket), or a JSON file (config, tokenizer) larger than any real one. Only stat()ed,
    never opened, so checking it cannot block."""
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        try:
            st = os.stat(entry.path)  # follows links: what reading the name would open
        except OSError:
            continue  # a dangling link: loading names the missing file itself
        if stat.S_ISDIR(st.st_mode):
            continue
        link = f" (a link to {os.readlink(entry.path)})" if entry.is_symlink() else ""
        if not stat.S_ISREG(st.st_mode):
            return (f"{field}: {entry.path}{link} is {_KINDS.get(stat.S_IFMT(st.st_mode), 'not a regular file')}, "
                    "not a file the model can be read from; put the real file in the model folder")
        if entry.name.endswith(".json") and st.st_size > JSON_MAX_BYTES:
            return (f"{field}: {entry.path}{link} holds {st.st_size} bytes, more than any model's JSON file "
                    f"({JSON_MAX_BYTES >> 20} MiB at most); put the real file in the model folder")
    return None


def _not_a_model(field: str, where, names: list[str], kind: str) -> str | None:
    """Why the files `names` (at the top of a model folder, prefix or repo) are not a model, or None."""
    lacks = [what for what, present in (
        ("config.json", "config.json" in names),
        ("weights (*.safetensors or *.bin)", any(fnmatch.fnmatch(n, p) for n in names for p in _MODEL_WEIGHTS)),
        ("a tokenizer (tokenizer.json, tokenizer.model, ...)", any(f in names for f in _TOKENIZER_FILES)),
    ) if not present]
    if lacks:
        return (f"{field}: {where} is not a model {kind}: it has no {' and no '.join(lacks)}; give the {kind} "
                "that holds what save_pretrained wrote (config.json, weights and tokenizer together)")
    return None


def remote_model_problem(job: Job) -> str | None:
    """A remote model.source that is not a model (asked of its store: its file list), or None. Called after the
    store's check_source, so the source exists and is readable."""
    loc = job.places.model
    backend = backend_for(loc)
    names = backend.list_names(loc)
    if names is None:  # local (checked by local_problems), or the Hub offline
        return None
    if not names:
        return (f"{FIELDS['model']}: {loc} is a single object, not a model; give the {backend.folder_word} that "
                "holds config.json, the weights and the tokenizer")
    top = [n for n in names if "/" not in n]
    return _not_a_model(FIELDS["model"], loc, top, backend.folder_word)


def _relation(place: Location, other: Location) -> str | None:
    return backend_for(place).relation(place, other)


def overlap_problems(job: Job) -> list[str]:
    """A destination (replaced whole when publishing) or checkpoint location (pruned) that is, is inside,
    or contains a source or the other one."""
    places = job.places
    dest, ckpt = places.destination, places.checkpoints
    problems = []
    for field, other in places.sources() + [(FIELDS["checkpoints"], ckpt)]:
        if relation := _relation(dest, other):
            problems.append(
                f"{FIELDS['destination']}: {dest} {relation} {field} ({other}); publishing replaces "
                f"the destination's contents, so it must be a place of its own: set output.destination to a "
                "new directory (or prefix) outside the data, the model and the checkpoints")
    for field, other in places.sources():
        if relation := _relation(ckpt, other):
            problems.append(
                f"{FIELDS['checkpoints']}: {ckpt} {relation} {field} ({other}); checkpoints are "
                "written and pruned there: set output.checkpoints to a directory (or prefix) of its own")
    return problems


def local_problems(job: Job) -> list[str]:
    """Every problem the local paths of a job show before any download (empty: none), each naming its field."""
    places = job.places
    problems: list[str] = []
    for field, loc in places.sources():
        path = backend_for(loc).local_path(loc)
        if path is not None and (problem := _missing_source(field, path)):
            problems.append(problem)
    problems += overlap_problems(job)
    dest = backend_for(places.destination).local_path(places.destination)
    if dest is not None and not problems and (problem := local.ownership_problem(dest, identity(job))):
        problems.append(problem)
    return problems


# ----------------------------------------------------------------------------------- re-running
def already_complete(job: Job) -> dict | None:
    """The result to report when this same job (name and spec) has already published a complete output, or
    None: its manifest names this job and spec, and the store finds the output complete."""
    loc = job.places.destination
    backend = backend_for(loc)
    try:
        manifest = backend.read_manifest(loc)
        if manifest is None or job_of(manifest) != identity(job) or not backend.is_complete(loc):
            return None
    except RunnerError:
        return None  # unreachable: Validating says why
    metrics: dict = {}
    try:
        recorded = json.loads(backend.read_text(loc, METRICS_FILE) or "{}")
        metrics = {k: recorded[k] for k in _SUMMARY if k in recorded}
    except (RunnerError, ValueError, TypeError):
        pass
    return {"output": str(loc), ALREADY_COMPLETE: True, "metrics": metrics,
            "message": f"already complete: {loc} holds this job's output (published {manifest.get('created')}); "
                       "nothing was changed"}
