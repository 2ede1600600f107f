"""Leader election over a coordination.k8s.io/v1 Lease, as client-go's leaderelection package does it.

Every replica serves health, metrics and the admission webhook; only the one holding the Lease reconciles.

  acquire()  tries every `retry_period` until the Lease is free: no holder, or its renewTime older than its
             leaseDurationSeconds (as seen by this replica's clock since it last saw the record change, so clock
             skew between replicas does not matter), then writes itself in with the Lease's resourceVersion (the
             API server refuses the write of the loser of a race)
  renew()    the holder re-writes renewTime every `retry_period`; if it has not managed to within
             `renew_deadline`, it has lost the lease: the process exits (the pod restarts as a standby), since
             another replica may already be acting
  release()  on a clean stop the holder empties holderIdentity, so a standby takes over at its next retry
             instead of after a whole lease duration

Defaults are client-go's: lease duration 15 s, renew deadline 10 s, retry period 2 s.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from kubernetes.client.exceptions import ApiException

from controller.kube import Kube, ns_path

log = logging.getLogger("controller.leader")
MICRO = "%Y-%m-%dT%H:%M:%S.%fZ"


@dataclass(frozen=True)
class Timing:
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self):
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError("leader election: need 0 < retry period < renew deadline < lease duration "
                             f"(got {self.retry_period}, {self.renew_deadline}, {self.lease_duration})")


def default_identity() -> str:
    """The pod's name ($POD_NAME, else the host name) and a random suffix, as client-go's callers do: a restarted
    container is a new candidate."""
    name = os.environ.get("POD_NAME") or os.environ.get("HOSTNAME") or socket.gethostname()
    return f"{name}_{uuid.uuid4().hex[:8]}"


def _now_text() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime(MICRO)


@dataclass
class Elector:
    kube: Kube
    namespace: str
    name: str
    identity: str = field(default_factory=default_identity)
    timing: Timing = field(default_factory=Timing)
    clock: callable = time.monotonic
    # what this replica last saw of the Lease, and when (its own clock)
    _seen: tuple | None = None
    _seen_at: float = 0.0
    _lease: dict | None = None
    _expires: float = 0.0  # when the Lease another holds expires unless renewed (this replica's clock)
    acquired_at: float | None = None
    stopping: threading.Event = field(default_factory=threading.Event)  # release() was called: stop trying

    @property
    def path(self) -> str:
        return ns_path("coordination.k8s.io/v1", self.namespace, "leases", self.name)

    def _get(self) -> dict | None:
        try:
            return self.kube.request("GET", self.path)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def _record(self, lease: dict | None) -> tuple:
        spec = (lease or {}).get("spec") or {}
        return (spec.get("holderIdentity"), spec.get("renewTime"), spec.get("leaseTransitions"))

    def try_acquire_or_renew(self) -> bool:
        """One attempt (client-go's tryAcquireOrRenew): True while this replica holds the Lease."""
        now = self.clock()
        lease = self._get()
        spec_new = {"holderIdentity": self.identity, "leaseDurationSeconds": int(self.timing.lease_duration),
                    "renewTime": _now_text()}
        if lease is None:
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": {**spec_new, "acquireTime": spec_new["renewTime"], "leaseTransitions": 0}}
            try:
                self._lease = self.kube.create(ns_path("coordination.k8s.io/v1", self.namespace, "leases"), body)
            except ApiException as e:
                if e.status == 409:
                    return False
                raise
            self._saw(self._lease, now)
            return True
        record = self._record(lease)
        if record != self._seen:
            self._saw(lease, now)
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity")
        duration = float(spec.get("leaseDurationSeconds") or self.timing.lease_duration)
        self._expires = self._seen_at + duration
        if holder and holder != self.identity and self._expires > now:
            return False  # held by another, and not expired
        new = dict(spec)
        new.update(spec_new)
        if holder != self.identity:
            new["acquireTime"] = spec_new["renewTime"]
            new["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (1 if holder else 0)
        body = {**lease, "spec": new}
        try:
            self._lease = self.kube.request("PUT", self.path, body)
        except ApiException as e:
            if e.status == 409:  # someone else wrote it meanwhile
                return False
            raise
        self._saw(self._lease, now)
        return True

    def _saw(self, lease: dict, now: float) -> None:
        self._seen, self._seen_at = self._record(lease), now

    def acquire(self) -> bool:
        """Block until this replica holds the Lease (True), or release() was called meanwhile (False)."""
        log.info("waiting for the leader lease %s/%s as %s", self.namespace, self.name, self.identity)
        while not self.stopping.is_set():
            try:
                if self.try_acquire_or_renew():
                    self.acquired_at = self.clock()
                    log.info("became the leader (lease %s/%s, %s)", self.namespace, self.name, self.identity)
                    return True
            except ApiException as e:
                log.warning("leader lease: %s %s (retrying)", e.status, e.reason)
            except OSError as e:
                log.warning("leader lease: %s (retrying)", e)
            # the next try at the retry period, or right when the holder's Lease expires if that is sooner
            self.stopping.wait(min(self.timing.retry_period, max(0.05, self._expires - self.clock() + 0.05)))
        return False

    def keep(self) -> bool:
        """Renew every retry period; return True once the Lease could not be renewed within the renew deadline
        (or was taken), False when release() was called."""
        last = self.clock()
        while True:
            if self.stopping.wait(self.timing.retry_period):
                return False
            try:
                if self.try_acquire_or_renew():
                    last = self.clock()
                    continue
                log.error("leader lease %s/%s taken by %s", self.namespace, self.name, self._seen and self._seen[0])
                return True
            except (ApiException, OSError) as e:
                log.warning("leader lease: could not renew (%s)", e)
            if self.clock() - last > self.timing.renew_deadline:
                log.error("leader lease %s/%s: not renewed within %.0f s", self.namespace, self.name,
                          self.timing.renew_deadline)
                return True

    def release(self) -> None:
        """Stop trying, and give the Lease up if held (a clean stop): a standby takes over at its next retry."""
        self.stopping.set()
        for _ in range(3):  # (a renewal in flight may have moved the resourceVersion)
            try:
                lease = self._get()
                if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                    return
                body = {**lease, "spec": {**lease["spec"], "holderIdentity": None, "leaseDurationSeconds": 1,
                                          "renewTime": _now_text()}}
                self.kube.request("PUT", self.path, body)
                log.info("released the leader lease %s/%s", self.namespace, self.name)
                return
            except ApiException as e:
                if e.status != 409:
                    log.warning("leader lease: could not release (%s)", e)
                    return
            except OSError as e:
                log.warning("leader lease: could not release (%s)", e)
                return


__all__ = ["Elector", "Timing", "default_identity"]
