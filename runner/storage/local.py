"""Local files: sources are used in place; outputs are built beside the destination and renamed into it."""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

from runner.api.errors import DOWNLOAD_FAILED, UPLOAD_FAILED, PermanentError

from .manifest import MANIFEST_NAME, build_manifest, iter_files, manifest_bytes
from runner.api.uris import Location


def check_source(loc: Location) -> None:
    path = Path(loc.path)
    if not path.exists():
        raise PermanentError(
            f"local path {path} does not exist: fix the path, or mount the volume that holds it",
            reason=DOWNLOAD_FAILED,
        )
    if not os.access(path, os.R_OK):
        raise PermanentError(f"local path {path} is not readable: fix its permissions", reason=DOWNLOAD_FAILED)


def check_destination(loc: Location) -> None:
    path = Path(loc.path)
    if path.exists() and not path.is_dir():
        raise PermanentError(
            f"output destination {path} exists and is a file: point the destination at a directory",
            reason=UPLOAD_FAILED,
        )
    parent = nearest_existing(path.parent)
    if not parent.is_dir():
        raise PermanentError(f"cannot create {path}: {parent} is not a directory", reason=UPLOAD_FAILED)
    try:
        fd, probe = tempfile.mkstemp(prefix=".finetune-write-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermanentError(
            f"cannot write under {parent} (for output {path}): {e.strerror or e}; "
            "mount a writable volume there or pick another destination",
            reason=UPLOAD_FAILED,
        ) from e


def nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def download(loc: Location) -> Path:
    check_source(loc)
    return Path(loc.path)


def publish(local_dir: Path, loc: Location) -> str:
    """Link or copy `local_dir` to a hidden sibling of the destination, add the manifest, then rename it
    into place."""
    dest = Path(os.path.abspath(loc.path))
    src = Path(os.path.abspath(local_dir))
    try:
        if dest == src:  # the output was written in place: only the manifest is missing
            write_atomic(dest / MANIFEST_NAME, manifest_bytes(build_manifest(iter_files(src))))
            return str(dest)
        if dest.is_relative_to(src) or src.is_relative_to(dest):
            raise PermanentError(
                f"output destination {dest} and the folder to publish {src} contain one another: "
                "pick a destination outside the work directory",
                reason=UPLOAD_FAILED,
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4().hex[:8]
        tmp = dest.parent / f".tmp-{dest.name}-{tag}"
        old = dest.parent / f".old-{dest.name}-{tag}"
        try:
            files = iter_files(src)
            for rel, path in files:
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(path, target)
            (tmp / MANIFEST_NAME).write_bytes(manifest_bytes(build_manifest(files)))
            if dest.exists():
                os.rename(dest, old)  # an existing complete output is moved away only now
            os.rename(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
        _remove_leftovers(dest)
        return str(dest)
    except OSError as e:
        raise PermanentError(
            f"could not publish to {dest}: {e.strerror or e}; check free space and permissions there",
            reason=UPLOAD_FAILED,
        ) from e


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where both sides share a filesystem (a 16 GB model publishes instantly), else a copy.
    The staged files are never modified after publishing, so sharing their inodes is safe."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _remove_leftovers(dest: Path) -> None:
    """Temp and old copies left by a publish that was killed half-way."""
    for prefix in (".tmp-", ".old-"):
        for p in dest.parent.glob(f"{prefix}{dest.name}-*"):
            if p.is_dir() and len(p.name) == len(prefix) + len(dest.name) + 9:
                shutil.rmtree(p, ignore_errors=True)


def is_complete(loc: Location) -> bool:
    return (Path(loc.path) / MANIFEST_NAME).is_file()


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


