"""One writer per checkpoint location: a lease object `<location>/LEASE` that a run's rank 0 holds while it
reads and writes checkpoints there.

Written only with the Backend's conditional writes: created if absent; renewed by replacing it if it is
unchanged since our last write (its version: S3's ETag, a digest of a local file's bytes, ...); released by
deleting it if unchanged. It holds JSON {owner, token, acquired, heartbeat}. The holder renews it on every
checkpoint save and from a background thread every `interval` seconds (default 30) - also during a pod's
termination grace (120 s), since the process still runs then. A lease is stale when a waiter has watched it
unchanged for `ttl` seconds (default 3 x interval = 90 s), measured on the waiter's own monotonic clock, so clock
skew between nodes cannot make a live lease look stale; a stale lease is taken over atomically (replaced if still
at the stale version). A waiter gives up after `wait` seconds (FINETUNE_LEASE_WAIT, default 300 s > grace + ttl)
with a RetryableError naming the location and the holder.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from runner.api import names
from runner.api.errors import TRAINING_FAILED, UPLOAD_FAILED, RetryableError

from .backend import backend_for

LEASE = "LEASE"
INTERVAL = 30.0
WAIT = 300.0


def default_owner() -> str:
    """Who holds the lease, in words: "process 123 on host" (", job J, attempt N" under the controller)."""
    who = os.environ.get(names.ENV_POD_NAME) or socket.gethostname()
    job, attempt = os.environ.get(names.ENV_JOB_NAME), os.environ.get(names.ENV_ATTEMPT)
    return (f"process {os.getpid()} on {who}" + (f", job {job}" if job else "")
            + (f", attempt {attempt}" if attempt else ""))


class Lease:
    def __init__(self, loc, *, interval: float = INTERVAL, ttl: float | None = None, wait: float | None = None,
                 log=None):
        self.loc, self.uri = loc, str(loc)
        self.interval = interval
        self.ttl = 3 * interval if ttl is None else ttl
        self.wait = _env_seconds(names.ENV_LEASE_WAIT, WAIT) if wait is None else wait
        self.log = log or (lambda msg: None)
        self.token = uuid.uuid4().hex
        self.owner: str | None = None
        self.acquired: float | None = None
        self.held = False
        self.lost: str | None = None
        self.backend = backend_for(loc)
        self._version: str | None = None  # the lease's version since our last write (Backend.Versioned)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------ public
    def acquire(self, owner: str | None = None) -> None:
        self.owner = owner or default_owner()
        deadline, seen, since = time.monotonic() + self.wait, None, time.monotonic()
        while True:
            self.acquired = time.time()
            if self._create(self._body()):
                break
            current = self._read()  # (raw bytes, etag) or None when it went away meanwhile
            if current is None:
                continue
            if current != seen:
                seen, since = current, time.monotonic()
            elif time.monotonic() - since >= self.ttl:
                self.log(f"taking over a stale lease on {self.uri}: {self._describe(current[0])}, unchanged for "
                         f"{time.monotonic() - since:.0f}s")
                if self._take_over(current):
                    break
                seen = None
                continue
            if time.monotonic() >= deadline:
                raise RetryableError(
                    f"checkpoint location {self.uri} is in use by another runner ({self._describe(current[0])}); "
                    f"waited {self.wait:.0f}s for its lease. Two runners must not write the same checkpoints: "
                    f"wait for the other one to stop (a deleted job's pod may still be in its grace period), "
                    f"or set output.checkpoints to another place; a lease left by a crashed runner is taken "
                    f"over once it has not been renewed for {self.ttl:.0f}s", reason=TRAINING_FAILED)
            time.sleep(max(0.05, min(1.0, self.interval / 10, deadline - time.monotonic())))
        self.held = True
        self.log(f"checkpoints go to {self.uri}; no other run writes there while this one works ({self.owner})")
        self._thread = threading.Thread(target=self._beat, name="checkpoint-lease", daemon=True)
        self._thread.start()

    def renew(self) -> None:
        """Heartbeat; raises RetryableError when the lease was lost (taken over by another runner)."""
        with self._lock:
            if self.lost is None and not self._replace(self._body()):
                self.lost = (f"lost the lease on checkpoint location {self.uri} to another runner "
                             f"({self._describe((self._read() or (b'', None))[0])}); stopped writing there")
            if self.lost:
                raise RetryableError(self.lost, reason=UPLOAD_FAILED)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with self._lock:
            if self.held and self.lost is None:
                try:
                    self._delete()
                except Exception as e:  # noqa: BLE001 - a leftover lease only delays the next run by ttl
                    self.log(f"could not release the lease on {self.uri}: {e}")
            self.held = False

    def __enter__(self):
        if not self.held:
            self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    # ------------------------------------------------------------------------------------------ helpers
    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.renew()
            except RetryableError as e:
                self.log(str(e))
                return
            except Exception as e:  # noqa: BLE001 - a transient store error: the next beat tries again
                self.log(f"could not renew the lease on {self.uri}: {e}")

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "token": self.token, "acquired": self.acquired,
                           "heartbeat": time.time()}).encode()

    @staticmethod
    def _describe(raw: bytes) -> str:
        try:
            doc = json.loads(raw)
            return f"held by {doc.get('owner')}, last heartbeat {time.time() - float(doc['heartbeat']):.0f}s ago"
        except (ValueError, KeyError, TypeError):
            return "held by an unknown owner"

    # ------------------------------------------------------------------------------------------ store ops
    def _create(self, body: bytes) -> bool:
        version = self.backend.create_if_absent(self.loc, LEASE, body)
        if version is not None:
            self._version = version
        return version is not None

    def _read(self) -> tuple[bytes, str] | None:
        got = self.backend.read_versioned(self.loc, LEASE)
        return None if got is None else (got.data, got.version)

    def _replace(self, body: bytes, version: str | None = None) -> bool:
        """Overwrite the lease if it is unchanged since `version` (by default: since our own last write)."""
        expected = version or self._version
        new = None if expected is None else self.backend.replace_if_unchanged(self.loc, LEASE, body, expected)
        if new is not None:
            self._version = new
        return new is not None

    def _take_over(self, stale: tuple[bytes, str]) -> bool:
        return self._replace(self._body(), version=stale[1])

    def _delete(self) -> None:
        if self._version is not None:
            self.backend.delete_if_unchanged(self.loc, LEASE, self._version)


def _env_seconds(name: str, default: float) -> float:
    try:
        return max(0.0, float(os.environ.get(name) or default))
    except ValueError:
        return default
