"""Google Cloud Storage: the Backend of gs:// places, through google-cloud-storage, configured from the env:
    GOOGLE_APPLICATION_CREDENTIALS   a service-account JSON key file (what spec.gcsSecretRef mounts); without
                                     it, the environment's default credentials (GKE Workload Identity, gcloud)
    GOOGLE_CLOUD_PROJECT             the project (default: the key's); objects need none
    STORAGE_EMULATOR_HOST            an emulator's URL instead of Google's endpoint: requests go anonymous
                                     (a key named as well is still read, so a broken one fails the same way)
    FINETUNE_STORE_TIMEOUTS          connect/read limits of each request, a deadline per operation (timeouts.py)
Outputs follow the rules of s3_output.py (its marker, staging and probe names): the runner replaces only its own
earlier output, which stays complete until the new one is, and writes the manifest last. The lease's conditional
writes are generation preconditions: ifGenerationMatch=0 creates only if absent, ifGenerationMatch=<generation>
replaces or deletes only that version. A cache key is the listing (names, sizes, generations) at the endpoint.
"""
from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import google.auth
import requests
from google.api_core import exceptions as gx
from google.api_core.client_options import ClientOptions
from google.auth import exceptions as gae
from google.auth.credentials import AnonymousCredentials
from google.auth.transport.requests import AuthorizedSession
from google.oauth2 import service_account
from google.cloud import storage
from google.cloud.storage.exceptions import DataCorruption, InvalidResponse
from google.cloud.storage.retry import DEFAULT_RETRY

from runner.api import names
from runner.api.errors import DOWNLOAD_FAILED, INVALID_SPEC, UPLOAD_FAILED, PermanentError, RetryableError, RunnerError
from runner.api.uris import Location

from . import timeouts
from .backend import Backend, Revision, Versioned
from .manifest import MANIFEST_FORMAT, MANIFEST_NAME, build_manifest, iter_files, listed, manifest_bytes
from .manifest import ownership_problem, parse_manifest
from .s3_output import FIX, MARKER, PROBE, STAGING, ours

ENV_KEY, ENV_EMULATOR, ENV_PROJECT = names.ENV_GCS_CREDENTIALS, "STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT"
GOOGLE = "https://storage.googleapis.com"
SCOPES = ["https://www.googleapis.com/auth/devstorage.read_write"]
CHUNK = 16 << 20  # resumable uploads (files above 8 MiB) in parts of this size
WORKERS = 8
ROLE_HINT = "roles/storage.objectAdmin (list, read, create and delete objects)"
CREDENTIALS_HINT = (f"set spec.gcsSecretRef to a Secret holding a service-account JSON key (outside a cluster: "
                    f"{ENV_KEY}=<the key file>), or give the pod a Workload Identity")


class _Refused(Exception):
    """Unusable credentials, a missing bucket: what the user must fix, in the message (never a secret)."""


# ---------------------------------------------------------------------------------------------- client
def emulator() -> str | None:
    host = (os.environ.get(ENV_EMULATOR) or "").strip().rstrip("/")
    return (host if "://" in host else f"http://{host}") if host else None


def _where() -> str:
    return f"the GCS emulator at {emulator()} ({ENV_EMULATOR})" if emulator() else "Google Cloud Storage"


def client():
    """A google-cloud-storage Client for the environment as it is now (one kept per distinct environment)."""
    return _client_for(tuple(os.environ.get(k) for k in (ENV_KEY, ENV_EMULATOR, ENV_PROJECT, timeouts.ENV)))


def _credentials():
    """(credentials, project): the key file's when one is named (read even for an emulator, which gets none)."""
    path = os.environ.get(ENV_KEY)
    if not path:
        if emulator():
            return AnonymousCredentials(), None
        try:
            return google.auth.default(scopes=SCOPES)
        except gae.DefaultCredentialsError:
            raise _Refused(f"no Google Cloud credentials found; {CREDENTIALS_HINT}") from None
    if not os.path.isfile(path):
        raise _Refused(f"{ENV_KEY}={path}: no such file; it must name a service-account JSON key "
                       "(spec.gcsSecretRef mounts one)")
    try:  # a service-account key only: other credential files may run programs (executable-sourced ones)
        creds = service_account.Credentials.from_service_account_file(path, scopes=SCOPES)
    except (gae.DefaultCredentialsError, ValueError, KeyError, TypeError, OSError) as e:
        raise _Refused(f"{ENV_KEY}={path} is not a usable service-account JSON key ({type(e).__name__}); put "
                       "the key file Google issued for the service account in the Secret, unchanged, under the "
                       "key spec.gcsSecretRef names") from None
    return (AnonymousCredentials() if emulator() else creds), creds.project_id


@functools.lru_cache(maxsize=8)
def _client_for(_env: tuple):
    class CheckedSession(AuthorizedSession):
        def request(self, *args, **kwargs):
            timeouts.check()  # no request starts past an operation's deadline
            return super().request(*args, **kwargs)

    creds, project = _credentials()
    return storage.Client(project=os.environ.get(ENV_PROJECT) or project, credentials=creds,
                          _http=CheckedSession(creds),
                          client_options=ClientOptions(api_endpoint=emulator()) if emulator() else None)


def _call() -> dict:
    """Each call's timeouts and retries: retried until the deadline stops the next request (timeouts.check)."""
    limits = timeouts.limits()
    return {"timeout": (limits.connect, limits.read), "retry": DEFAULT_RETRY.with_timeout(2 * limits.deadline)}


# ---------------------------------------------------------------------------------------------- errors
def translate(exc: BaseException, *, action: str, uri: str, bucket: str | None, reason: str) -> RunnerError | None:
    """The RunnerError for a google-cloud-storage failure, or None when it is not a storage failure at all."""
    what, seen, e = f"cannot {action} {uri}", set(), exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, InvalidResponse):  # a resumable transfer's answer: read it as the API's errors
            e = gx.from_http_status(e.response.status_code, str(e))
        if isinstance(e, RunnerError):
            return e
        if isinstance(e, _Refused):
            return PermanentError(f"{what}: {e}", reason=reason)
        if isinstance(e, (gx.Unauthorized, gx.Forbidden, gae.RefreshError)):
            return PermanentError(f"{what}: {_where()} refused the credentials or the request ({type(e).__name__});"
                                  f" check that the key in {ENV_KEY} (spec.gcsSecretRef) is current and that its "
                                  f"service account (or the pod's Workload Identity) has {ROLE_HINT} on bucket "
                                  f"'{bucket}'", reason=reason)
        if isinstance(e, gx.NotFound):
            return PermanentError(f"{what}: nothing found there (404); fix the name or upload the files",
                                  reason=reason)
        if isinstance(e, (gx.TooManyRequests, gx.ServerError, DataCorruption)) or getattr(e, "code", None) == 408:
            return RetryableError(f"{what}: {_where()} answered {getattr(e, 'code', None) or type(e).__name__} "
                                  "(transient); retrying may help", reason=reason)
        if isinstance(e, gx.GoogleAPICallError):
            return PermanentError(f"{what}: {_where()} answered {e.code}: {e.message}", reason=reason)
        if isinstance(e, (requests.ConnectionError, requests.Timeout, gae.TransportError, ConnectionError)):
            return RetryableError(f"{what}: could not reach {_where()} ({type(e).__name__}; {timeouts.ENV}="
                                  f"{timeouts.limits().describe()}); retrying may help; if it persists check the "
                                  "endpoint and the network", reason=reason)
        e = e.__cause__ or e.__context__
    return None


@contextlib.contextmanager
def errors(action: str, uri: str, bucket: str | None, reason: str) -> Iterator[None]:
    """One store operation: its failures become RunnerErrors, and it ends within the deadline (timeouts.py)."""
    try:
        with timeouts.operation(f"{action} {uri}", _where(), reason):
            yield
    except RunnerError:
        raise
    except Exception as exc:  # noqa: BLE001 - translated below or re-raised unchanged
        err = translate(exc, action=action, uri=uri, bucket=bucket, reason=reason)
        if err is None:
            raise
        raise err from exc


def _read(loc: Location, what: str = "read"):
    return errors(what, str(loc), loc.bucket, DOWNLOAD_FAILED)


def _write(loc: Location, what: str = "write to"):
    return errors(what, str(loc), loc.bucket, UPLOAD_FAILED)


# ---------------------------------------------------------------------------------------------- objects
def _key(loc: Location, rel: str = "") -> str:
    """The object name of `rel` under the place ("": the prefix itself, with its trailing "/")."""
    return f"{loc.path}/{rel}" if loc.path else rel


def _blob(loc: Location, key: str, chunk_size: int | None = None):
    return client().bucket(loc.bucket).blob(key, chunk_size=chunk_size)


def _objects(loc: Location, under: str | None = None) -> list:
    """Every object under `under` (default: the place's prefix), folder placeholders skipped."""
    try:
        blobs = list(client().list_blobs(loc.bucket, prefix=_key(loc) if under is None else under, **_call()))
    except gx.NotFound:
        raise _Refused(f"bucket '{loc.bucket}' does not exist at {_where()}; create it, or fix the bucket in the "
                       "URI") from None
    return [b for b in blobs if not b.name.endswith("/")]


def _rels(loc: Location) -> list[str]:
    return [b.name[len(_key(loc)):] for b in _objects(loc)]


def _get(loc: Location, key: str) -> Versioned | None:
    blob = _blob(loc, key)
    with contextlib.suppress(gx.NotFound):
        return Versioned(blob.download_as_bytes(**_call()), str(blob.generation))
    return None


def _put(loc: Location, key: str, data: bytes, generation: int | None = None) -> str | None:
    """Write `data`, only if the object's generation is `generation` when one is given (0: only if absent); the
    new generation, or None when that precondition did not hold."""
    blob = _blob(loc, key)
    try:
        blob.upload_from_string(data, if_generation_match=generation, **_call())
        return str(blob.generation)
    except (gx.PreconditionFailed, gx.NotFound):
        if generation is None:
            raise
    return None


def _each(fn, items: list) -> None:
    """fn over items concurrently; raises the first failure."""
    if items:
        with ThreadPoolExecutor(max_workers=min(WORKERS, len(items))) as pool:
            list(pool.map(fn, items))


def _delete(loc: Location, keys: list[str]) -> None:
    def one(key: str) -> None:
        with contextlib.suppress(gx.NotFound):
            _blob(loc, key).delete(**_call())

    _each(one, keys)


def _upload(loc: Location, pairs: list[tuple[Path, str]]) -> None:
    _each(lambda p: _blob(loc, p[1], CHUNK).upload_from_filename(str(p[0]), **_call()), pairs)


def _download(loc: Location, pairs: list[tuple[str, Path]]) -> None:
    def one(pair: tuple[str, Path]) -> None:
        key, target = pair
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part-{uuid.uuid4().hex[:8]}")
        try:
            _blob(loc, key).download_to_filename(str(tmp), **_call())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    _each(one, pairs)


def _copy(loc: Location, pairs: list[tuple[str, str]]) -> None:
    """Server-side copies (rewrite, in as many calls as the store needs), concurrently."""
    def one(pair: tuple[str, str]) -> None:
        token = _blob(loc, pair[1]).rewrite(_blob(loc, pair[0]), **_call())[0]
        while token is not None:
            token = _blob(loc, pair[1]).rewrite(_blob(loc, pair[0]), token=token, **_call())[0]

    _each(one, pairs)


def _safe(loc: Location, key: str) -> str:
    rel = key[len(_key(loc)):]
    if not rel or rel.startswith("/") or any(p in ("..", ".", "") for p in PurePosixPath(rel).parts):
        raise PermanentError(f"refusing to download gs://{loc.bucket}/{key}: its name escapes the destination "
                             "folder", reason=DOWNLOAD_FAILED)
    return rel


class GcsBackend(Backend):
    scheme = "gs"
    folder_word = "prefix"

    # ------------------------------------------------------------------------------------- sources
    def check_source(self, loc: Location, *, repo_type: str = "model") -> None:
        with _read(loc):
            found = bool(_objects(loc)) or bool(loc.path) and _blob(loc, loc.path).exists(**_call())
        if not found:
            raise PermanentError(f"nothing found at {loc} (no object with that name and none under that "
                                 "prefix): upload the files there or fix the URI", reason=DOWNLOAD_FAILED)

    def list_names(self, loc: Location, *, repo_type: str = "model") -> list[str]:
        with _read(loc):
            return _rels(loc)

    def download(self, loc: Location, dest: Path, *, repo_type: str = "model",
                 allow_patterns: list[str] | None = None) -> Path:
        dest = Path(dest)
        with _read(loc, "download"):
            objects = _objects(loc)
            if not objects and loc.path and _blob(loc, loc.path).exists(**_call()):
                _download(loc, [(loc.path, dest / PurePosixPath(loc.path).name)])
                return dest / PurePosixPath(loc.path).name
            if not objects:
                raise PermanentError(f"nothing to download at {loc}: upload the files there or fix the URI",
                                     reason=DOWNLOAD_FAILED)
            pairs = [(b.name, dest / rel) for b in objects if (rel := _safe(loc, b.name))
                     and (allow_patterns is None or any(fnmatch.fnmatch(rel, p) for p in allow_patterns))]
            dest.mkdir(parents=True, exist_ok=True)
            _download(loc, pairs)
        return dest

    def revision(self, loc: Location, *, repo_type: str = "model") -> Revision:
        with _read(loc):
            objects = _objects(loc)
            if not objects and loc.path:  # a single object
                objects = [b for b in [client().bucket(loc.bucket).get_blob(loc.path, **_call())] if b is not None]
        if not objects:
            raise PermanentError(f"nothing found at {loc}: upload the files there or fix the URI",
                                 reason=DOWNLOAD_FAILED)
        listing = sorted([b.name, int(b.size or 0), str(b.generation)] for b in objects)
        rev = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
        identity = f"gs|{emulator() or GOOGLE}|{loc.bucket}|{loc.path}|{rev}"  # the endpoint in the key
        return Revision(loc, rev, identity, f"{loc} (listing {rev})")

    # ------------------------------------------------------------------------------------- outputs
    def _owned(self, loc: Location, job: dict | None) -> tuple[dict | None, dict | None]:
        """(the manifest, the marker of an unfinished publish) at the destination, once this job may replace
        what it holds."""
        rels = _rels(loc)
        manifest, marker = (parse_manifest(got.data) if name in rels and (got := _get(loc, _key(loc, name)))
                            else None for name in (MANIFEST_NAME, MARKER))
        problem = ownership_problem(f"output.destination: {loc}", rels, [manifest, marker], job, FIX, ours=ours)
        if problem:
            raise PermanentError(problem, reason=INVALID_SPEC)
        return manifest, marker

    def check_destination(self, loc: Location, job: dict | None = None) -> None:
        with _write(loc):
            self._owned(loc, job)
        self.check_writable(loc)

    def publish(self, local_dir: Path, loc: Location, *, private: bool = True,
                commit_message: str = "Upload fine-tuned model", job: dict | None = None) -> str:
        files = iter_files(Path(local_dir))
        manifest, base = build_manifest(files, job), _key(loc)
        with _write(loc, "upload to"):
            old, marker = self._owned(loc, job)
            new, previous = {rel for rel, _ in files}, listed(old, marker)
            mark = manifest_bytes({"format": MANIFEST_FORMAT, "publishing": True, "job": dict(job or {}),
                                   "files": [{"path": p} for p in sorted(previous | new)]})
            if old is not None:  # a complete earlier output: it stays complete until the new one is
                staged = f"{base}{STAGING}/{uuid.uuid4().hex[:12]}/"
                _upload(loc, [(path, staged + rel) for rel, path in files])
                _put(loc, base + MARKER, mark)
                _delete(loc, [base + MANIFEST_NAME])
                _copy(loc, [(staged + rel, base + rel) for rel, _ in files])
            else:
                _put(loc, base + MARKER, mark)
                _upload(loc, [(path, base + rel) for rel, path in files])
            _delete(loc, [base + p for p in sorted(previous - new)])
            _put(loc, base + MANIFEST_NAME, manifest_bytes(manifest))
            _delete(loc, [base + MARKER])
            _delete(loc, [b.name for b in _objects(loc, f"{base}{STAGING}/")])
        return str(loc)

    def read_manifest(self, loc: Location) -> dict | None:
        return parse_manifest(self.read_text(loc, MANIFEST_NAME))

    def is_complete(self, loc: Location) -> bool:
        with _read(loc):
            return _blob(loc, _key(loc, MANIFEST_NAME)).exists(**_call())

    def read_text(self, loc: Location, rel: str) -> str | None:
        with _read(loc):
            got = _get(loc, _key(loc, rel))
        return got.data.decode("utf-8") if got else None

    # ------------------------------------------------------------------------------------- checkpoints
    def check_writable(self, loc: Location) -> None:
        """One object written and removed: credentials and permission checked (a missing bucket named so)."""
        probe = _key(loc, f"{PROBE}{uuid.uuid4().hex[:12]}")
        with _write(loc):
            _objects(loc, probe)
            _put(loc, probe, b"probe")
            _delete(loc, [probe])

    def list_files(self, loc: Location) -> list[str]:
        with _read(loc, "list"):
            return _rels(loc)

    def put_files(self, loc: Location, items: list[tuple[Path, str]]) -> None:
        with _write(loc):
            _upload(loc, [(Path(path), _key(loc, rel)) for path, rel in items])

    def get_files(self, loc: Location, items: list[tuple[str, Path]]) -> None:
        pairs = [(key, Path(target)) for rel, target in items if _safe(loc, key := _key(loc, rel))]
        with _read(loc, "download"):
            _download(loc, pairs)

    def delete_files(self, loc: Location, rels: list[str]) -> None:
        with _write(loc, "delete from"):
            _delete(loc, [_key(loc, rel) for rel in rels])

    def write_text(self, loc: Location, rel: str, text: str) -> None:
        with _write(loc):
            _put(loc, _key(loc, rel), text.encode("utf-8"))

    # ------------------------------------------------------------------------------------- the lease
    def create_if_absent(self, loc: Location, rel: str, data: bytes) -> str | None:
        with _write(loc, f"create {rel} in"):
            return _put(loc, _key(loc, rel), data, generation=0)

    def read_versioned(self, loc: Location, rel: str) -> Versioned | None:
        with _read(loc, f"read {rel} in"):
            return _get(loc, _key(loc, rel))

    def replace_if_unchanged(self, loc: Location, rel: str, data: bytes, version: str) -> str | None:
        with _write(loc, f"replace {rel} in"):
            return _put(loc, _key(loc, rel), data, generation=int(version))

    def delete_if_unchanged(self, loc: Location, rel: str, version: str) -> bool:
        with _write(loc, f"delete {rel} in"), contextlib.suppress(gx.PreconditionFailed, gx.NotFound):
            _blob(loc, _key(loc, rel)).delete(if_generation_match=int(version), **_call())
            return True
        return False
