"""The boto3 client of S3 and S3-compatible stores (MinIO, Ceph, R2, ...), configured from the standard AWS_* env:
its errors as RunnerErrors, its transfers of many objects (multipart upload, concurrent download, server-side
copy, delete).

A client is built per call from the environment as it is then: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_REGION / AWS_DEFAULT_REGION (default us-east-1), AWS_ENDPOINT_URL_S3 or
AWS_ENDPOINT_URL (path-style addressing when set), AWS_MAX_ATTEMPTS (default 5, standard retry mode), and
FINETUNE_STORE_TIMEOUTS (runner/store/timeouts.py: connect and read timeouts, a deadline per operation).
The Backend is runner/store/s3.py (the object-store primitives); what it does with them is runner/store/objects.py.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from runner.api.errors import PermanentError, RetryableError, RunnerError

from . import timeouts

MIB = 1 << 20
MULTIPART_THRESHOLD = 8 * MIB
MULTIPART_CHUNKSIZE = 8 * MIB
MAX_CONCURRENCY = 8
CREDENTIALS_HINT = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary credentials), "
    "and AWS_ENDPOINT_URL_S3 for an S3-compatible store"
)
_PERMISSION_CODES = {
    "AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
    "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "AccountProblem", "InvalidSecurity", "401",
}
_RETRYABLE_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed", "InternalError",
    "ServiceUnavailable", "RequestLimitExceeded", "BandwidthLimitExceeded", "TooManyRequests", "429",
}


# ---------------------------------------------------------------------------------------------- client
def endpoint_url() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


_cache: dict[tuple, tuple] = {}
_cache_lock = threading.Lock()


def _session_and_client():
    """A (session, client) for the AWS_* environment as it is now. Building one costs ~0.1-0.2 s (botocore
    loads its service model), so it is kept per distinct AWS_* environment: any change gives a new one.
    boto3 clients are thread-safe."""
    key = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_") or k == timeouts.ENV))
    with _cache_lock:
        hit = _cache.get(key)
        if hit is None:
            if len(_cache) >= 8:
                _cache.clear()
            hit = _cache[key] = _build()
        return hit


def client():
    return _session_and_client()[1]


def has_credentials() -> bool:
    return _session_and_client()[0].get_credentials() is not None


def _build():
    import boto3
    from botocore.config import Config

    endpoint = endpoint_url()
    limits = timeouts.limits()
    options: dict = {
        "retries": {"max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS") or 5), "mode": "standard"},
        "connect_timeout": limits.connect,
        "read_timeout": limits.read,
        "max_pool_connections": 4 * MAX_CONCURRENCY,
    }
    if endpoint:
        options["s3"] = {"addressing_style": "path"}
        # Most S3-compatible stores reject the CRC checksums recent botocore adds to every upload by default.
        if not os.environ.get("AWS_REQUEST_CHECKSUM_CALCULATION"):
            options["request_checksum_calculation"] = "when_required"
        if not os.environ.get("AWS_RESPONSE_CHECKSUM_VALIDATION"):
            options["response_checksum_validation"] = "when_required"
    try:
        config = Config(**options)
    except TypeError:  # botocore before 1.36 has no checksum options
        options.pop("request_checksum_calculation", None)
        options.pop("response_checksum_validation", None)
        config = Config(**options)
    session = boto3.session.Session(region_name=region())
    c = session.client("s3", endpoint_url=endpoint, config=config)
    here = where()  # as the operations name their endpoint
    c.meta.events.register("before-send.s3", functools.partial(timeouts.sending, here))  # none starts stalled or late
    c.meta.events.register("needs-retry.s3", functools.partial(_answered, here))
    return session, c


def _answered(store: str, response=None, **_kwargs) -> None:
    """After each attempt: an answer (any status) means the endpoint is alive; None lets botocore decide a retry."""
    if response is not None:
        timeouts.answered(store)


def transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD,
        multipart_chunksize=MULTIPART_CHUNKSIZE,
        max_concurrency=MAX_CONCURRENCY,
        use_threads=True,
    )


def where() -> str:
    return f"the S3 endpoint {endpoint_url()}" if endpoint_url() else f"AWS S3 ({region()})"


# ---------------------------------------------------------------------------------------------- errors
def translate(exc: BaseException, *, action: str, uri: str, bucket: str | None, reason: str) -> RunnerError | None:
    """The RunnerError for a boto3/botocore failure, or None when it is not a storage failure at all."""
    from botocore import exceptions as bx

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:  # boto3 wraps ClientErrors: S3UploadFailedError, RetriesExceeded
        seen.add(id(e))
        if isinstance(e, RunnerError):
            return e
        if isinstance(e, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            return PermanentError(f"cannot {action} {uri}: no AWS credentials found; {CREDENTIALS_HINT}",
                                  reason=reason)
        if isinstance(e, bx.ClientError):
            return _client_error(e, action=action, uri=uri, bucket=bucket, reason=reason)
        if isinstance(e, (bx.EndpointConnectionError, bx.ConnectionClosedError, bx.ReadTimeoutError,
                          bx.ConnectTimeoutError, bx.ConnectionError, bx.HTTPClientError)):
            return RetryableError(
                f"cannot {action} {uri}: could not reach {where()} ({type(e).__name__}; "
                f"{timeouts.ENV}={timeouts.limits().describe()}); retrying may help; if it persists check "
                "AWS_ENDPOINT_URL_S3 and the network",
                reason=reason,
            )
        last = getattr(e, "last_exception", None)
        e = last if isinstance(last, BaseException) else (e.__cause__ or e.__context__)
    return None


def _client_error(e, *, action: str, uri: str, bucket: str | None, reason: str) -> RunnerError:
    err = e.response.get("Error", {}) or {}
    code = str(err.get("Code") or "")
    status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    op = getattr(e, "operation_name", "") or ""
    what = f"cannot {action} {uri}"
    if code == "NoSuchBucket" or (op == "HeadBucket" and code in ("404", "NotFound")):
        return PermanentError(
            f"{what}: bucket '{bucket}' does not exist at {where()}; create it, or fix the bucket in the URI "
            "(or AWS_ENDPOINT_URL_S3 if the bucket lives in another store)",
            reason=reason,
        )
    if code in ("NoSuchKey", "404", "NotFound") or status == 404:
        return PermanentError(f"{what}: nothing found there ({code or status}); fix the key or upload the files",
                              reason=reason)
    if code in _PERMISSION_CODES or status in (401, 403):
        return PermanentError(
            f"{what}: {where()} refused the request ({code or status}); check that AWS_ACCESS_KEY_ID / "
            f"AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) are right and allow s3:ListBucket, s3:GetObject, "
            f"s3:PutObject and s3:DeleteObject on bucket '{bucket}'",
            reason=reason,
        )
    if code in _RETRYABLE_CODES or status >= 500 or status == 429:
        return RetryableError(f"{what}: {where()} answered {code or status} (transient); retrying may help",
                              reason=reason)
    return PermanentError(f"{what}: {where()} answered {code or status}: {err.get('Message', '')}", reason=reason)


# ---------------------------------------------------------------------------------------------- transfers
def delete_keys(c, bucket: str, keys: list[str]) -> None:
    # One DeleteObject per key: DeleteObjects needs Content-MD5 that several S3-compatible stores handle badly.
    if keys:
        with ThreadPoolExecutor(max_workers=min(MAX_CONCURRENCY, len(keys))) as pool:
            list(pool.map(lambda k: c.delete_object(Bucket=bucket, Key=k), keys))


def _open_source(path: Path):
    """Opens a file to upload (a seam: tests inject read failures here)."""
    return open(path, "rb")


def upload_files(c, bucket: str, items: list[tuple[Path, str]]) -> None:
    """Upload (path, key) pairs concurrently, multipart above MULTIPART_THRESHOLD; raises on the first failure
    (s3transfer aborts the multipart uploads it started)."""
    from boto3.s3.transfer import create_transfer_manager

    with contextlib.ExitStack() as stack:
        manager = stack.enter_context(create_transfer_manager(c, transfer_config()))
        futures = []
        for path, key in items:
            f = stack.enter_context(_open_source(path))
            futures.append(manager.upload(f, bucket, key))
        for fut in futures:
            fut.result()


def download_objects(c, bucket: str, items: list[tuple[str, Path]]) -> None:
    """Download (key, path) pairs concurrently; each file lands under a temp name and is renamed into place."""
    config = transfer_config()

    def one(item: tuple[str, Path]) -> None:
        key, target = item
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part-{uuid.uuid4().hex[:8]}")
        try:
            c.download_file(bucket, key, str(tmp), Config=config)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    if items:
        with ThreadPoolExecutor(max_workers=min(4, len(items))) as pool:
            list(pool.map(one, items))


def copy_keys(c, bucket: str, pairs: list[tuple[str, str]]) -> None:
    """Server-side copies (multipart above the threshold), concurrently; raises on the first failure."""
    from boto3.s3.transfer import create_transfer_manager

    with create_transfer_manager(c, transfer_config()) as manager:
        futures = [manager.copy({"Bucket": bucket, "Key": src}, bucket, dst) for src, dst in pairs]
        for fut in futures:
            fut.result()
