"""Limits on every call to a remote store, so that a frozen endpoint ends the attempt instead of hanging it; the
limits' names, defaults and text form are runner/api/store_limits.py (connect, read, stall, deadline).

Set them with FINETUNE_STORE_TIMEOUTS="connect=10,read=30,stall=90,deadline=10800" (any subset; on a cluster the
chart's runner.storeTimeouts sets it, the ceiling), a job's spec.storeTimeouts tightens them (`apply_job`). A
request past its connect or read limit is retried by the store's client (AWS_MAX_ATTEMPTS for S3); once its
operation's endpoint has left a request unanswered for `stall` seconds, or the operation is past its deadline, no
further request starts and the operation fails with a StoreTimeout: exit 75 (retryable), the endpoint named.
`operation()` marks one operation; `sending(endpoint)` is called before every request (a botocore `before-send`
handler, an httpx request hook) and raises when an operation in progress is stalled or late; `answered(endpoint)`
is called on every answer (headers received).
"""
from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from runner.api import names
from runner.api.errors import INVALID_SPEC, PermanentError, RetryableError
from runner.api.cluster import StoreTimeouts
from runner.api.store_limits import StoreLimits as Limits

ENV = names.ENV_STORE_TIMEOUTS


def limits() -> Limits:
    """The limits in the environment now (a bad value: a PermanentError naming the variable and the fix)."""
    try:
        return Limits.parse(os.environ.get(ENV, "").strip(), ENV)
    except ValueError as e:
        raise PermanentError(str(e), reason=INVALID_SPEC) from None


def apply_job(job: StoreTimeouts | None, log: Callable[[str], None]) -> Limits:
    """The job's spec.storeTimeouts, within the environment's limits (the ceiling), made this process's and its
    children's limits (the environment variable rewritten)."""
    ceiling = limits()
    got, cut = ceiling.tightened(job)
    for line in cut:
        log(line)
    if got != ceiling:
        os.environ[ENV] = got.describe()
    return got


class StoreTimeout(RetryableError):
    """A store operation ran past its deadline (the endpoint froze, or crawled)."""


@dataclass
class _Op:
    what: str
    endpoint: str
    reason: str
    started: float
    limits: Limits


_ops: dict[int, _Op] = {}
_waiting: dict[str, float] = {}  # endpoint -> since when a request to it waits, with no answer from it since
_lock = threading.Lock()
_ids = itertools.count()


def sending(store: str, *_args, **_kwargs) -> None:
    """A request to `store` (an endpoint as operations name it) is about to be sent: `check()` first, then it
    waits for an answer."""
    check()
    now = time.monotonic()
    with _lock:
        _waiting.setdefault(store, now)


def answered(store: str, *_args, **_kwargs) -> None:
    """The endpoint answered a request (any answer, an error too): it is not frozen. A long body streamed after
    its answer makes no request wait meanwhile, so it never counts as silence."""
    with _lock:
        _waiting.pop(store, None)


@contextlib.contextmanager
def operation(what: str, endpoint: str, reason: str) -> Iterator[None]:
    """One store operation (`what`: "download s3://b/p") against `endpoint` ("the S3 endpoint http://..."),
    which must end within the deadline."""
    op_id = next(_ids)
    op = _Op(what, endpoint, reason, time.monotonic(), limits())
    with _lock:
        _ops[op_id] = op
    try:
        yield
    finally:
        with _lock:
            _ops.pop(op_id, None)


def check(*_args, **_kwargs) -> None:
    """Raise StoreTimeout when an operation in progress has had no answer from its endpoint for `stall` seconds,
    or is past its deadline (called before each request)."""
    now = time.monotonic()
    with _lock:
        ops = list(_ops.values())
        waiting = dict(_waiting)
    for op in sorted(ops, key=lambda o: o.started):
        silent = now - max(op.started, waiting.get(op.endpoint, now))
        if silent >= op.limits.stall:
            raise StoreTimeout(
                f"cannot {op.what}: {op.endpoint} has not answered for {silent:.0f}s (stall={op.limits.stall:g}: "
                f"{ENV}={op.limits.describe()}); the endpoint froze or the network to it is down. The attempt ends "
                "here so that a retry can start; if it persists check the endpoint and the network",
                reason=op.reason)
        if now - op.started >= op.limits.deadline:
            raise StoreTimeout(
                f"cannot {op.what}: {op.endpoint} did not finish it within {op.limits.deadline:g}s (the deadline for "
                f"one store operation; {ENV}={op.limits.describe()}); the endpoint is too slow. Retrying may help; "
                f"if it persists check the endpoint and the network, or raise the deadline in {ENV}",
                reason=op.reason)
