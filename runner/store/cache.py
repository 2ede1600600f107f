"""The shared model cache: model downloads land once in a directory runner pods share (a volume the admin mounts,
named by FINETUNE_MODEL_CACHE), keyed by source and revision, so a retry, a resume or the next job on the same
base reads them from there instead of downloading again.

    <root>/models/<scheme>/<readable name>-<digest>/  a complete entry: the files, and .finetune-cache.json
    <root>/tmp/<digest>.<token>/                      a fill in progress (or a killed filler's leftovers)
    <root>/locks/<digest>.lock                        held (flock) by the runner filling that entry

Complete or absent: a filler downloads into its own temp dir, writes the marker (what it holds: files, bytes,
source, revision) and fsyncs it, then renames the dir into place - one atomic rename, so an entry under models/
is always whole, and a filler killed at any point leaves only a temp dir, which the next filler of the same
entry removes. Two runners filling the same entry at once: the second waits on the first's lock (released by
the kernel when its process dies, however it dies) and then reads the entry; if the first makes no progress
for STALL seconds, the second downloads into its own work dir without the cache. Every hit checks the entry
against its marker (every file there with its size); a damaged entry is moved aside and filled again.

The key: the store's Revision of the source (Backend.revision), whose identity names the endpoint too: Hub
sources by their commit and their files' hashes (a branch or tag is resolved first, so a moved branch is a new
entry); bucket sources by the listing of the prefix (keys, sizes, ETags), so an overwritten model is a new entry.
Local sources are used in place and never cached. Eviction: remove entries by hand (README "Model cache").

Trust: a job can point its store at any server, even one answering at the address another job's store has (a
Service of the same name in another namespace). So an entry holds only files whose every byte matched the
checksums in the key (S3 ETags, the Hub's LFS sha256 and git blob ids: runner/store/checksums.py): a server
that lists the real checksums must send the real bytes. A source whose store gives no checksum (GCS) is
downloaded for its job alone, and a job that runs its model's own code (model.trustRemoteCode) never fills the
cache (on a cluster its pod mounts the cache read-only).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from runner.api import names
from runner.api.errors import DOWNLOAD_FAILED, RetryableError
from runner.api.uris import Location

from . import checksums
from .backend import Revision, backend_for

MARKER = ".finetune-cache.json"
STALL = 300.0  # seconds another filler may make no progress before this runner downloads without the cache
POLL = 2.0


def root() -> Path | None:
    value = os.environ.get(names.ENV_MODEL_CACHE, "").strip()
    return Path(value) if value else None


@dataclass(frozen=True)
class Key:
    rev: Revision  # what the store holds now (Backend.revision): what to download, and its identity
    digest: str  # of the identity: the entry's name

    @property
    def loc(self) -> Location:
        return self.rev.source

    @property
    def what(self) -> str:
        return self.rev.described

    def entry(self, base: Path) -> Path:
        readable = re.sub(r"[^A-Za-z0-9._-]+", "--", f"{self.loc.bucket + '/' if self.loc.bucket else ''}"
                                                       f"{self.loc.path}")[:96].strip("-.") or "root"
        return base / "models" / self.loc.scheme / f"{readable}-{self.digest}"


def download(loc: Location, dest: Path, *, repo_type: str = "model", log: Callable[[str], None] = print,
             cache_root: Path | None = None, stall: float = STALL, fill: bool = True) -> Path:
    """Where the files of `loc` are: from the cache (filling it on a miss), or, with no cache configured or a
    source the store cannot key (a local one: used in place; the Hub offline), as the store's download gives
    them. `fill=False` (a job running its model's own code, model.trustRemoteCode): hits are read, a miss is
    downloaded for this job alone - such a job never writes into the cache."""
    base = cache_root or root()
    backend = backend_for(loc)
    key = resolve(loc, repo_type) if base is not None else None
    if key is None:
        if base is not None and backend.local_path(loc) is None:
            log(f"model cache: not used for {loc} (its store cannot name its revision now, e.g. HF_HUB_OFFLINE)")
        return backend.download(loc, dest, repo_type=repo_type)
    entry = key.entry(base)
    hit = _lookup(entry)
    if hit is not None:
        return _hit(entry, hit, key, log)
    why_not = ("model.trustRemoteCode runs the model's own code in this job, which must not write what other jobs "
               "read" if not fill else "the cache is mounted read-only here" if not _writable(base)
               else f"the store gives no checksum for {', '.join(key.rev.unverified[:3])}, so other jobs could not "
               "trust the files" if key.rev.unverified else None)
    if why_not:
        log(f"model cache: {key.what} downloaded for this job alone, not into the cache ({why_not})")
        return backend.download(key.loc, dest, repo_type=repo_type)
    for sub in ("models", "tmp", "locks"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    fd = _lock(base / "locks" / f"{key.digest}.lock", base / "tmp", key, stall, log)
    if fd is None:
        log(f"model cache: another runner has been filling {key.what} with no progress for {stall:.0f}s; "
            "downloading without the cache")
        return backend.download(key.loc, dest, repo_type=repo_type)
    try:
        hit = _lookup(entry)  # filled while we waited
        if hit is not None:
            return _hit(entry, hit, key, log)
        _clear(base / "tmp", key.digest, entry)
        return _fill(base, entry, key, repo_type, log, dest)
    finally:
        os.close(fd)  # releases the lock


def resolve(loc: Location, repo_type: str = "model") -> Key | None:
    """The cache key of a source (one or two calls to its store); None when it is not cached."""
    rev = backend_for(loc).revision(loc, repo_type=repo_type)
    return None if rev is None else Key(rev, hashlib.sha256(rev.identity.encode()).hexdigest()[:16])


# ----------------------------------------------------------------------------------------- entries
def _inventory(folder: Path) -> tuple[int, int]:
    files = total = 0
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            if name != MARKER:
                files += 1
                total += os.stat(os.path.join(dirpath, name)).st_size
    return files, total


def _lookup(entry: Path) -> dict | None:
    """The marker of a complete entry; None when there is none. A damaged entry (a file missing or cut
    short since it was filled) counts as none, and the next filler replaces it."""
    try:
        marker = json.loads((entry / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if _inventory(entry) != (marker.get("files"), marker.get("bytes")):
        return None
    return marker


def _hit(entry: Path, marker: dict, key: Key, log) -> Path:
    try:
        os.utime(entry / MARKER)  # last use, for eviction
    except OSError:
        pass
    log(f"model cache hit: {key.what}: {marker['files']} files, {_size(marker['bytes'])} ({marker['bytes']} bytes) "
        f"at {entry}; downloaded 0 bytes")
    return entry / marker.get("path", ".")


def _fill(base: Path, entry: Path, key: Key, repo_type: str, log, dest: Path) -> Path:
    tmp = base / "tmp" / f"{key.digest}.{uuid.uuid4().hex[:12]}"
    started = time.monotonic()
    try:
        backend = backend_for(key.loc)
        got = backend.download(key.loc, tmp, repo_type=repo_type)
        if backend.revision(key.loc, repo_type=repo_type) != key.rev:
            raise RetryableError(f"model.source: {key.loc} changed while it was being downloaded; the next attempt "
                                 "downloads it again", reason=DOWNLOAD_FAILED)
        verdict = checksums.verify(tmp, key.rev.checksums)  # every byte what the store lists, or no entry
        if verdict.mismatched:
            raise RetryableError(
                f"model.source: {key.loc}: what {backend.where()} sent is not what it lists "
                f"({'; '.join(verdict.mismatched[:3])}); the files were discarded and nothing was cached. Check "
                "the endpoint (a proxy or a store other than the one meant may answer at that address)",
                reason=DOWNLOAD_FAILED)
        if verdict.unverified:
            log(f"model cache: {key.what} downloaded for this job alone, not into the cache (no part size "
                f"reproduces the multipart ETag of {', '.join(verdict.unverified[:3])})")
            shutil.move(str(tmp), str(dest))
            return dest / Path(got).relative_to(tmp)
        files, total = _inventory(tmp)
        marker = {"source": str(key.loc), "revision": key.rev.revision, "path": str(Path(got).relative_to(tmp)),
                  "files": files, "bytes": total, "filledAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "filledBy": f"{os.environ.get(names.ENV_POD_NAME) or socket.gethostname()} pid {os.getpid()}"}
        with open(tmp / MARKER, "w") as f:
            json.dump(marker, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        entry.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, entry)  # atomic: the entry appears whole
        _fsync_dir(entry.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.monotonic() - started
    log(f"model cache miss: {key.what}: downloaded {files} files, {_size(total)} ({total} bytes) in {seconds:.1f}s "
        f"into the cache at {entry}")
    return entry / marker["path"]


def _clear(tmp_dir: Path, digest: str, entry: Path) -> None:
    """Under the entry's lock: a killed filler's temp dirs, and a damaged entry (moved aside first)."""
    if entry.exists():
        aside = tmp_dir / f"{digest}.damaged-{uuid.uuid4().hex[:8]}"
        os.rename(entry, aside)
    for old in tmp_dir.glob(f"{digest}.*"):
        shutil.rmtree(old, ignore_errors=True)


def _lock(path: Path, tmp_dir: Path, key: Key, stall: float, log) -> int | None:
    """The entry's lock (an fd to close), waiting while its holder makes progress; None if it stalls."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o664)
    waited, last, since = False, None, time.monotonic()
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            pass
        if not waited:
            log(f"model cache: another runner is filling {key.what}; waiting for it")
            waited = True
        size = sum(_inventory(d)[1] for d in tmp_dir.glob(f"{key.digest}.*") if d.is_dir())
        if size != last:
            last, since = size, time.monotonic()
        elif time.monotonic() - since >= stall:
            os.close(fd)
            return None
        time.sleep(min(POLL, max(stall / 4, 0.05)))


def _writable(base: Path) -> bool:
    """Whether the cache (or the folder it will be made in) takes new files: a read-only mount does not."""
    path = Path(os.path.abspath(base))
    while not path.exists() and path != path.parent:
        path = path.parent
    return os.access(path, os.W_OK)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
