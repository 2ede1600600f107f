"""Durable training checkpoints on any store that can hold them (runner.api.uris says which; the Hub cannot),
built from the Backend's file primitives.

A checkpoint is complete-or-absent: it counts only once its COMPLETE marker exists, and the marker is written
last (a re-save removes it first). Layout:

    <root>/checkpoint-40/<the Trainer's files>
    <root>/checkpoint-40/COMPLETE           {"name": ..., "files": [{"path", "size"}, ...]}
    <root>/job-fingerprint.json             small metadata files (read_text / write_text)
    <root>/LEASE                            the writer's lease (runner/store/lease.py)
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path, PurePosixPath

from runner.api.errors import DOWNLOAD_FAILED, INVALID_SPEC, UPLOAD_FAILED, PermanentError

from .backend import backend_for
from .manifest import iter_files
from runner.api.uris import Location

MARKER = "COMPLETE"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.]*-(\d+)$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_LEFTOVER = (".tmp-", ".old-")  # folders a local save of an earlier runner left when it was killed


def step_of(name: str) -> int | None:
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def _sorted(names) -> list[str]:
    return sorted(names, key=lambda n: (step_of(n), n))


def _marker(name: str, files: list[tuple[str, Path]]) -> str:
    entries = [{"path": rel, "size": path.stat().st_size} for rel, path in files]
    return json.dumps({"name": name, "files": entries}, indent=1) + "\n"


class CheckpointStore:
    def __init__(self, loc: Location):
        self.backend = backend_for(loc)
        if not self.backend.can_hold_checkpoints:
            raise PermanentError(f"output.checkpoints: {loc} cannot hold checkpoints; set it to one of "
                                 f"{Location.checkpoint_schemes()} (a persistent volume)", reason=INVALID_SPEC)
        self.loc = loc
        self.uri = str(loc)

    def __repr__(self) -> str:
        return f"CheckpointStore({self.uri!r})"

    # ------------------------------------------------------------------------------------ public
    def list_complete(self) -> list[str]:
        """Names of the complete checkpoints ("checkpoint-40", ...), oldest step first."""
        return _sorted(self._state()[0])

    def save(self, local_ckpt_dir: Path) -> str:
        """Copy a local checkpoint directory into the store, complete-or-absent. Returns its name."""
        src = Path(local_ckpt_dir)
        name = src.name
        if step_of(name) is None:
            raise ValueError(f"checkpoint directory name {name!r} must look like 'checkpoint-<step>'")
        if not src.is_dir():
            raise PermanentError(f"cannot save checkpoint: {src} is not a directory", reason=UPLOAD_FAILED)
        files = [(rel, p) for rel, p in iter_files(src) if rel != MARKER]
        b, loc = self.backend, self.loc
        b.delete_files(loc, [f"{name}/{MARKER}"])  # a re-save is incomplete until it is done
        before = self._state()[1].get(name, [])
        b.put_files(loc, [(path, f"{name}/{rel}") for rel, path in files])
        wanted = {f"{name}/{rel}" for rel, _ in files}
        b.delete_files(loc, [r for r in before if r not in wanted])
        b.write_text(loc, f"{name}/{MARKER}", _marker(name, files))
        return name

    def fetch(self, name: str, dest_parent: Path) -> Path:
        """Download a complete checkpoint to dest_parent/name and return that path."""
        dest_parent = Path(dest_parent)
        dest, tmp = dest_parent / name, dest_parent / f".tmp-{name}"
        complete, files = self._state()
        if name not in complete:
            raise PermanentError(f"checkpoint {name} is not complete in {self.uri}: it cannot be resumed from",
                                 reason=DOWNLOAD_FAILED)
        here = self.backend.local_path(self.loc)
        if here is not None and (here / name).resolve() == dest.resolve():
            return dest
        rels = self._listed(name) or [r.partition("/")[2] for r in files[name] if r != f"{name}/{MARKER}"]
        try:
            dest_parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            self.backend.get_files(self.loc, [(f"{name}/{rel}", tmp / rel) for rel in rels])
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
        complete, files = self._state()
        ordered = _sorted(complete)
        doomed = ordered[: len(ordered) - keep] if keep else ordered
        newest = step_of(ordered[-1]) if ordered else None
        stale = [n for n in files if n not in complete and newest is not None and _step(n) < newest]
        self.backend.delete_files(self.loc, [f"{n}/{MARKER}" for n in doomed])  # incomplete first, then gone
        self.backend.delete_files(self.loc, [r for n in doomed + stale for r in files[n]
                                             if r != f"{n}/{MARKER}"])

    def read_text(self, name: str) -> str | None:
        _check_file_name(name)
        return self.backend.read_text(self.loc, name)

    def write_text(self, name: str, text: str) -> None:
        _check_file_name(name)
        self.backend.write_text(self.loc, name, text)

    # ------------------------------------------------------------------------------------ helpers
    def _state(self) -> tuple[set[str], dict[str, list[str]]]:
        """(complete names, every checkpoint-like folder -> the relative paths of its files)."""
        files: dict[str, list[str]] = {}
        complete: set[str] = set()
        for rel in self.backend.list_files(self.loc):
            name, sep, rest = rel.partition("/")
            if not sep or _step(name) is None:
                continue
            files.setdefault(name, []).append(rel)
            if rest == MARKER and step_of(name) is not None:
                complete.add(name)
        return complete, files

    def _listed(self, name: str) -> list[str]:
        """The files the checkpoint's marker lists ([] for a marker from elsewhere without a list)."""
        try:
            rels = [f["path"] for f in json.loads(self.backend.read_text(self.loc, f"{name}/{MARKER}") or "{}")
                    .get("files", [])]
        except (ValueError, AttributeError, KeyError, TypeError):
            return []
        for rel in rels:
            if not isinstance(rel, str) or rel.startswith("/") or any(p in ("", ".", "..")
                                                                      for p in PurePosixPath(rel).parts):
                raise PermanentError(f"checkpoint {name} in {self.uri} lists a file outside it ({rel!r}): it "
                                     "cannot be resumed from", reason=DOWNLOAD_FAILED)
        return rels


def _step(name: str) -> int | None:
    """The step of a checkpoint folder, or of one a killed save left (".tmp-checkpoint-40")."""
    for prefix in _LEFTOVER:
        name = name.removeprefix(prefix)
    return step_of(name)


def _check_file_name(name: str) -> None:
    if not _FILE_NAME.match(name) or name == MARKER:
        raise ValueError(f"invalid metadata file name {name!r}: use a plain file name such as 'job-fingerprint.json'")
