"""Durable training checkpoints in a local directory or under an S3 prefix (never on the Hub).

A checkpoint is complete-or-absent: it counts only once its COMPLETE marker exists, and the marker is
written last (locally the whole directory is also renamed into place from ".tmp-<name>"). Layout:

    <root>/checkpoint-40/<the Trainer's files>
    <root>/checkpoint-40/COMPLETE           {"name": ..., "files": [{"path", "size"}, ...]}
    <root>/job-fingerprint.json             small metadata files (read_text / write_text)
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from runner.api.errors import DOWNLOAD_FAILED, INVALID_SPEC, UPLOAD_FAILED, PermanentError

from . import s3
from .local import write_atomic
from .manifest import iter_files
from runner.api.uris import Location

MARKER = "COMPLETE"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.]*-(\d+)$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def step_of(name: str) -> int | None:
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def _sorted(names) -> list[str]:
    return sorted(names, key=lambda n: (step_of(n), n))


def _marker(name: str, files: list[tuple[str, Path]]) -> bytes:
    entries = [{"path": rel, "size": path.stat().st_size} for rel, path in files]
    return (json.dumps({"name": name, "files": entries}, indent=1) + "\n").encode()


class CheckpointStore:
    def __init__(self, loc: Location):
        if loc.scheme == "hf":
            raise PermanentError(
                f"checkpoints cannot be kept on the Hub ({loc}): set output.checkpoints to an s3:// prefix or a "
                "local path on a persistent volume",
                reason=INVALID_SPEC,
            )
        self.loc = loc
        self.uri = str(loc)

    def __repr__(self) -> str:
        return f"CheckpointStore({self.uri!r})"

    # ------------------------------------------------------------------------------------ public
    def list_complete(self) -> list[str]:
        """Names of the complete checkpoints ("checkpoint-40", ...), oldest step first."""
        if self.loc.scheme == "s3":
            return _sorted(self._s3_state()[0])
        root = Path(self.loc.path)
        if not root.is_dir():
            return []
        return _sorted(d.name for d in root.iterdir()
                       if step_of(d.name) is not None and d.is_dir() and (d / MARKER).is_file())

    def save(self, local_ckpt_dir: Path) -> str:
        """Copy a local checkpoint directory into the store, complete-or-absent. Returns its name."""
        src = Path(local_ckpt_dir)
        name = src.name
        if step_of(name) is None:
            raise ValueError(f"checkpoint directory name {name!r} must look like 'checkpoint-<step>'")
        if not src.is_dir():
            raise PermanentError(f"cannot save checkpoint: {src} is not a directory", reason=UPLOAD_FAILED)
        files = [(rel, p) for rel, p in iter_files(src) if rel != MARKER]
        if self.loc.scheme == "s3":
            self._s3_save(name, files)
        else:
            self._local_save(name, files)
        return name

    def fetch(self, name: str, dest_parent: Path) -> Path:
        """Download a complete checkpoint to dest_parent/name and return that path."""
        dest_parent = Path(dest_parent)
        dest = dest_parent / name
        tmp = dest_parent / f".tmp-{name}"
        if name not in self.list_complete():
            raise PermanentError(f"checkpoint {name} is not complete in {self.uri}: it cannot be resumed from",
                                 reason=DOWNLOAD_FAILED)
        try:
            dest_parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            if self.loc.scheme == "s3":
                self._s3_fetch(name, tmp)
            else:
                src = Path(self.loc.path) / name
                if src.resolve() == dest.resolve():
                    return dest
                shutil.copytree(src, tmp, ignore=lambda d, names: [MARKER] if Path(d) == src else [])
            if dest.exists():
                shutil.rmtree(dest)
            os.rename(tmp, dest)
        except OSError as e:
            raise PermanentError(f"cannot fetch checkpoint {name} into {dest_parent}: {e.strerror or e}; "
                                 "check free space and permissions", reason=DOWNLOAD_FAILED) from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def prune(self, keep: int) -> None:
        """Delete all but the newest `keep` complete checkpoints, and incomplete leftovers older than the
        newest complete one (a newer incomplete one may be a save in progress and is left alone)."""
        if keep < 0:
            raise ValueError("keep must be >= 0")
        if self.loc.scheme == "s3":
            self._s3_prune(keep)
        else:
            self._local_prune(keep)

    def read_text(self, name: str) -> str | None:
        _check_file_name(name)
        if self.loc.scheme == "s3":
            with s3.errors("read", f"{self.uri}/{name}", self.loc.bucket, DOWNLOAD_FAILED):
                data = s3.get_bytes(s3.client(), self.loc.bucket, self._key(name))
            return None if data is None else data.decode("utf-8")
        path = Path(self.loc.path) / name
        return path.read_text(encoding="utf-8") if path.is_file() else None

    def write_text(self, name: str, text: str) -> None:
        _check_file_name(name)
        if self.loc.scheme == "s3":
            with s3.errors("write", f"{self.uri}/{name}", self.loc.bucket, UPLOAD_FAILED):
                s3.client().put_object(Bucket=self.loc.bucket, Key=self._key(name), Body=text.encode("utf-8"))
            return
        root = Path(self.loc.path)
        try:
            root.mkdir(parents=True, exist_ok=True)
            write_atomic(root / name, text.encode("utf-8"))
        except OSError as e:
            raise PermanentError(f"cannot write {root / name}: {e.strerror or e}; check the checkpoint volume",
                                 reason=UPLOAD_FAILED) from e

    # ------------------------------------------------------------------------------------ local
    def _local_save(self, name: str, files: list[tuple[str, Path]]) -> None:
        root = Path(self.loc.path)
        final, tmp, old = root / name, root / f".tmp-{name}", root / f".old-{name}"
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            for rel, path in files:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, tmp / rel)
            tmp.mkdir(parents=True, exist_ok=True)
            (tmp / MARKER).write_bytes(_marker(name, files))
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.rename(final, old)
            os.rename(tmp, final)
        except OSError as e:
            raise PermanentError(f"cannot save checkpoint {name} to {root}: {e.strerror or e}; "
                                 "check free space and permissions of the checkpoint volume",
                                 reason=UPLOAD_FAILED) from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)

    def _local_prune(self, keep: int) -> None:
        root = Path(self.loc.path)
        if not root.is_dir():
            return
        complete = self.list_complete()
        doomed = complete[: len(complete) - keep] if keep else complete
        newest = step_of(complete[-1]) if complete else None
        for d in root.iterdir():
            if not d.is_dir() or d.name in complete:
                continue
            base = d.name.removeprefix(".tmp-").removeprefix(".old-")
            step = step_of(base)
            if step is not None and newest is not None and step < newest:
                shutil.rmtree(d, ignore_errors=True)
        for name in doomed:
            (root / name / MARKER).unlink(missing_ok=True)  # incomplete first, then gone
            shutil.rmtree(root / name, ignore_errors=True)

    # ------------------------------------------------------------------------------------ s3
    def _key(self, rel: str) -> str:
        return f"{self.loc.path}/{rel}" if self.loc.path else rel

    def _s3_state(self) -> tuple[set[str], dict[str, list[str]]]:
        """(complete names, every checkpoint-like name -> its keys)."""
        with s3.errors("list checkpoints in", self.uri, self.loc.bucket, DOWNLOAD_FAILED):
            objects = s3.list_objects(s3.client(), self.loc.bucket, self.loc.path)
        base = self._key("")
        keys: dict[str, list[str]] = {}
        complete: set[str] = set()
        for key, _ in objects:
            name, sep, rest = key[len(base):].partition("/")
            if not sep or step_of(name) is None:
                continue
            keys.setdefault(name, []).append(key)
            if rest == MARKER:
                complete.add(name)
        return complete, keys

    def _s3_save(self, name: str, files: list[tuple[str, Path]]) -> None:
        bucket = self.loc.bucket
        with s3.errors(f"save checkpoint {name} to", self.uri, bucket, UPLOAD_FAILED):
            c = s3.client()
            marker_key = self._key(f"{name}/{MARKER}")
            c.delete_object(Bucket=bucket, Key=marker_key)  # a re-save is incomplete until it is done
            before = [k for k, _ in s3.list_objects(c, bucket, self._key(name))]
            s3.upload_files(c, bucket, [(path, self._key(f"{name}/{rel}")) for rel, path in files])
            wanted = {self._key(f"{name}/{rel}") for rel, _ in files} | {marker_key}
            s3.delete_keys(c, bucket, [k for k in before if k not in wanted])
            c.put_object(Bucket=bucket, Key=marker_key, Body=_marker(name, files), ContentType="application/json")

    def _s3_fetch(self, name: str, tmp: Path) -> None:
        bucket = self.loc.bucket
        with s3.errors(f"fetch checkpoint {name} from", self.uri, bucket, DOWNLOAD_FAILED):
            c = s3.client()
            marker = s3.get_bytes(c, bucket, self._key(f"{name}/{MARKER}"))
            try:
                rels = [f["path"] for f in json.loads(marker or b"{}").get("files", [])]
            except (ValueError, AttributeError, KeyError, TypeError):
                rels = []
            if not rels:  # a marker from elsewhere without a file list: take what is there
                prefix = self._key(name)
                rels = [s3.safe_relative(k, prefix) for k, _ in s3.list_objects(c, bucket, prefix)]
                rels = [r for r in rels if r != MARKER]
            for rel in rels:
                s3.safe_relative(f"x/{rel}", "x")
            tmp.mkdir(parents=True, exist_ok=True)
            s3.download_objects(c, bucket, [(self._key(f"{name}/{rel}"), tmp / rel) for rel in rels])

    def _s3_prune(self, keep: int) -> None:
        complete, keys = self._s3_state()
        ordered = _sorted(complete)
        doomed = ordered[: len(ordered) - keep] if keep else ordered
        newest = step_of(ordered[-1]) if ordered else None
        stale = [n for n in keys if n not in complete and newest is not None and step_of(n) < newest]
        bucket = self.loc.bucket
        with s3.errors("prune checkpoints in", self.uri, bucket, UPLOAD_FAILED):
            c = s3.client()
            s3.delete_keys(c, bucket, [self._key(f"{n}/{MARKER}") for n in doomed])  # incomplete first
            s3.delete_keys(c, bucket, [k for n in doomed + stale for k in keys.get(n, [])
                                       if not k.endswith(f"/{MARKER}")])


def _check_file_name(name: str) -> None:
    if not _FILE_NAME.match(name) or name == MARKER:
        raise ValueError(f"invalid metadata file name {name!r}: use a plain file name such as 'job-fingerprint.json'")
