"""Tokenized datasets kept where the next attempt and the next job find them, complete-or-absent.

An entry (runner/data/tokenized.py: Arrow files, then the marker tokenized.json listing them with their sizes) is
kept in two places:

    <output.checkpoints>/tokenized/<digest>/   this job's: a retry or resume on any node finds it there (the
                                               marker is uploaded last, so a cut upload is no entry)
    <model cache>/tokenized/<digest>/          the admin's cache volume (FINETUNE_MODEL_CACHE) when mounted:
                                               the next job on the same data and tokenizer; filled in a temp
                                               folder and renamed into place. Never from a job that runs the
                                               model's own code (model.trustRemoteCode), whose tokenizer could
                                               write anything under a key other jobs trust.

The digest covers the data's identity (remote data: the store's revision, whose identity names the endpoint),
the tokenizer's files and every dataset setting. Entries found are used through symlinks in the work folder
(a local place) or downloaded into it, so the training run's own cache files never land in a shared place.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

from runner.api.errors import RunnerError
from runner.api.uris import Location

from .backend import backend_for

DIR = "tokenized"
MARKER = "tokenized.json"  # runner.data.tokenized.MARKER: the store reads only the file list in it


def _listed(marker_text: str | None) -> list[dict] | None:
    try:
        files = json.loads(marker_text or "")["files"]
        return [f for f in files if isinstance(f.get("path"), str) and "/" not in f["path"]
                and not f["path"].startswith(".")]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _complete(folder: Path) -> bool:
    try:
        files = _listed((folder / MARKER).read_text())
        return files is not None and all((folder / f["path"]).stat().st_size == f["size"] for f in files)
    except OSError:
        return False


def _link(src: Path, dest: Path) -> Path:
    """dest/ holding symlinks to the entry's files and a copy of its marker (written last)."""
    files = _listed((src / MARKER).read_text()) or []
    tmp = dest.with_name(f".tmp-{dest.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in files:
        os.symlink((src / f["path"]).resolve(), tmp / f["path"])
    shutil.copyfile(src / MARKER, tmp / MARKER)
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(tmp, dest)
    return dest


def find(digest: str, dest: Path, *, checkpoints: Location | None, cache_root: Path | None,
         log: Callable[[str], None]) -> str | None:
    """Make `dest` the complete entry `digest` if one is kept anywhere; returns where it came from, else None."""
    if _complete(dest):
        return f"this node's work folder ({dest})"
    if cache_root is not None and _complete(cache_root / DIR / digest):
        _link(cache_root / DIR / digest, dest)
        return f"the model cache ({cache_root / DIR / digest})"
    if checkpoints is None:
        return None
    backend, rel = backend_for(checkpoints), f"{DIR}/{digest}"
    here = backend.local_path(checkpoints)
    if here is not None:
        if _complete(here / rel):
            _link(here / rel, dest)
            return f"output.checkpoints ({here / rel})"
        return None
    try:
        text = backend.read_text(checkpoints, f"{rel}/{MARKER}")
        files = _listed(text)
        if files is None:
            return None
        tmp = dest.with_name(f".tmp-{dest.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        backend.get_files(checkpoints, [(f"{rel}/{f['path']}", tmp / f["path"]) for f in files])
        (tmp / MARKER).write_text(text)
        if not _complete(tmp):
            return None
        shutil.rmtree(dest, ignore_errors=True)
        os.rename(tmp, dest)
    except RunnerError as e:
        log(f"data: could not read the tokenized copy in {checkpoints}/{rel} ({e.message}); tokenizing again")
        return None
    return f"output.checkpoints ({checkpoints}/{rel})"


def keep(folder: Path, digest: str, *, checkpoints: Location | None, cache_root: Path | None, to_cache: bool,
         log: Callable[[str], None]) -> None:
    """Copy a complete entry to the checkpoint location (marker last) and, when allowed, to the cache volume.
    A place that cannot take it costs the next attempt a tokenization, not this one its run: logged, not raised."""
    files = _listed((folder / MARKER).read_text()) or []
    if checkpoints is not None:
        rel = f"{DIR}/{digest}"
        backend = backend_for(checkpoints)
        try:
            if backend.read_text(checkpoints, f"{rel}/{MARKER}") is None:
                backend.put_files(checkpoints, [(folder / f["path"], f"{rel}/{f['path']}") for f in files])
                backend.write_text(checkpoints, f"{rel}/{MARKER}", (folder / MARKER).read_text())
                log(f"data: kept the tokenized data in output.checkpoints ({checkpoints}/{rel}) for a retry or resume")
        except (RunnerError, OSError) as e:
            log(f"data: the tokenized data is not kept in {checkpoints} ({getattr(e, 'message', e)}); a retry "
                "tokenizes again")
    if cache_root is None or not to_cache or _complete(cache_root / DIR / digest):
        return
    tmp = cache_root / DIR / f".tmp-{digest}.{uuid.uuid4().hex[:12]}"
    try:
        tmp.mkdir(parents=True)
        for f in files + [{"path": MARKER}]:
            shutil.copyfile(folder / f["path"], tmp / f["path"])
            with open(tmp / f["path"], "rb") as fh:
                os.fsync(fh.fileno())
        os.rename(tmp, cache_root / DIR / digest)
        log(f"data: kept the tokenized data in the model cache ({cache_root / DIR / digest}) for the next job on "
            "this data")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _complete(cache_root / DIR / digest):  # another runner's rename won: fine
            log(f"data: the tokenized data is not kept in the model cache ({e.strerror or e})")
