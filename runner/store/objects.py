"""Places under an object-store prefix (S3, GCS, ...): every Backend operation of a bucket store - sources,
published outputs, checkpoints, the lease - written once over the few primitives each store provides.

An object store is one module with an ObjectBackend subclass that implements the primitives below (its client
and its keys; `prefix`/`key` are full object names in `bucket`) and its error mapping:

    list_objects(bucket, prefix)        every object whose name starts with prefix, page by page, folder
                                        placeholders ("a/") skipped: StoredObject(key, size, version)
    head_object / get_object            one object's size and version / its bytes and version; None: absent
    put_object(bucket, key, data, ...)  small bytes, unconditionally, only if absent, or only at a version
    delete_object_if(bucket, key, v)    delete only at version v
    upload_objects / download_objects / copy_objects / delete_objects    many at once (large files in parts;
                                        downloads under a temporary name, renamed into place; copies server-side)
    require_credentials(), check_bucket(bucket)     before a check: credentials found, the bucket there
    translate(exc, ...), where(), endpoint()        its failures as RunnerErrors; its endpoint in messages and
                                                    in the model cache's key

Outputs. The runner never deletes or overwrites an object it did not write. A destination prefix may be replaced
only when it holds nothing, or a previous output of the same job (its finetune-manifest.json, or the marker of a
publish that was cut short, names the job and lists every object there). Objects of the runner's own besides
those: the manifest, the marker `finetune-publishing.json`, `.finetune-staging/<tag>/...` and write probes.

Publishing, when a complete earlier output is there: the new files go to `.finetune-staging/<tag>/` first, so
the earlier output stays complete until the new one is; then the marker (every object about to change), the old
manifest is removed, the staged files are copied into place (server-side), objects only the old output had are
removed, the new manifest is written last, and the marker and staging objects go. With no complete output there,
the files are uploaded in place between the marker and the manifest. A publish cut short leaves its marker: the
next run of the same job recognises the objects as its own and finishes.
"""
from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import uuid
from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import ClassVar

from runner.api.errors import DOWNLOAD_FAILED, INVALID_SPEC, UPLOAD_FAILED, PermanentError, RunnerError
from runner.api.uris import Location

from .backend import Backend, Revision, Versioned, store_call
from .checksums import Checksum
from .manifest import (
    MANIFEST_FORMAT, MANIFEST_NAME, build_manifest, iter_files, listed, manifest_bytes, ownership_problem,
    parse_manifest,
)

MARKER = "finetune-publishing.json"
STAGING = ".finetune-staging"
PROBE = ".finetune-write-probe-"
FIX = ("set output.destination to a new or empty prefix (or move those objects away yourself: the runner never "
       "deletes them)")
JSON = "application/json"


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    version: str  # what changes whenever its bytes do: S3's ETag, GCS's generation


def ours(rel: str) -> bool:
    """Objects the runner writes at a destination besides the output's files."""
    return rel in (MANIFEST_NAME, MARKER) or rel.startswith((STAGING + "/", PROBE))


def _base(loc: Location) -> str:
    """The prefix of every object under the place ("" for the whole bucket)."""
    return f"{loc.path}/" if loc.path else ""


def _key(loc: Location, rel: str) -> str:
    return _base(loc) + rel


class ObjectBackend(Backend):
    """A Backend over a bucket store's primitives; subclasses set `scheme` and implement the primitives."""

    folder_word = "prefix"
    key_word: ClassVar[str] = "name"  # what the store calls an object's name in messages: "key" (S3), "name"

    # ------------------------------------------------------------------------------------- primitives
    @abstractmethod
    def list_objects(self, bucket: str, prefix: str) -> Iterator[StoredObject]:
        """Every object whose name starts with `prefix`, fetched page by page as iterated; a missing bucket
        raises an error that `translate` names as such."""

    @abstractmethod
    def head_object(self, bucket: str, key: str) -> StoredObject | None: ...

    @abstractmethod
    def get_object(self, bucket: str, key: str) -> Versioned | None: ...

    @abstractmethod
    def put_object(self, bucket: str, key: str, data: bytes, *, if_absent: bool = False,
                   if_version: str | None = None, content_type: str | None = None) -> str | None:
        """Write `data` whole; the new version, or None when a condition given did not hold (if_absent: the
        object exists; if_version: its version is another, or it is gone)."""

    @abstractmethod
    def delete_object_if(self, bucket: str, key: str, version: str) -> bool:
        """Delete only if the object's version is still `version`; whether it was deleted."""

    @abstractmethod
    def upload_objects(self, bucket: str, pairs: list[tuple[Path, str]]) -> None:
        """(local file, key) pairs, concurrently, large files in parts; raises on the first failure."""

    @abstractmethod
    def download_objects(self, bucket: str, pairs: list[tuple[str, Path]]) -> None:
        """(key, local file) pairs, concurrently; each lands under a temporary name, renamed into place."""

    @abstractmethod
    def copy_objects(self, bucket: str, pairs: list[tuple[str, str]]) -> None:
        """(source key, target key) pairs, server-side, concurrently; raises on the first failure."""

    @abstractmethod
    def delete_objects(self, bucket: str, keys: list[str]) -> None:
        """Delete these objects concurrently (one already gone is no error)."""

    @abstractmethod
    def require_credentials(self) -> None:
        """Raise (an error `translate` maps) when the environment holds no credentials for the store."""

    @abstractmethod
    def check_bucket(self, bucket: str) -> None:
        """Raise (an error `translate` names as a missing bucket) when the bucket is not there."""

    @abstractmethod
    def translate(self, exc: BaseException, *, action: str, uri: str, bucket: str | None,
                  reason: str) -> RunnerError | None:
        """The RunnerError for the client's failure, or None when it is not a storage failure at all."""

    @abstractmethod
    def where(self) -> str:
        """The endpoint as messages name it: "AWS S3 (us-east-1)", "the S3 endpoint http://..."."""

    @abstractmethod
    def endpoint(self) -> str:
        """The endpoint the environment points at, for the model cache's key."""

    # ------------------------------------------------------------------------------------- helpers
    def _errors(self, action: str, loc: Location, reason: str):
        uri = str(loc)
        how = functools.partial(self.translate, action=action, uri=uri, bucket=loc.bucket, reason=reason)
        return store_call(f"{action} {uri}", self.where(), reason, how)

    def _objects(self, loc: Location) -> list[StoredObject]:
        return list(self.list_objects(loc.bucket, _base(loc)))

    def _rels(self, loc: Location) -> list[str]:
        return [o.key[len(_base(loc)):] for o in self.list_objects(loc.bucket, _base(loc))]

    def _safe(self, loc: Location, key: str) -> str:
        """`key` relative to the place, refused when it would land outside the folder it is downloaded to."""
        rel = key[len(_base(loc)):]
        if not rel or rel.startswith("/") or any(p in ("..", ".") for p in PurePosixPath(rel).parts):
            raise PermanentError(f"refusing to download {self.scheme}://{loc.bucket}/{key}: its name escapes the "
                                 "destination folder", reason=DOWNLOAD_FAILED)
        return rel

    def relation(self, place: Location, other: Location) -> str | None:
        """Same bucket, one prefix under the other ("" is the whole bucket)."""
        if other.scheme != place.scheme or other.bucket != place.bucket:
            return None
        p, q = place.path.strip("/"), other.path.strip("/")
        if p == q:
            return "is"
        if not q or PurePosixPath(p).is_relative_to(q):
            return "is inside"
        if not p or PurePosixPath(q).is_relative_to(p):
            return "contains"
        return None

    # ------------------------------------------------------------------------------------- sources
    def check_source(self, loc: Location, *, repo_type: str = "model") -> None:
        with self._errors("read", loc, DOWNLOAD_FAILED):
            self.require_credentials()
            found = (next(iter(self.list_objects(loc.bucket, _base(loc))), None) is not None
                     or bool(loc.path) and self.head_object(loc.bucket, loc.path) is not None)
        if not found:
            raise PermanentError(f"nothing found at {loc} (no object with that {self.key_word} and none under that "
                                 "prefix): upload the files there or fix the URI", reason=DOWNLOAD_FAILED)

    def list_names(self, loc: Location, *, repo_type: str = "model") -> list[str]:
        with self._errors("read", loc, DOWNLOAD_FAILED):
            return self._rels(loc)

    def download(self, loc: Location, dest: Path, *, repo_type: str = "model",
                 allow_patterns: list[str] | None = None) -> Path:
        """Everything under the prefix into `dest` (returned), or the single object `loc.path` as dest/<name>."""
        dest = Path(dest)
        with self._errors("download", loc, DOWNLOAD_FAILED):
            objects = self._objects(loc)
            if not objects and loc.path and self.head_object(loc.bucket, loc.path) is not None:
                target = dest / PurePosixPath(loc.path).name
                self.download_objects(loc.bucket, [(loc.path, target)])
                return target
            if not objects:
                raise PermanentError(f"nothing to download at {loc}: upload the files there or fix the URI",
                                     reason=DOWNLOAD_FAILED)
            pairs = [(o.key, dest / rel) for o in objects if (rel := self._safe(loc, o.key))
                     and (allow_patterns is None or any(fnmatch.fnmatch(rel, p) for p in allow_patterns))]
            dest.mkdir(parents=True, exist_ok=True)
            self.download_objects(loc.bucket, pairs)
        return dest

    def revision(self, loc: Location, *, repo_type: str = "model") -> Revision:
        """A digest of the listing (names, sizes, versions) at the endpoint the environment points at."""
        with self._errors("read", loc, DOWNLOAD_FAILED):
            objects = self._objects(loc)
            if not objects and loc.path:  # a single object
                objects = [o for o in [self.head_object(loc.bucket, loc.path)] if o is not None]
        if not objects:
            raise PermanentError(f"nothing found at {loc}: upload the files there or fix the URI",
                                 reason=DOWNLOAD_FAILED)
        listing = sorted([o.key, o.size, o.version] for o in objects)
        rev = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
        identity = f"{self.scheme}|{self.endpoint()}|{loc.bucket}|{loc.path}|{rev}"  # the endpoint in the key
        single = len(objects) == 1 and objects[0].key == loc.path
        rels = [(o, PurePosixPath(o.key).name if single else o.key[len(_base(loc)):]) for o in objects]
        sums = [(rel, self.checksum(o, rel)) for o, rel in rels]
        return Revision(loc, rev, identity, f"{loc} (listing {rev})", tuple(c for _, c in sums if c),
                        tuple(rel for rel, c in sums if c is None))

    def checksum(self, o: StoredObject, rel: str) -> Checksum | None:
        """What the listing says the object's bytes hash to, if the store says (default: it does not)."""
        return None

    # ------------------------------------------------------------------------------------- outputs
    def _owned(self, loc: Location, job: dict | None) -> tuple[dict | None, dict | None]:
        """(the manifest, the marker of an unfinished publish) at the destination, once this job may replace
        what it holds."""
        rels = self._rels(loc)
        manifest, marker = (parse_manifest(got.data) if name in rels and (got := self.get_object(loc.bucket,
                            _key(loc, name))) else None for name in (MANIFEST_NAME, MARKER))
        problem = ownership_problem(f"output.destination: {loc}", rels, [manifest, marker], job, FIX, ours=ours)
        if problem:
            raise PermanentError(problem, reason=INVALID_SPEC)
        return manifest, marker

    def _check_writable(self, loc: Location, job: dict | None, *, output: bool) -> None:
        """Credentials and permissions (a probe object written and removed), and, for an output (not a
        checkpoint location, which holds the job's own earlier checkpoints), that this job may replace what
        the prefix holds."""
        with self._errors("write to", loc, UPLOAD_FAILED):
            self.require_credentials()
            self.check_bucket(loc.bucket)
            if output:
                self._owned(loc, job)
            probe = _key(loc, f"{PROBE}{uuid.uuid4().hex[:12]}")
            self.put_object(loc.bucket, probe, b"probe")
            self.delete_objects(loc.bucket, [probe])

    def check_destination(self, loc: Location, job: dict | None = None) -> None:
        self._check_writable(loc, job, output=True)

    def publish(self, local_dir: Path, loc: Location, *, private: bool = True,
                commit_message: str = "Upload fine-tuned model", job: dict | None = None) -> str:
        files = iter_files(Path(local_dir))
        manifest = build_manifest(files, job)
        base, bucket = _base(loc), loc.bucket
        with self._errors("upload to", loc, UPLOAD_FAILED):
            old, marker = self._owned(loc, job)
            new, previous = {rel for rel, _ in files}, listed(old, marker)
            mark = manifest_bytes({"format": MANIFEST_FORMAT, "publishing": True, "job": dict(job or {}),
                                   "files": [{"path": p} for p in sorted(previous | new)]})
            if old is not None:  # a complete earlier output: it stays complete until the new one is
                staged = f"{base}{STAGING}/{uuid.uuid4().hex[:12]}/"
                self.upload_objects(bucket, [(path, staged + rel) for rel, path in files])
                self.put_object(bucket, base + MARKER, mark)
                self.delete_objects(bucket, [base + MANIFEST_NAME])
                self.copy_objects(bucket, [(staged + rel, base + rel) for rel, _ in files])
            else:
                self.put_object(bucket, base + MARKER, mark)
                self.upload_objects(bucket, [(path, base + rel) for rel, path in files])
            self.delete_objects(bucket, [base + p for p in sorted(previous - new)])
            self.put_object(bucket, base + MANIFEST_NAME, manifest_bytes(manifest), content_type=JSON)
            self.delete_objects(bucket, [base + MARKER])
            self.delete_objects(bucket, [o.key for o in self.list_objects(bucket, f"{base}{STAGING}/")])
        return str(loc)

    def read_manifest(self, loc: Location) -> dict | None:
        with self._errors("read", loc, DOWNLOAD_FAILED):
            got = self.get_object(loc.bucket, _key(loc, MANIFEST_NAME))
        return parse_manifest(got.data if got else None)

    def is_complete(self, loc: Location) -> bool:
        with self._errors("read", loc, DOWNLOAD_FAILED):
            return self.head_object(loc.bucket, _key(loc, MANIFEST_NAME)) is not None

    def read_text(self, loc: Location, rel: str) -> str | None:
        with self._errors("read", loc, DOWNLOAD_FAILED):
            got = self.get_object(loc.bucket, _key(loc, rel))
        return got.data.decode("utf-8") if got else None

    # ------------------------------------------------------------------------------------- checkpoints
    def check_writable(self, loc: Location) -> None:
        self._check_writable(loc, None, output=False)

    def list_files(self, loc: Location) -> list[str]:
        with self._errors("list", loc, DOWNLOAD_FAILED):
            return self._rels(loc)

    def put_files(self, loc: Location, items: list[tuple[Path, str]]) -> None:
        with self._errors("write to", loc, UPLOAD_FAILED):
            self.upload_objects(loc.bucket, [(Path(path), _key(loc, rel)) for path, rel in items])

    def get_files(self, loc: Location, items: list[tuple[str, Path]]) -> None:
        pairs = [(key, Path(target)) for rel, target in items if self._safe(loc, key := _key(loc, rel))]
        with self._errors("download", loc, DOWNLOAD_FAILED):
            self.download_objects(loc.bucket, pairs)

    def delete_files(self, loc: Location, rels: list[str]) -> None:
        with self._errors("delete from", loc, UPLOAD_FAILED):
            self.delete_objects(loc.bucket, [_key(loc, rel) for rel in rels])

    def write_text(self, loc: Location, rel: str, text: str) -> None:
        with self._errors("write to", loc, UPLOAD_FAILED):
            self.put_object(loc.bucket, _key(loc, rel), text.encode("utf-8"))

    # ------------------------------------------------------------------------------------- the lease
    def create_if_absent(self, loc: Location, rel: str, data: bytes) -> str | None:
        with self._errors(f"create {rel} in", loc, UPLOAD_FAILED):
            return self.put_object(loc.bucket, _key(loc, rel), data, if_absent=True)

    def read_versioned(self, loc: Location, rel: str) -> Versioned | None:
        with self._errors(f"read {rel} in", loc, DOWNLOAD_FAILED):
            return self.get_object(loc.bucket, _key(loc, rel))

    def replace_if_unchanged(self, loc: Location, rel: str, data: bytes, version: str) -> str | None:
        with self._errors(f"replace {rel} in", loc, UPLOAD_FAILED):
            return self.put_object(loc.bucket, _key(loc, rel), data, if_version=version)

    def delete_if_unchanged(self, loc: Location, rel: str, version: str) -> bool:
        with self._errors(f"delete {rel} in", loc, UPLOAD_FAILED):
            return self.delete_object_if(loc.bucket, _key(loc, rel), version)
