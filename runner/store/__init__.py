"""Every place files live - local paths, S3 (and S3-compatible stores), the Hub, GCS - behind one interface.

    backend.py      the Backend interface and the registry: backend_for(loc) -> the Backend of loc's scheme;
                    store_call, the wrapper of every remote call (deadline, the store's errors as RunnerErrors)
    local.py        local paths and mounted volumes
    hub.py          the Hugging Face Hub (sources, and outputs published as one commit)
    objects.py      every bucket store's places (sources, outputs with staging and the manifest last,
                    checkpoints, the lease), written once over a few primitives each store provides
    s3.py, gcs.py   the object stores: their primitives and error mapping (s3_client.py: boto3's client,
                    errors and transfers)
    manifest.py     the manifest that marks a published output complete; the ownership rule
    checkpoints.py  durable checkpoints, complete-or-absent, on any Backend that can hold them
    lease.py        one writer per checkpoint location (the Backend's conditional writes)
    cache.py        the shared model cache, keyed by the Backend's revision of a source
    outputs.py      what a job may write and whether it is already done, before any download
    timeouts.py     the limits on every call to a remote store

    loc = Location.parse("s3://bucket/models/run-1")
    check_destination(loc)                  # before training: fail early on credentials and permissions
    publish(Path("out"), loc)               # all-or-nothing; complete once finetune-manifest.json exists
    is_complete(loc)

Every failure is a PermanentError or RetryableError (runner.api.errors) with reason DownloadFailed or
UploadFailed and a message that names what is wrong and what to set. boto3 and huggingface_hub are
imported only when a backend needs them, so `import runner.store` stays cheap.
"""
from __future__ import annotations

from pathlib import Path

from .backend import Backend, backend_for
from .checkpoints import CheckpointStore
from .manifest import MANIFEST_NAME
from runner.api.uris import Location

__all__ = [
    "MANIFEST_NAME",
    "Backend",
    "CheckpointStore",
    "Location",
    "backend_for",
    "check_destination",
    "check_source",
    "check_writable",
    "download",
    "is_complete",
    "list_names",
    "publish",
    "read_manifest",
]


def check_source(loc: Location, *, repo_type: str = "model") -> None:
    """Before downloading: the source exists and can be read with the credentials in the environment."""
    backend_for(loc).check_source(loc, repo_type=repo_type)


def list_names(loc: Location, *, repo_type: str = "model") -> list[str] | None:
    """The files of a remote source, relative to it; None for a local one, or the Hub when offline."""
    return backend_for(loc).list_names(loc, repo_type=repo_type)


def check_writable(loc: Location) -> None:
    """Before training: a checkpoint location can be written (what it holds is the job's own checkpoints)."""
    backend_for(loc).check_writable(loc)


def check_destination(loc: Location, job: dict | None = None) -> None:
    """Before training: the destination can be written with the credentials in the environment, and only if
    what it holds now is an earlier output of the same `job` ({"name", "spec"}) or nothing."""
    backend_for(loc).check_destination(loc, job)


def download(loc: Location, dest: Path, *, repo_type: str = "model", allow_patterns: list[str] | None = None) -> Path:
    """Fetch the files into the directory `dest`; returns where they are. A local source is used in place
    (no copy); a single object lands as dest/<its name> and that file's path is returned."""
    return backend_for(loc).download(loc, Path(dest), repo_type=repo_type, allow_patterns=allow_patterns)


def publish(local_dir: Path, loc: Location, *, private: bool = True,
            commit_message: str = "Upload fine-tuned model", job: dict | None = None) -> str:
    """Publish a finished output folder all-or-nothing (manifest last, or one Hub commit); the manifest
    records `job` ({"name", "spec"}). Returns the published URI (an https URL for the Hub)."""
    from runner.api.errors import UPLOAD_FAILED, PermanentError

    if not Path(local_dir).is_dir():
        raise PermanentError(f"nothing to publish: {local_dir} is not a directory", reason=UPLOAD_FAILED)
    return backend_for(loc).publish(Path(local_dir), loc, private=private, commit_message=commit_message, job=job)


def read_manifest(loc: Location) -> dict | None:
    """The manifest of the output published there (None: none)."""
    return backend_for(loc).read_manifest(loc)


def is_complete(loc: Location) -> bool:
    """Whether a complete output is published there (its finetune-manifest.json exists)."""
    return backend_for(loc).is_complete(loc)
