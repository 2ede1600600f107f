"""Where a job may write, and whether anything is left to do - answered before any download.

    identity(job)            {"name", "spec"}: what a published manifest records about the job that wrote it
    local_problems(job)      what this machine can tell without downloading: a local model or data path that does not exist (or a model folder without
                             config, weights or tokenizer), a destination that overlaps a source or the
                             checkpoints, a local destination holding files the runner did not write
    remote_model_problem(spec)  a model.source on S3 or the Hub without config, weights or tokenizer
    already_complete(job)    the result of an earlier run of this same job whose output is published complete
                             (its manifest names this job and spec, every file it lists is there); else None
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from pathlib import Path

import runner.store as storage
from runner.api.errors import RunnerError
from runner.api.spec import ClusterFields, FineTuneJobSpec, Job
from runner.api.uris import Location
from runner.store import local
from runner.store.manifest import job_of

_MODEL_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")
_SUMMARY = ("train_loss", "eval_loss", "global_step", "num_input_tokens_seen", "train_runtime")


def checkpoint_location(spec: FineTuneJobSpec) -> Location:
    """`output.checkpoints`, or a sibling of the destination: `<destination>.checkpoints`."""
    if spec.output.checkpoints:
        return Location.parse(spec.output.checkpoints)
    dest = spec.output.destination.rstrip("/")
    return Location.parse(dest + ".checkpoints")


def identity(job: Job) -> dict:
    """The job's name and a fingerprint of everything in its spec that shapes the output (the cluster-only
    fields - resources, scheduling, credentials references - do not). Fields left at their defaults are left
    out, so that a runner with a new (defaulted) field still knows its earlier outputs."""
    doc = job.spec.model_dump(by_alias=True, mode="json", exclude_defaults=True,
                              exclude=set(ClusterFields.model_fields))
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return {"name": job.name, "spec": digest}


# --------------------------------------------------------------------------------------- checks
def _sources(spec: FineTuneJobSpec) -> list[tuple[str, str]]:
    out = [("model.source", spec.model.source), ("dataset.source", spec.dataset.source)]
    if spec.dataset.eval_source:
        out.append(("dataset.evalSource", spec.dataset.eval_source))
    return out


def _missing_source(field: str, loc: Location) -> str | None:
    path = Path(loc.path)
    if not path.exists():
        return (f"{field}: local path {path} does not exist (relative paths are read from {os.getcwd()}); fix the "
                "path, or mount the volume that holds it")
    if field != "model.source":
        return None
    if not path.is_dir():
        return f"{field}: {path} is a file; give the model's folder (config.json, weights and tokenizer)"
    return _not_a_model(field, path, [p.name for p in path.iterdir() if p.is_file()], "folder")


def _not_a_model(field: str, where, names: list[str], kind: str) -> str | None:
    """Why the files `names` (at the top of a model folder, S3 prefix or Hub repo) are not a model, or None."""
    lacks = [what for what, present in (
        ("config.json", "config.json" in names),
        ("weights (*.safetensors or *.bin)", any(fnmatch.fnmatch(n, p) for n in names for p in _MODEL_WEIGHTS)),
        ("a tokenizer (tokenizer.json, tokenizer.model, ...)", any(f in names for f in _TOKENIZER_FILES)),
    ) if not present]
    if lacks:
        return (f"{field}: {where} is not a model {kind}: it has no {' and no '.join(lacks)}; give the {kind} "
                "that holds what save_pretrained wrote (config.json, weights and tokenizer together)")
    return None


def remote_model_problem(spec: FineTuneJobSpec) -> str | None:
    """A model.source on S3 or the Hub that is not a model (asked of the store: its file list), or None. Called
    after storage.check_source, so the source exists and is readable."""
    loc = Location.parse(spec.model.source)
    names = storage.list_names(loc, repo_type="model")
    if names is None:  # local (checked by local_problems), or the Hub offline
        return None
    if loc.scheme == "s3" and not names:
        return (f"model.source: {loc} is a single object, not a model; give the prefix (folder) that holds "
                "config.json, the weights and the tokenizer")
    top = [n for n in names if "/" not in n]
    return _not_a_model("model.source", loc, top, "prefix" if loc.scheme == "s3" else "repo")


def _overlaps(a: Location, b: Location) -> bool:
    if a.scheme != b.scheme:
        return False
    if a.scheme == "local":
        x, y = Path(os.path.realpath(a.path)), Path(os.path.realpath(b.path))
        return x == y or x.is_relative_to(y) or y.is_relative_to(x)
    if a.scheme == "s3":
        p, q = a.path, b.path
        return a.bucket == b.bucket and (not p or not q or p == q or p.startswith(q + "/") or q.startswith(p + "/"))
    return a.path == b.path and (a.repo_type or "model") == (b.repo_type or "model")


def _relation(dest: Location, other: Location) -> str:
    if dest.scheme == "local":
        x, y = Path(os.path.realpath(dest.path)), Path(os.path.realpath(other.path))
        return "is" if x == y else "is inside" if x.is_relative_to(y) else "contains"
    return "overlaps"


def overlap_problems(spec: FineTuneJobSpec) -> list[str]:
    """A destination (replaced whole when publishing) or checkpoint location (pruned) that is, is inside,
    or contains a source or the other one."""
    dest = Location.parse(spec.output.destination)
    ckpt = checkpoint_location(spec)
    problems = []
    for field, value in _sources(spec) + [("output.checkpoints", str(ckpt))]:
        other = Location.parse(value)
        if dest.scheme == "hf" and field != "model.source":
            continue
        if _overlaps(dest, other):
            problems.append(
                f"output.destination: {dest} {_relation(dest, other)} {field} ({other}); publishing replaces "
                f"the destination's contents, so it must be a place of its own: set output.destination to a "
                "new directory (or prefix) outside the data, the model and the checkpoints")
    for field, value in _sources(spec):
        other = Location.parse(value)
        if other.scheme != "hf" and _overlaps(ckpt, other):
            problems.append(
                f"output.checkpoints: {ckpt} {_relation(ckpt, other)} {field} ({other}); checkpoints are "
                "written and pruned there: set output.checkpoints to a directory (or prefix) of its own")
    return problems


def local_problems(job: Job) -> list[str]:
    """Every problem the local paths of a job show before any download (empty: none), each naming its field."""
    spec = job.spec
    problems: list[str] = []
    for field, value in _sources(spec):
        loc = Location.parse(value)
        if loc.scheme == "local":
            problem = _missing_source(field, loc)
            if problem:
                problems.append(problem)
    problems += overlap_problems(spec)
    dest = Location.parse(spec.output.destination)
    if dest.scheme == "local" and not problems:
        problem = local.ownership_problem(Path(dest.path), identity(job))
        if problem:
            problems.append(problem)
    return problems


# ----------------------------------------------------------------------------------- re-running
def already_complete(job: Job) -> dict | None:
    """The result to report when this same job (name and spec) has already published a complete output, or
    None. Every file its manifest lists must be there with its size (local), or the manifest (S3)."""
    loc = Location.parse(job.spec.output.destination)
    try:
        manifest = storage.read_manifest(loc)
    except RunnerError:
        return None  # unreachable: Validating says why
    if manifest is None or job_of(manifest) != identity(job):
        return None
    metrics: dict = {}
    if loc.scheme == "local":
        root = Path(loc.path)
        for f in manifest["files"]:
            p = root / f["path"]
            if not p.is_file() or p.stat().st_size != f.get("size"):
                return None
        try:
            recorded = json.loads((root / "report" / "metrics.json").read_text())
            metrics = {k: recorded[k] for k in _SUMMARY if k in recorded}
        except (OSError, ValueError, TypeError):
            pass
    return {"output": str(loc), "alreadyComplete": True, "metrics": metrics,
            "message": f"already complete: {loc} holds this job's output (published {manifest.get('created')}); "
                       "nothing was changed"}
