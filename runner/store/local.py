"""Local files (a path on this machine, or on a volume mounted here): the Backend of local places.

Sources are used in place; outputs are built beside the destination and renamed into it. The runner never
deletes or overwrites a file it did not write: a destination is replaced only when it is absent, empty, or
holds a previous output of the same job (its manifest names the job and lists every file in it), and only once
the new output is complete beside it. The lease's conditional writes hold an flock on the checkpoint folder
while they compare and swap, and a file's version is a digest of its bytes.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from runner.api.errors import DOWNLOAD_FAILED, INVALID_SPEC, UPLOAD_FAILED, PermanentError

from .backend import Backend, Revision, Versioned
from .manifest import MANIFEST_NAME, build_manifest, iter_files, job_of, manifest_bytes, parse_manifest
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


def check_destination(loc: Location, job: dict | None = None) -> None:
    """Before training: the destination can be written, and what it holds now may be replaced (see
    `ownership_problem`)."""
    path = Path(loc.path)
    if path.exists() and not path.is_dir():
        raise PermanentError(
            f"output destination {path} exists and is a file: point the destination at a directory",
            reason=UPLOAD_FAILED,
        )
    problem = ownership_problem(path, job)
    if problem:
        raise PermanentError(problem, reason=INVALID_SPEC)
    check_writable(path.parent, f"output {path}", "pick another destination")


def check_writable(path: Path, what: str, alternative: str) -> None:
    """`path`, or the nearest folder above it that exists, takes a new file."""
    parent = nearest_existing(path)
    if not parent.is_dir():
        raise PermanentError(f"cannot create {what}: {parent} is not a directory", reason=UPLOAD_FAILED)
    try:
        fd, probe = tempfile.mkstemp(prefix=".finetune-write-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermanentError(
            f"cannot write under {parent} (for {what}): {e.strerror or e}; "
            f"mount a writable volume there or {alternative}",
            reason=UPLOAD_FAILED,
        ) from e


_FIX = "set output.destination to a new or empty directory (or move those files away yourself)"


def read_manifest(loc: Location) -> dict | None:
    path = Path(loc.path) / MANIFEST_NAME
    try:
        return parse_manifest(path.read_bytes()) if path.is_file() else None
    except OSError:
        return None


def ownership_problem(dest: Path, job: dict | None) -> str | None:
    """Why the runner may not replace what `dest` holds now, or None. It may when `dest` is absent or empty,
    or holds a previous output of the same job (`job["name"]`; a manifest from before manifests named their
    job counts as the runner's own) and nothing that output's manifest does not list."""
    dest = Path(dest)
    where = f"output.destination: {dest}"
    if problem := _inside_an_output(dest, where):
        return problem
    if not dest.is_dir():
        return f"{where} exists and is not a directory: {_FIX}" if os.path.lexists(dest) else None
    try:
        if not any(os.scandir(dest)):
            return None
        manifest = read_manifest(Location("local", str(dest)))
        if manifest is None:
            shown = sorted(e.name for _, e in zip(range(4), os.scandir(dest)))
            return (f"{where} already holds files the runner did not write ({', '.join(shown)}, ...); "
                    f"it never deletes or overwrites them: {_FIX}")
        owner = job_of(manifest).get("name")
        if owner and owner != (job or {}).get("name"):
            return (f"{where} holds the output of another job ({owner!r}); the runner replaces only this job's "
                    f"own earlier output: {_FIX}")
        extra = _unlisted(dest, {f["path"] for f in manifest["files"]})
    except OSError as e:
        return f"{where} cannot be read ({e.strerror or e}): fix its permissions, or {_FIX}"
    if extra:
        return (f"{where} holds files its earlier output did not ({', '.join(extra)}); the runner never deletes "
                f"them when it replaces that output: {_FIX}")
    return None


def _inside_an_output(dest: Path, where: str) -> str | None:
    """Why `dest` may not be written when a folder above it is a published output (its manifest lists what it
    holds, so files added inside it would be another's in that output), or None."""
    for parent in Path(os.path.abspath(dest)).parents:
        manifest = read_manifest(Location("local", str(parent)))
        if manifest is not None:
            owner = job_of(manifest).get("name")
            whose = f"the output of job {owner!r}" if owner else "a published output"
            return (f"{where} is inside {parent}, {whose}; it overlaps that output, and publishing there would "
                    "add files to it: set output.destination to a new directory outside every job's output")
    return None


def _unlisted(root: Path, listed: set[str], limit: int = 4) -> list[str]:
    """Up to `limit` entries under `root` that are neither a listed file, a folder of one, nor the manifest."""
    folders = {"/".join(p.split("/")[:i]) for p in listed for i in range(1, p.count("/") + 1)}
    extra: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        for d in list(dirnames):
            if prefix + d not in folders:
                extra.append(prefix + d + "/")
                dirnames.remove(d)
        extra += [prefix + f for f in filenames if prefix + f not in listed and prefix + f != MANIFEST_NAME]
        if len(extra) >= limit:
            break
    return sorted(extra)[:limit]


def nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def download(loc: Location) -> Path:
    check_source(loc)
    return Path(loc.path)


def publish(local_dir: Path, loc: Location, job: dict | None = None) -> str:
    """Link or copy `local_dir` to a hidden sibling of the destination, add the manifest, then rename it
    into place - only where `ownership_problem` allows (checked again just before the swap)."""
    dest = Path(os.path.abspath(loc.path))
    src = Path(os.path.abspath(local_dir))
    try:
        if dest == src:  # the output was written in place: only the manifest is missing
            write_atomic(dest / MANIFEST_NAME, manifest_bytes(build_manifest(iter_files(src), job)))
            return str(dest)
        if dest.is_relative_to(src) or src.is_relative_to(dest):
            raise PermanentError(
                f"output destination {dest} and the folder to publish {src} contain one another: "
                "pick a destination outside the work directory",
                reason=UPLOAD_FAILED,
            )
        _check_owned(dest, job)
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
            (tmp / MANIFEST_NAME).write_bytes(manifest_bytes(build_manifest(files, job)))
            _check_owned(dest, job)
            if dest.exists():
                os.rename(dest, old)  # an earlier complete output of this job is moved away only now
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


def _check_owned(dest: Path, job: dict | None) -> None:
    problem = ownership_problem(dest, job)
    if problem:
        raise PermanentError(problem, reason=INVALID_SPEC)


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




# ----------------------------------------------------------------------------------------------- the Backend
class LocalBackend(Backend):
    scheme = "local"
    folder_word = "folder"

    # sources: used in place
    def check_source(self, loc: Location, *, repo_type: str = "model") -> None:
        check_source(loc)

    def list_names(self, loc: Location, *, repo_type: str = "model") -> list[str] | None:
        return None

    def download(self, loc: Location, dest: Path, *, repo_type: str = "model",
                 allow_patterns: list[str] | None = None) -> Path:
        return download(loc)

    def revision(self, loc: Location, *, repo_type: str = "model") -> Revision | None:
        return None

    def local_path(self, loc: Location) -> Path | None:
        return Path(loc.path)

    def relation(self, place: Location, other: Location) -> str | None:
        if other.scheme != place.scheme:
            return None
        x, y = Path(os.path.realpath(place.path)), Path(os.path.realpath(other.path))
        return "is" if x == y else "is inside" if x.is_relative_to(y) else "contains" if y.is_relative_to(x) else None

    # outputs
    def check_destination(self, loc: Location, job: dict | None = None) -> None:
        check_destination(loc, job)

    def publish(self, local_dir: Path, loc: Location, *, private: bool = True,
                commit_message: str = "Upload fine-tuned model", job: dict | None = None) -> str:
        return publish(local_dir, loc, job)

    def read_manifest(self, loc: Location) -> dict | None:
        return read_manifest(loc)

    def is_complete(self, loc: Location) -> bool:
        """The manifest is there, and every file it lists with its size."""
        manifest, root = read_manifest(loc), Path(loc.path)
        if manifest is None:
            return False
        for f in manifest["files"]:
            p = root / f["path"]
            if not p.is_file() or p.stat().st_size != f.get("size"):
                return False
        return True

    def read_text(self, loc: Location, rel: str) -> str | None:
        path = Path(loc.path) / rel
        with _errors(f"read {path}", DOWNLOAD_FAILED):
            return path.read_text(encoding="utf-8") if path.is_file() else None

    # checkpoints
    def check_writable(self, loc: Location) -> None:
        check_writable(Path(loc.path), f"checkpoints {loc}", "set output.checkpoints to a writable place")

    def list_files(self, loc: Location) -> list[str]:
        root = Path(loc.path)
        with _errors(f"list {root}", DOWNLOAD_FAILED):
            return sorted(rel for rel, _ in iter_files(root)) if root.is_dir() else []

    def put_files(self, loc: Location, items: list[tuple[Path, str]]) -> None:
        root = Path(loc.path)
        with _errors(f"write to {root}", UPLOAD_FAILED):
            for src, rel in items:
                _copy_atomic(Path(src), root / rel)

    def get_files(self, loc: Location, items: list[tuple[str, Path]]) -> None:
        root = Path(loc.path)
        with _errors(f"read from {root}", DOWNLOAD_FAILED):
            for rel, target in items:
                _copy_atomic(root / rel, Path(target))

    def delete_files(self, loc: Location, rels: list[str]) -> None:
        root = Path(os.path.abspath(loc.path))
        with _errors(f"delete from {root}", UPLOAD_FAILED):
            for rel in rels:
                (root / rel).unlink(missing_ok=True)
                parent = (root / rel).parent
                while parent != root and parent.is_relative_to(root) and parent.is_dir() and not any(parent.iterdir()):
                    parent.rmdir()
                    parent = parent.parent

    def write_text(self, loc: Location, rel: str, text: str) -> None:
        path = Path(loc.path) / rel
        with _errors(f"write {path}", UPLOAD_FAILED):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, text.encode("utf-8"))

    # the lease: compare-and-swap under an flock on the folder
    def create_if_absent(self, loc: Location, rel: str, data: bytes) -> str | None:
        path = Path(loc.path) / rel
        with _errors(f"create {path}", UPLOAD_FAILED), _folder_lock(path.parent):
            tmp = _staged(path, data)
            try:
                os.link(tmp, path)  # atomic, and fails when it exists (also on NFS)
            except FileExistsError:
                return None
            finally:
                tmp.unlink(missing_ok=True)
        return _version(data)

    def read_versioned(self, loc: Location, rel: str) -> Versioned | None:
        path = Path(loc.path) / rel
        with _errors(f"read {path}", DOWNLOAD_FAILED):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                return None
        return Versioned(data, _version(data))

    def replace_if_unchanged(self, loc: Location, rel: str, data: bytes, version: str) -> str | None:
        path = Path(loc.path) / rel
        with _errors(f"replace {path}", UPLOAD_FAILED), _folder_lock(path.parent):
            current = self.read_versioned(loc, rel)
            if current is None or current.version != version:
                return None
            os.replace(_staged(path, data), path)
        return _version(data)

    def delete_if_unchanged(self, loc: Location, rel: str, version: str) -> bool:
        path = Path(loc.path) / rel
        with _errors(f"delete {path}", UPLOAD_FAILED), _folder_lock(path.parent):
            current = self.read_versioned(loc, rel)
            if current is None or current.version != version:
                return False
            path.unlink(missing_ok=True)
        return True


def _version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _staged(path: Path, data: bytes) -> Path:
    """`data` in a hidden file beside `path`, ready to be linked or renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(data)
    return tmp


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive flock on the folder itself (no lock file is left behind); where the filesystem has no
    flock for folders, the swap is only as atomic as rename."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def _copy_atomic(src: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part-{uuid.uuid4().hex[:8]}")
    try:
        shutil.copy2(src, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _errors(what: str, reason: str) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise PermanentError(f"cannot {what}: {e.strerror or e}; check free space and permissions of that volume",
                             reason=reason) from e
