"""What a FineTuneJob's status is, and what the controller must do next: pure functions of what is observed.

    compute(ftj, jobs, pods, now=...) -> dict        the controller-owned status fields
    assess(ftj, jobs, pods, now=...) -> Assessment   the same status, plus actions, events and a requeue time

Inputs are plain dicts as the API server returns them: the FineTuneJob (its spec, metadata and the status
fields the runner reports), its attempts' Jobs (JobSets with several nodes: controller/jobset.py) and their Pods.
Nothing is remembered between passes, so a restarted controller computes the same status and takes the same
actions. Each concern (deadline, backoff, suspend, TTL, the admin's policy...) is one module of
controller/policies/, which says what it decides; `assess` only orders them and combines their results, and
this module adds the conditions and Events that follow from the new status.
"""
from __future__ import annotations

import time

from controller.attempts import clip, format_time
from controller.policies import (
    active, admission, backoff, bounds, cost, deadline, finished, next_attempt, outcome, spec_change, suspend, ttl,
)
from controller.policies.observed import Observed, Options, observe
from controller.policies.results import Assessment, Event
from runner.api import status as contract

# 1. The first of these that decides the job (Succeeded or Failed) gives the verdict.
VERDICTS = (bounds.spec_out_of_bounds, bounds.status_invalid, outcome.succeeded, outcome.permanent_failure,
            deadline.exceeded, backoff.exhausted, admission.refused_by_policy, admission.unattributed_secrets,
            admission.needs_jobsets, admission.invalid_spec)
# 2. Without a verdict, the first of these that applies gives the phase (the last one always does).
PHASES = (finished.kept, suspend.suspended, active.phase, next_attempt.start)
# 3. Then every one of these, from the new status.
AFTERWARDS = (deadline.wake, finished.revoke_identity, ttl.clean_up)


def compute(ftj: dict, jobs: list[dict], pods: list[dict], *, now: float | None = None,
            options: Options = Options(), has_identity: bool = False, no_jobsets: str | None = None) -> dict:
    """The controller-owned status fields of `ftj`, rebuilt from its Jobs and Pods."""
    return assess(ftj, jobs, pods, now=now, options=options, has_identity=has_identity,
                  no_jobsets=no_jobsets).status


def assess(ftj: dict, jobs: list[dict], pods: list[dict], *, now: float | None = None,
           options: Options = Options(), has_identity: bool = False, no_jobsets: str | None = None) -> Assessment:
    """Status, actions and events for one pass. `jobs`: the attempts' Jobs and JobSets. `has_identity`: the
    runner's RoleBinding exists. `no_jobsets`: why JobSets cannot be created (not installed), or None."""
    now = time.time() if now is None else now
    o = observe(ftj, jobs, pods, now=now, options=options, has_identity=has_identity, no_jobsets=no_jobsets)
    a = Assessment(_observed_fields(o))
    a.apply(spec_change.changed(o))
    verdict = _first(rule(o) for rule in VERDICTS)
    a.apply(finished.decided(o, verdict) if verdict else _first(rule(o) for rule in PHASES))
    for rule in AFTERWARDS:
        a.apply(rule(o, a))
    finalize(a, ftj, now)
    return a


def _first(results):
    return next((r for r in results if r is not None), None)


def _observed_fields(o: Observed) -> dict:
    return {"observedGeneration": o.ftj["metadata"].get("generation"),
            "attempt": o.last.index if o.last else None, "jobName": o.last.name if o.last else None,
            "failedAttempts": o.counted, "startTime": format_time(o.start) if o.start else None,
            "estimate": cost.estimate(o)}


def finalize(a: Assessment, ftj: dict, now: float) -> None:
    """Conditions and Events that follow from the new status (and the previous one)."""
    old = ftj.get("status") or {}
    a.status["conditions"] = _conditions(old, a.status, ftj["metadata"].get("generation"), now)
    _events(a, old)


def _conditions(old: dict, s: dict, generation: int | None, now: float) -> list[dict]:
    phase = s.get("phase")
    running = phase in (contract.RUNNING, *contract.ACTIVE_RUNNER_PHASES)
    want = [
        (contract.CONDITION_SUCCEEDED, phase == contract.SUCCEEDED, phase, s.get("message") if phase == contract.SUCCEEDED
         else ""),
        (contract.CONDITION_FAILED, phase == contract.FAILED, s.get("reason") if phase == contract.FAILED else phase,
         s.get("message") if phase == contract.FAILED else ""),
        (contract.CONDITION_RUNNING, running, phase, ""),
        (contract.CONDITION_SUSPENDED, phase == contract.SUSPENDED, phase, ""),
    ]
    before = {c.get("type"): c for c in old.get("conditions") or []}
    out = []
    for type_, ok, reason, message in want:
        status = "True" if ok else "False"
        prev = before.get(type_)
        ltt = prev.get("lastTransitionTime") if prev and prev.get("status") == status else None
        c = {"type": type_, "status": status, "reason": reason or "Unknown",
             "lastTransitionTime": ltt or format_time(now), "observedGeneration": generation}
        if message:  # (an empty string comes back as null from some API servers)
            c["message"] = message
        out.append(c)
    return out


def _events(a: Assessment, old: dict) -> None:
    s = a.status
    if (s.get("failedAttempts") or 0) > (old.get("failedAttempts") or 0) and s.get("phase") != contract.FAILED:
        a.events.append(Event("Warning", contract.EVENT_ATTEMPT_FAILED, clip(s.get("message") or "an attempt failed")))
    if s.get("phase") != old.get("phase"):
        failed = s.get("phase") == contract.FAILED
        text = s.get("message") or s.get("phase") or ""
        a.events.append(Event("Warning" if failed else "Normal",
                              (s.get("reason") or contract.FAILED) if failed else str(s.get("phase")), clip(text)))
    elif s.get("reason") != old.get("reason") and s.get("reason"):
        a.events.append(Event("Warning", s["reason"], clip(s.get("message") or "")))
