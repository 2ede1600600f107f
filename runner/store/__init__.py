"""Reading inputs from and publishing outputs to the Hub, S3 (and S3-compatible stores) or local paths.

    loc = Location.parse("s3://bucket/models/run-1")
    check_destination(loc)                  # before training: fail early on credentials and permissions
    publish(Path("out"), loc)               # all-or-nothing; complete once finetune-manifest.json exists
    is_complete(loc)

Every failure is a PermanentError or RetryableError (runner.api.errors) with reason DownloadFailed or
UploadFailed and a message that names what is wrong and what to set. boto3 and huggingface_hub are
imported only when a function needs them, so `import runner.store` stays cheap.
"""
from __future__ import annotations

from pathlib import Path

from .checkpoints import CheckpointStore
from .manifest import MANIFEST_NAME
from runner.api.uris import Location

__all__ = [
    "MANIFEST_NAME",
    "CheckpointStore",
    "Location",
    "check_destination",
    "check_writable",
    "check_source",
    "download",
    "is_complete",
    "list_names",
    "publish",
    "read_manifest",
]


def check_source(loc: Location, *, repo_type: str = "model") -> None:
    """Before downloading: the source exists and can be read with the credentials in the environment."""
    if loc.scheme == "hf":
        from . import hub

        return hub.check_source(loc, repo_type)
    if loc.scheme == "s3":
        from . import s3

        return s3.check_source(loc)
    from . import local

    return local.check_source(loc)


def list_names(loc: Location, *, repo_type: str = "model") -> list[str] | None:
    """The files of a remote source, relative to it (S3: the keys under the prefix; the Hub: the repo's files at
    its revision); None for a local one, or the Hub when offline."""
    if loc.scheme == "hf":
        from . import hub

        return hub.list_names(loc, repo_type)
    if loc.scheme == "s3":
        from . import s3

        return s3.list_names(loc)
    return None


def check_writable(loc: Location) -> None:
    """Before training: an S3 checkpoint location can be written with the credentials in the environment (what
    it holds is the job's own checkpoints: resumed from, never refused)."""
    from . import s3_output

    s3_output.check_destination(loc, output=False)


def check_destination(loc: Location, job: dict | None = None) -> None:
    """Before training: the destination can be written with the credentials in the environment, and only if
    what it holds now is an earlier output of the same `job` ({"name", "spec"}) or nothing."""
    if loc.scheme == "hf":
        from . import hub

        return hub.check_destination(loc, job)
    if loc.scheme == "s3":
        from . import s3_output

        return s3_output.check_destination(loc, job)
    from . import local

    return local.check_destination(loc, job)


def download(loc: Location, dest: Path, *, repo_type: str = "model", allow_patterns: list[str] | None = None) -> Path:
    """Fetch the files into the directory `dest`; returns where they are. A local source is used in place
    (no copy); a single S3 object lands as dest/<its name> and that file's path is returned."""
    if loc.scheme == "hf":
        from . import hub

        return hub.download(loc, dest, repo_type, allow_patterns)
    if loc.scheme == "s3":
        from . import s3

        return s3.download(loc, dest, allow_patterns)
    from . import local

    return local.download(loc)


def publish(local_dir: Path, loc: Location, *, private: bool = True,
            commit_message: str = "Upload fine-tuned model", job: dict | None = None) -> str:
    """Publish a finished output folder all-or-nothing (manifest last, or one Hub commit); the manifest
    records `job` ({"name", "spec"}). Returns the published URI (an https URL for the Hub)."""
    from runner.api.errors import UPLOAD_FAILED, PermanentError

    if not Path(local_dir).is_dir():
        raise PermanentError(f"nothing to publish: {local_dir} is not a directory", reason=UPLOAD_FAILED)
    if loc.scheme == "hf":
        from . import hub

        return hub.publish(Path(local_dir), loc, private=private, commit_message=commit_message, job=job)
    if loc.scheme == "s3":
        from . import s3_output

        return s3_output.publish(Path(local_dir), loc, job=job)
    from . import local

    return local.publish(Path(local_dir), loc, job)


def read_manifest(loc: Location) -> dict | None:
    """The manifest of the output published there (None: none)."""
    if loc.scheme == "hf":
        from . import hub

        return hub.read_manifest(loc)
    if loc.scheme == "s3":
        from . import s3_output

        return s3_output.read_manifest(loc)
    from . import local

    return local.read_manifest(loc)


def is_complete(loc: Location) -> bool:
    """Whether a complete output is published there (its finetune-manifest.json exists)."""
    if loc.scheme == "hf":
        from . import hub

        return hub.is_complete(loc)
    if loc.scheme == "s3":
        from . import s3_output

        return s3_output.is_complete(loc)
    from . import local

    return local.is_complete(loc)
