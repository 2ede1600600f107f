"""An output under an S3 prefix: who may replace what is there, and publishing it without losing anything.

The runner never deletes or overwrites a key it did not write. A destination prefix may be replaced only when
it holds nothing, or a previous output of the same job (its finetune-manifest.json, or the marker of a publish
that was cut short, names the job and lists every key there). Keys of the runner's own besides those: the
manifest, the marker `finetune-publishing.json`, and `.finetune-staging/<tag>/...`.

Publishing, when a complete earlier output is there: the new files go to `.finetune-staging/<tag>/` first, so
the earlier output stays complete until the new one is; then the marker (every key about to change), the old
manifest is removed, the staged files are copied into place (server-side), keys only the old output had are
removed, the new manifest is written last, and the marker and staging keys go. With no complete output there,
the files are uploaded in place between the marker and the manifest.
"""
from __future__ import annotations

import uuid
from pathlib import Path

from runner.api.errors import DOWNLOAD_FAILED, INVALID_SPEC, UPLOAD_FAILED, PermanentError

from . import s3_client as s3
from .manifest import (
    MANIFEST_FORMAT, MANIFEST_NAME, build_manifest, iter_files, listed, manifest_bytes, ownership_problem,
    parse_manifest,
)
from runner.api.uris import Location

MARKER = "finetune-publishing.json"
STAGING = ".finetune-staging"
PROBE = ".finetune-write-probe-"
FIX = ("set output.destination to a new or empty prefix (or move those objects away yourself: the runner never "
       "deletes them)")


def _base(loc: Location) -> str:
    return f"{loc.path}/" if loc.path else ""


def ours(rel: str) -> bool:
    return rel in (MANIFEST_NAME, MARKER) or rel.startswith((STAGING + "/", PROBE))


def _state(c, loc: Location) -> tuple[list[str], dict | None, dict | None]:
    """(every key under the prefix, relative; the manifest; the marker of an unfinished publish)."""
    base = _base(loc)
    rels = [key[len(base):] for key, _ in s3.list_objects(c, loc.bucket, loc.path)]
    manifest = parse_manifest(s3.get_bytes(c, loc.bucket, base + MANIFEST_NAME)) if MANIFEST_NAME in rels else None
    marker = parse_manifest(s3.get_bytes(c, loc.bucket, base + MARKER)) if MARKER in rels else None
    return rels, manifest, marker


def _problem(loc: Location, rels: list[str], manifest, marker, job: dict | None) -> str | None:
    return ownership_problem(f"output.destination: {loc}", rels, [manifest, marker], job, FIX, ours=ours)


def check_destination(loc: Location, job: dict | None = None, *, output: bool = True) -> None:
    """Before training: credentials and permissions (a probe object written and removed), and, for an output
    (not a checkpoint location, which holds the job's own earlier checkpoints), that what the prefix holds may
    be replaced by this job."""
    uri = str(loc)
    s3.require_credentials("write to", uri, UPLOAD_FAILED)
    with s3.errors("write to", uri, loc.bucket, UPLOAD_FAILED):
        c = s3.client()
        c.head_bucket(Bucket=loc.bucket)
        problem = _problem(loc, *_state(c, loc), job) if output else None
        if problem:
            raise PermanentError(problem, reason=INVALID_SPEC)
        probe = f"{_base(loc)}{PROBE}{uuid.uuid4().hex[:12]}"
        c.put_object(Bucket=loc.bucket, Key=probe, Body=b"probe")
        c.delete_object(Bucket=loc.bucket, Key=probe)


def publish(local_dir: Path, loc: Location, job: dict | None = None) -> str:
    uri = str(loc)
    files = iter_files(Path(local_dir))
    manifest = build_manifest(files, job)
    base, bucket = _base(loc), loc.bucket
    with s3.errors("upload to", uri, bucket, UPLOAD_FAILED):
        c = s3.client()
        rels, old, marker = _state(c, loc)
        problem = _problem(loc, rels, old, marker, job)
        if problem:
            raise PermanentError(problem, reason=INVALID_SPEC)
        new = {rel for rel, _ in files}
        previous = listed(old, marker)
        mark = {"format": MANIFEST_FORMAT, "publishing": True, "job": dict(job or {}),
                "files": [{"path": p} for p in sorted(previous | new)]}
        if old is not None:  # a complete earlier output: it stays complete until the new one is
            staged = f"{base}{STAGING}/{uuid.uuid4().hex[:12]}/"
            s3.upload_files(c, bucket, [(path, staged + rel) for rel, path in files])
            c.put_object(Bucket=bucket, Key=base + MARKER, Body=manifest_bytes(mark))
            c.delete_object(Bucket=bucket, Key=base + MANIFEST_NAME)
            copy_keys(c, bucket, [(staged + rel, base + rel) for rel, _ in files])
        else:
            c.put_object(Bucket=bucket, Key=base + MARKER, Body=manifest_bytes(mark))
            s3.upload_files(c, bucket, [(path, base + rel) for rel, path in files])
        s3.delete_keys(c, bucket, [base + p for p in sorted(previous - new)])
        c.put_object(Bucket=bucket, Key=base + MANIFEST_NAME, Body=manifest_bytes(manifest),
                     ContentType="application/json")
        c.delete_object(Bucket=bucket, Key=base + MARKER)
        s3.delete_keys(c, bucket, [k for k, _ in s3.list_objects(c, bucket, base + STAGING)])
    return uri


def copy_keys(c, bucket: str, pairs: list[tuple[str, str]]) -> None:
    """Server-side copies (multipart above the threshold), concurrently; raises on the first failure."""
    from boto3.s3.transfer import create_transfer_manager

    with create_transfer_manager(c, s3.transfer_config()) as manager:
        futures = [manager.copy({"Bucket": bucket, "Key": src}, bucket, dst) for src, dst in pairs]
        for fut in futures:
            fut.result()


def read_manifest(loc: Location) -> dict | None:
    with s3.errors("read", str(loc), loc.bucket, DOWNLOAD_FAILED):
        return parse_manifest(s3.get_bytes(s3.client(), loc.bucket, _base(loc) + MANIFEST_NAME))


def is_complete(loc: Location) -> bool:
    with s3.errors("read", str(loc), loc.bucket, DOWNLOAD_FAILED):
        return s3.exists(s3.client(), loc.bucket, _base(loc) + MANIFEST_NAME)
