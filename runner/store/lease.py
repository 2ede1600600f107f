"""One writer per checkpoint location: a lease object `<location>/LEASE` that a run's rank 0 holds while it
reads and writes checkpoints there.

Local: created with O_CREAT|O_EXCL; renewed by replacing it (after checking it is still ours). S3: created with
PutObject IfNoneMatch='*'; renewed with IfMatch=<our etag>; released with DeleteObject IfMatch=<our etag>.
It holds JSON {owner, token, acquired, heartbeat}. The holder renews it on every checkpoint save and from a
background thread every `interval` seconds (default 30) - also during a pod's termination grace (120 s), since
the process still runs then. A lease is stale when a waiter has watched it unchanged for `ttl` seconds (default
3 x interval = 90 s), measured on the waiter's own monotonic clock, so clock skew between nodes cannot make a
live lease look stale; a stale lease is taken over atomically (S3: PutObject IfMatch=<the stale etag>; local:
rename it aside, then an exclusive create). A waiter gives up after `wait` seconds (FINETUNE_LEASE_WAIT,
default 300 s > grace + ttl) with a RetryableError naming the location and the holder.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from runner.api import names
from runner.api.errors import TRAINING_FAILED, UPLOAD_FAILED, RetryableError

from . import s3

LEASE = "LEASE"
INTERVAL = 30.0
WAIT = 300.0


def default_owner() -> str:
    who = os.environ.get(names.ENV_POD_NAME) or socket.gethostname()
    return (f"{who} pid {os.getpid()} job {os.environ.get(names.ENV_JOB_NAME) or '-'} "
            f"attempt {os.environ.get(names.ENV_ATTEMPT) or '-'}")


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
        self._etag: str | None = None
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
        self.log(f"holding the lease on {self.uri} as {self.owner}")
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

    def _mine(self, raw: bytes | None) -> bool:
        try:
            return raw is not None and json.loads(raw).get("token") == self.token
        except (ValueError, AttributeError):
            return False

    # ------------------------------------------------------------------------------------------ store ops
    def _path(self) -> Path:
        return Path(self.loc.path) / LEASE

    def _key(self) -> str:
        return f"{self.loc.path}/{LEASE}" if self.loc.path else LEASE

    def _s3(self, action: str):
        return s3.errors(f"{action} the lease on", self.uri, self.loc.bucket, UPLOAD_FAILED)

    def _create(self, body: bytes) -> bool:
        if self.loc.scheme == "s3":
            with self._s3("create"):
                try:
                    self._etag = s3.client().put_object(Bucket=self.loc.bucket, Key=self._key(), Body=body,
                                                        IfNoneMatch="*")["ETag"]
                    return True
                except Exception as e:  # noqa: BLE001
                    if _precondition_failed(e):
                        return False
                    raise
        self._path().parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self._path(), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        return True

    def _read(self) -> tuple[bytes, str | None] | None:
        if self.loc.scheme == "s3":
            with self._s3("read"):
                try:
                    r = s3.client().get_object(Bucket=self.loc.bucket, Key=self._key())
                except Exception as e:  # noqa: BLE001
                    if _code(e) in ("NoSuchKey", "404"):
                        return None
                    raise
                return r["Body"].read(), r["ETag"]
        try:
            return self._path().read_bytes(), None
        except FileNotFoundError:
            return None

    def _replace(self, body: bytes, etag: str | None = None) -> bool:
        """Overwrite the lease if it is still ours (S3: still `etag`, ours by default)."""
        if self.loc.scheme == "s3":
            with self._s3("renew"):
                try:
                    self._etag = s3.client().put_object(Bucket=self.loc.bucket, Key=self._key(), Body=body,
                                                        IfMatch=etag or self._etag)["ETag"]
                    return True
                except Exception as e:  # noqa: BLE001
                    if _precondition_failed(e) or _code(e) in ("NoSuchKey", "404"):
                        return False
                    raise
        current = self._read()
        if current is None or not self._mine(current[0]):
            return False
        tmp = self._path().with_name(f".{LEASE}.{self.token}")
        tmp.write_bytes(body)
        os.replace(tmp, self._path())
        return True

    def _take_over(self, stale: tuple[bytes, str | None]) -> bool:
        if self.loc.scheme == "s3":
            return self._replace(self._body(), etag=stale[1])
        aside = self._path().with_name(f".{LEASE}.stale-{self.token}")
        try:
            os.rename(self._path(), aside)
        except FileNotFoundError:
            return False
        if aside.read_bytes() != stale[0]:  # renewed or re-created meanwhile: put it back, it is not stale
            try:
                os.link(aside, self._path())
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return self._create(self._body())

    def _delete(self) -> None:
        if self.loc.scheme == "s3":
            with self._s3("release"):
                try:
                    s3.client().delete_object(Bucket=self.loc.bucket, Key=self._key(), IfMatch=self._etag)
                except Exception as e:  # noqa: BLE001
                    if not (_precondition_failed(e) or _code(e) in ("NoSuchKey", "404")):
                        raise
            return
        current = self._read()
        if current is not None and self._mine(current[0]):
            self._path().unlink(missing_ok=True)


def _code(e: BaseException) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code") or "")


def _precondition_failed(e: BaseException) -> bool:
    status = getattr(e, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
    return _code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict") or status in (409, 412)


def _env_seconds(name: str, default: float) -> float:
    try:
        return max(0.0, float(os.environ.get(name) or default))
    except ValueError:
        return default
