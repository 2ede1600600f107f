"""Limits on every call to a remote store, so that a frozen endpoint ends the run instead of hanging it.

    connect    seconds to open a connection (default 10)
    read       seconds to wait for the next byte of an answer, or to send the next byte (default 60)
    deadline   seconds one store operation may take in all, retries included (default 10800 = 3 h): a download,
               a publish, a checkpoint save, a lease renewal

Set them with FINETUNE_STORE_TIMEOUTS="connect=10,read=60,deadline=10800" (any subset). A request past its
connect or read limit is retried by the store's client (AWS_MAX_ATTEMPTS for S3); once the operation's deadline
has passed, no further request starts and the operation fails with a StoreTimeout: exit 75 (retryable), the
endpoint named. `operation()` marks one operation; `check()` is called before every request (a botocore
`before-send` handler, an httpx request hook) and raises when an operation in progress is past its deadline.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from runner.api import names
from runner.api.errors import INVALID_SPEC, PermanentError, RetryableError

DEFAULTS = {"connect": 10.0, "read": 60.0, "deadline": 3 * 3600.0}
ENV = names.ENV_STORE_TIMEOUTS


@dataclass(frozen=True)
class Limits:
    connect: float
    read: float
    deadline: float

    def describe(self) -> str:
        return f"connect={self.connect:g},read={self.read:g},deadline={self.deadline:g}"


def limits() -> Limits:
    """The limits in the environment now (a bad value: a PermanentError naming the variable and the fix)."""
    raw = os.environ.get(ENV, "").strip()
    values = dict(DEFAULTS)
    for part in filter(None, (p.strip() for p in raw.replace(";", ",").split(","))):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        try:
            number = float(value) if sep and key in values else None
        except ValueError:
            number = None
        if number is None or not (0 < number < 1e7):
            raise PermanentError(
                f"{ENV}={raw!r}: {part!r} is not a limit; write it as 'connect=10,read=60,deadline=10800' "
                "(seconds, each above 0; any subset), or unset it for those defaults", reason=INVALID_SPEC)
        values[key] = number
    return Limits(**values)


class StoreTimeout(RetryableError):
    """A store operation ran past its deadline (the endpoint froze, or crawled)."""


@dataclass
class _Op:
    what: str
    endpoint: str
    reason: str
    deadline: float
    limit: float


_ops: dict[int, _Op] = {}
_lock = threading.Lock()
_ids = itertools.count()


@contextlib.contextmanager
def operation(what: str, endpoint: str, reason: str) -> Iterator[None]:
    """One store operation (`what`: "download s3://b/p") against `endpoint` ("the S3 endpoint http://..."),
    which must end within the deadline."""
    limit = limits().deadline
    op_id = next(_ids)
    with _lock:
        _ops[op_id] = _Op(what, endpoint, reason, time.monotonic() + limit, limit)
    try:
        yield
    finally:
        with _lock:
            _ops.pop(op_id, None)


def check(*_args, **_kwargs) -> None:
    """Raise StoreTimeout when an operation in progress is past its deadline (called before each request)."""
    now = time.monotonic()
    with _lock:
        late = [op for op in _ops.values() if op.deadline <= now]
    if late:
        op = min(late, key=lambda o: o.deadline)
        raise StoreTimeout(
            f"cannot {op.what}: {op.endpoint} did not finish it within {op.limit:g}s (the deadline for one store "
            f"operation; {ENV}={limits().describe()}); the endpoint stopped answering or is too slow. Retrying "
            f"may help; if it persists check the endpoint and the network, or raise the deadline in {ENV}",
            reason=op.reason)

