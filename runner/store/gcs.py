"""Google Cloud Storage: the Backend of gs:// places, through google-cloud-storage, configured from the env:
    GOOGLE_APPLICATION_CREDENTIALS   a service-account JSON key file (what spec.gcsSecretRef mounts); without
                                     it, the environment's default credentials (GKE Workload Identity, gcloud)
    GOOGLE_CLOUD_PROJECT             the project (default: the key's); objects need none
    STORAGE_EMULATOR_HOST            an emulator's URL instead of Google's endpoint: requests go anonymous
                                     (a key named as well is still read, so a broken one fails the same way)
    FINETUNE_STORE_TIMEOUTS          connect/read limits of each request, a deadline per operation (timeouts.py)
These are the object-store primitives of runner/store/objects.py, which holds what is done with them (sources,
outputs, checkpoints). An object's version is its generation; the lease's conditional writes are generation
preconditions: ifGenerationMatch=0 creates only if absent, ifGenerationMatch=<generation> replaces or deletes only
that version.
"""
from __future__ import annotations

import contextlib
import functools
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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
from runner.api.errors import PermanentError, RetryableError, RunnerError

from . import timeouts
from .backend import Versioned
from .objects import ObjectBackend, StoredObject

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


def where() -> str:
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
            timeouts.sending(where())  # no request starts when an operation is stalled or late
            answer = super().request(*args, **kwargs)
            timeouts.answered(where())
            return answer

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
            return PermanentError(f"{what}: {where()} refused the credentials or the request ({type(e).__name__});"
                                  f" check that the key in {ENV_KEY} (spec.gcsSecretRef) is current and that its "
                                  f"service account (or the pod's Workload Identity) has {ROLE_HINT} on bucket "
                                  f"'{bucket}'", reason=reason)
        if isinstance(e, gx.NotFound):
            return PermanentError(f"{what}: nothing found there (404); fix the name or upload the files",
                                  reason=reason)
        if isinstance(e, (gx.TooManyRequests, gx.ServerError, DataCorruption)) or getattr(e, "code", None) == 408:
            return RetryableError(f"{what}: {where()} answered {getattr(e, 'code', None) or type(e).__name__} "
                                  "(transient); retrying may help", reason=reason)
        if isinstance(e, gx.GoogleAPICallError):
            return PermanentError(f"{what}: {where()} answered {e.code}: {e.message}", reason=reason)
        if isinstance(e, (requests.ConnectionError, requests.Timeout, gae.TransportError, ConnectionError)):
            return RetryableError(f"{what}: could not reach {where()} ({type(e).__name__}; {timeouts.ENV}="
                                  f"{timeouts.limits().describe()}); retrying may help; if it persists check the "
                                  "endpoint and the network", reason=reason)
        e = e.__cause__ or e.__context__
    return None


# ---------------------------------------------------------------------------------------------- objects
def _blob(bucket: str, key: str, chunk_size: int | None = None):
    return client().bucket(bucket).blob(key, chunk_size=chunk_size)


def _missing_bucket(bucket: str) -> _Refused:
    return _Refused(f"bucket '{bucket}' does not exist at {where()}; create it, or fix the bucket in the URI")


def _each(fn, items: list) -> None:
    """fn over items concurrently; raises the first failure."""
    if items:
        with ThreadPoolExecutor(max_workers=min(WORKERS, len(items))) as pool:
            list(pool.map(fn, items))


class GcsBackend(ObjectBackend):
    scheme = "gs"
    translate = staticmethod(translate)

    def where(self) -> str:
        return where()

    def endpoint(self) -> str:
        return emulator() or GOOGLE

    def require_credentials(self) -> None:
        client()  # built from the credentials, or refused naming what is wrong with them

    def check_bucket(self, bucket: str) -> None:
        """Listing at most one object: objectAdmin may list, but not read the bucket's metadata."""
        try:
            list(client().list_blobs(bucket, max_results=1, **_call()))
        except gx.NotFound:
            raise _missing_bucket(bucket) from None

    def list_objects(self, bucket: str, prefix: str) -> Iterator[StoredObject]:
        try:
            for b in client().list_blobs(bucket, prefix=prefix, **_call()):
                if not b.name.endswith("/"):
                    yield StoredObject(b.name, int(b.size or 0), str(b.generation))
        except gx.NotFound:
            raise _missing_bucket(bucket) from None

    def head_object(self, bucket: str, key: str) -> StoredObject | None:
        b = client().bucket(bucket).get_blob(key, **_call())
        return None if b is None else StoredObject(b.name, int(b.size or 0), str(b.generation))

    def get_object(self, bucket: str, key: str) -> Versioned | None:
        blob = _blob(bucket, key)
        with contextlib.suppress(gx.NotFound):
            return Versioned(blob.download_as_bytes(**_call()), str(blob.generation))
        return None

    def put_object(self, bucket: str, key: str, data: bytes, *, if_absent: bool = False,
                   if_version: str | None = None, content_type: str | None = None) -> str | None:
        generation = 0 if if_absent else None if if_version is None else int(if_version)
        blob = _blob(bucket, key)
        try:
            blob.upload_from_string(data, content_type=content_type or "text/plain", if_generation_match=generation,
                                    **_call())
            return str(blob.generation)
        except (gx.PreconditionFailed, gx.NotFound):
            if generation is None:
                raise
        return None

    def delete_object_if(self, bucket: str, key: str, version: str) -> bool:
        with contextlib.suppress(gx.PreconditionFailed, gx.NotFound):
            _blob(bucket, key).delete(if_generation_match=int(version), **_call())
            return True
        return False

    def upload_objects(self, bucket: str, pairs: list[tuple[Path, str]]) -> None:
        _each(lambda p: _blob(bucket, p[1], CHUNK).upload_from_filename(str(p[0]), **_call()), pairs)

    def download_objects(self, bucket: str, pairs: list[tuple[str, Path]]) -> None:
        def one(pair: tuple[str, Path]) -> None:
            key, target = pair
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.part-{uuid.uuid4().hex[:8]}")
            try:
                _blob(bucket, key).download_to_filename(str(tmp), **_call())
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)

        _each(one, pairs)

    def copy_objects(self, bucket: str, pairs: list[tuple[str, str]]) -> None:
        """Rewrites, in as many calls as the store needs for each."""
        def one(pair: tuple[str, str]) -> None:
            token = _blob(bucket, pair[1]).rewrite(_blob(bucket, pair[0]), **_call())[0]
            while token is not None:
                token = _blob(bucket, pair[1]).rewrite(_blob(bucket, pair[0]), token=token, **_call())[0]

        _each(one, pairs)

    def delete_objects(self, bucket: str, keys: list[str]) -> None:
        def one(key: str) -> None:
            with contextlib.suppress(gx.NotFound):
                _blob(bucket, key).delete(**_call())

        _each(one, keys)
