"""What a FineTuneJob's status is, and what the controller must do next: pure functions of what is observed.

    compute(ftj, jobs, pods, now=...) -> dict        the controller-owned status fields
    assess(ftj, jobs, pods, now=...) -> Assessment   the same status, plus actions, events and a requeue time

Inputs are plain dicts as the API server returns them: the FineTuneJob (its spec, metadata and the status
fields the runner reports), its attempts' Jobs (JobSets with several nodes: controller/jobset.py) and their Pods. Nothing is remembered between passes, so a
restarted controller computes the same status and takes the same actions. How one attempt ended and why it
failed is controller/attempts.py.

When the counted failures exceed backoffLimit: Failed, BackoffLimitExceeded. The next attempt waits
`retry_backoff * 2**(failures-1)` seconds (capped) after the failure and resumes from the newest checkpoint
(the runner does that by itself when run again with the same spec).

Suspend deletes the active attempt's Job (the runner gets SIGTERM and saves a checkpoint); resume creates
the next attempt once every pod of the stopped one is gone, so two runners never share checkpoints.

A finished job stays finished: when no attempt is active and the observations would start a new one (the
Jobs were cleaned up by ttlSecondsAfterFinished, or backoffLimit was raised afterwards), the recorded
terminal status is kept. While an attempt is active, the status is always rebuilt from observations.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from controller import jobset, limits, naming
from controller.attempts import (
    CONFIG_WAITING, IMAGE_PULL_FATAL, IMAGE_PULL_WAITING, POD_FAILED, POD_RUNNING, POD_SUCCEEDED, Attempt,
    attempts_of, belongs, clip, deleting, format_time, owner_uid, parse_time, pod_phase, runner_container,
    terminated, true_condition,
)
from controller.naming import spec_hash
from controller.podtemplate import RunnerPod
from controller.policy import Policy
from runner.api import names, status as contract
from runner.api.errors import SpecError
from runner.api.parse import parse_job


@dataclass(frozen=True)
class Options:
    retry_backoff: float = 10.0  # seconds before the 1st retry; doubles per counted failure
    retry_backoff_max: float = 300.0
    image_pull_timeout: float = 300.0  # a pod that cannot pull its image (or find its Secret) this long fails
    policy: Policy = field(default_factory=Policy)  # what a spec may ask of the cluster (controller/policy.py)
    runner: RunnerPod = field(default_factory=RunnerPod)  # the admin's pod additions (controller/podtemplate.py)


def spec_problems(ftj: dict, spec: dict) -> list[str]:
    try:
        parse_job(naming.runner_manifest(ftj, spec))
    except SpecError as e:
        return e.problems
    return []


@dataclass
class Action:
    kind: str  # create-attempt | delete-job | revoke-identity
    name: str = ""
    attempt: int = 0
    spec: dict | None = None
    deadline_seconds: int | None = None
    resource: str = "jobs"  # what delete-job deletes: jobs, or jobsets (an attempt on several nodes)


def _delete(obj: dict) -> Action:
    return Action("delete-job", name=obj["metadata"]["name"],
                  resource=jobset.PLURAL if jobset.is_jobset(obj) else "jobs")


@dataclass
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Assessment:
    status: dict
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None

    def requeue(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)


def compute(ftj: dict, jobs: list[dict], pods: list[dict], *, now: float | None = None,
            options: Options = Options(), has_identity: bool = False, no_jobsets: str | None = None) -> dict:
    """The controller-owned status fields of `ftj`, rebuilt from its Jobs and Pods."""
    return assess(ftj, jobs, pods, now=now, options=options, has_identity=has_identity,
                  no_jobsets=no_jobsets).status


def assess(ftj: dict, jobs: list[dict], pods: list[dict], *, now: float | None = None,
           options: Options = Options(), has_identity: bool = False, no_jobsets: str | None = None) -> Assessment:
    """Status, actions and events for one pass. `jobs`: the attempts' Jobs and JobSets. `has_identity`: the
    runner's RoleBinding exists. `no_jobsets`: why JobSets cannot be created (not installed), or None."""
    import time

    now = time.time() if now is None else now
    md, spec = ftj["metadata"], ftj.get("spec") or {}
    old = ftj.get("status") or {}
    untrusted = limits.problems(ftj)  # what the watch cache set aside (controller/limits.py)
    uid = md.get("uid")
    jobs = [j for j in jobs if not uid or owner_uid(j, names.KIND) in (uid, None)]
    attempts = attempts_of(jobs, pods)
    # Pods still running outside a live attempt (its Job deleted), or in a failed one (a JobSet's other nodes
    # being stopped): the next attempt waits for them, so two runners never share checkpoints.
    settled = [x.job for x in attempts if x.outcome != "failed"]
    stopping: list[dict] = [p for p in pods if pod_phase(p) not in (POD_SUCCEEDED, POD_FAILED)
                            and not any(belongs(j, p) for j in settled)]
    stopping += [j for j in jobs if deleting(j)]

    s: dict[str, Any] = {"observedGeneration": md.get("generation")}
    a = Assessment(s)
    first = attempts[0] if attempts else None
    effective = _effective_spec(first, spec)
    last = attempts[-1] if attempts else None
    active = [x for x in attempts if x.outcome == "active"]
    failed = [x for x in attempts if x.outcome == "failed"]
    counted = sum(1 for x in failed if x.failure and x.failure.counted)
    succeeded = next((x for x in reversed(attempts) if x.outcome == "succeeded"), None)
    permanent = next((x for x in reversed(failed) if x.failure and not x.failure.retryable), None)
    starts = [parse_time((x.job.get("status") or {}).get("startTime") or x.job["metadata"].get("creationTimestamp"))
              for x in attempts]
    start = min((t for t in starts if t), default=None)
    backoff_limit = int(spec.get("backoffLimit", 3))
    deadline = spec.get("activeDeadlineSeconds")

    s["attempt"] = last.index if last else None
    s["jobName"] = last.name if last else None
    s["failedAttempts"] = counted
    s["startTime"] = format_time(start) if start else None

    if attempts and _changed_since_start(first, spec) and md.get("generation") != old.get("observedGeneration"):
        a.events.append(Event("Warning", "SpecChangeIgnored",
                               "the spec changed after the job started; only " + ", ".join(contract.MUTABLE_SPEC_FIELDS)
                               + " may change, the running job keeps its original spec (delete and re-create "
                               "the FineTuneJob to change it)"))

    verdict_time = None
    finished = old.get("phase") in contract.TERMINAL_PHASES and bool(true_condition(ftj, old["phase"]))
    if untrusted.get("spec"):  # out of bounds (controller/limits.py): the spec is not read at all
        s.update(phase=contract.FAILED, reason=contract.INVALID_SPEC,
                 message=clip(f"{untrusted['spec']}: the controller does not read a spec out of its bounds "
                              f"(depth {limits.SPEC_MAX_DEPTH}, {limits.SPEC_MAX_BYTES // 1024} KiB); delete the "
                              "FineTuneJob and create it with a valid spec"))
    elif untrusted.get("status") and not finished:  # a finished job keeps its verdict; the fields go
        s.update(phase=contract.FAILED, reason=contract.INVALID_STATUS,
                 message=clip("the status held invalid fields, written through the status subresource (by the "
                              "runner's identity or an admin): " + "; ".join(untrusted["status"].values())
                              + "; they were removed and the job stopped"))
    elif succeeded is not None:
        r = succeeded.result
        s.update(phase=contract.SUCCEEDED, reason=None, message=clip(f"attempt {succeeded.index} succeeded"),
                 output=limits.clean_output(r.get("output")), metrics=limits.clean_metrics(r.get("metrics")))
        term = terminated(succeeded.pod) if succeeded.pod else None
        verdict_time = (parse_time((term or {}).get("finishedAt"))
                        or parse_time((succeeded.job.get("status") or {}).get("completionTime")))
    elif permanent is not None:
        f = permanent.failure
        s.update(phase=contract.FAILED, reason=f.reason, message=clip(f"attempt {permanent.index}: {f.message}"))
        verdict_time = f.at
    elif deadline and start and now >= start + deadline:
        s.update(phase=contract.FAILED, reason=contract.DEADLINE_EXCEEDED,
                 message=f"the job ran longer than spec.activeDeadlineSeconds ({deadline}s)")
        verdict_time = start + deadline
    elif not active and counted > backoff_limit:
        f = failed[-1].failure
        s.update(phase=contract.FAILED, reason=contract.BACKOFF_LIMIT_EXCEEDED,
                 message=clip(f"{counted} attempts failed (backoffLimit {backoff_limit}); last: {f.reason}: "
                               f"{f.message}"))
        verdict_time = f.at
    elif not active and not finished and (refused := options.policy.refusals(effective)):
        # before any Job exists (and before every retry: the policy may have changed meanwhile)
        s.update(phase=contract.FAILED, reason=contract.INVALID_SPEC, message=clip("; ".join(refused)))
    elif not active and not finished and no_jobsets and jobset.nodes_of(effective) > 1:
        s.update(phase=contract.FAILED, reason=contract.INVALID_SPEC, message=clip(no_jobsets))
    elif not attempts and (problems := spec_problems(ftj, effective)):
        s.update(phase=contract.FAILED, reason=contract.INVALID_SPEC, message=clip("; ".join(problems)))

    if s.get("phase") in contract.TERMINAL_PHASES:
        s["completionTime"] = _keep_time(old, s, verdict_time or now)
        for x in active:  # a decided job has nothing left to run
            a.actions.append(_delete(x.job))
    elif not active and old.get("phase") in contract.TERMINAL_PHASES and true_condition(ftj, old["phase"]):
        # Finished stays finished: never start a new attempt for a job recorded as done.
        s.update({k: old.get(k) for k in contract.CONTROLLER_STATUS_FIELDS if k not in ("observedGeneration",
                                                                                   "conditions")})
    elif spec.get("suspend"):
        for x in active:
            a.actions.append(_delete(x.job))
        n = len(active) + len(stopping)
        s.update(phase=contract.SUSPENDED, reason=None,
                 message="suspended" + (f"; stopping {n} runner pod(s) (they save a checkpoint)" if n else
                                        "; set spec.suspend to false to resume from the last checkpoint"))
    elif active:
        _active_phase(a, ftj, active[-1], now, options)
    else:
        _next_attempt(a, ftj, effective, attempts, failed, counted, stopping, start, now, options)

    if deadline and start and s.get("phase") not in contract.TERMINAL_PHASES:
        a.requeue(start + deadline - now)
    if s.get("phase") in contract.TERMINAL_PHASES:
        if has_identity:
            a.actions.append(Action("revoke-identity"))
        ttl = spec.get("ttlSecondsAfterFinished")
        done_at = parse_time(s.get("completionTime"))
        if ttl is not None and done_at is not None and jobs:
            if now >= done_at + ttl:
                a.actions += [_delete(j) for j in jobs
                              if not deleting(j) and not any(x.kind == "delete-job" and x.name ==
                                                              j["metadata"]["name"] for x in a.actions)]
            else:
                a.requeue(done_at + ttl - now)

    finalize(a, ftj, now)
    return a


def finalize(a: Assessment, ftj: dict, now: float) -> None:
    """Conditions and Events that follow from the new status (and the previous one)."""
    old = ftj.get("status") or {}
    a.status["conditions"] = _conditions(old, a.status, ftj["metadata"].get("generation"), now)
    _events(a, old)


def _keep_time(old: dict, s: dict, fallback: float) -> str:
    if old.get("phase") == s.get("phase") and old.get("completionTime"):
        return old["completionTime"]
    return format_time(fallback)


def _effective_spec(first: Attempt | None, spec: dict) -> dict:
    """The spec the job runs with: the one its first attempt was created with (spec changes are ignored)."""
    if first is not None:
        text = (jobset.pod_template_of(first.job).get("metadata") or {}).get("annotations", {}).get(
            naming.ANNOTATION_SPEC)
        if text:
            try:
                original = json.loads(text).get("spec")
            except ValueError:
                original = None
            if isinstance(original, dict):
                # run policy comes from the live spec; everything else from the original
                return {**original, **{k: spec[k] for k in contract.MUTABLE_SPEC_FIELDS if k in spec}}
    return spec


def _changed_since_start(first: Attempt | None, spec: dict) -> bool:
    if first is None:
        return False
    recorded = first.job["metadata"].get("annotations", {}).get(naming.ANNOTATION_SPEC_HASH)
    return bool(recorded) and recorded != spec_hash(spec)


def _active_phase(a: Assessment, ftj: dict, x: Attempt, now: float, options: Options) -> None:
    s = a.status
    pod = x.pod
    s.update(reason=None, message=None)
    if pod is None:
        queued = bool((x.job.get("spec") or {}).get("suspend"))
        s.update(phase=contract.PENDING, message=_waiting(x.index) + (" (queued: the Job is suspended by its queue)"
                                                                  if queued else ""))
        return
    name = pod["metadata"]["name"]
    st = pod.get("status") or {}
    if pod_phase(pod) in (POD_RUNNING, POD_SUCCEEDED):  # (succeeded: node 0 of a JobSet not yet Completed)
        runner = (ftj.get("status") or {}).get("runner") or {}
        phase = runner.get("phase") if runner.get("pod") == name else None
        where = (f"the pods of its {jobset.nodes_in(x.job)} nodes are running (node 0: {name})"
                 if jobset.is_jobset(x.job) else f"pod {name} is running")
        s.update(phase=phase if phase in contract.ACTIVE_RUNNER_PHASES else contract.RUNNING,
                 message=f"attempt {x.index}: {where}")
        return
    s["phase"] = contract.PENDING
    sched = next((c for c in st.get("conditions") or [] if c.get("type") == "PodScheduled"), None)
    if sched and sched.get("status") == "False" and sched.get("reason") == "Unschedulable":
        s.update(reason=contract.UNSCHEDULABLE, message=clip(f"attempt {x.index}: {sched.get('message') or ''}"))
        return
    waiting = (runner_container(pod).get("state") or {}).get("waiting") or {}
    why = waiting.get("reason")
    if why in IMAGE_PULL_WAITING + IMAGE_PULL_FATAL + CONFIG_WAITING:
        reason = contract.INVALID_SPEC if why in CONFIG_WAITING else contract.IMAGE_PULL_FAILED
        message = clip(f"attempt {x.index}: {why}: {waiting.get('message') or ''}")
        since = parse_time(st.get("startTime")) or parse_time(pod["metadata"].get("creationTimestamp")) or now
        give_up = since + options.image_pull_timeout
        if why in IMAGE_PULL_FATAL or now >= give_up:
            s.update(phase=contract.FAILED, reason=reason, message=message)
            s["completionTime"] = _keep_time(ftj.get("status") or {}, s, now)
            a.actions.append(_delete(x.job))
        else:
            s.update(reason=reason, message=message)
            a.requeue(give_up - now)
        return
    s["message"] = _waiting(x.index)


def _waiting(index: int) -> str:
    return f"attempt {index}: waiting for the runner pod to start"


def _next_attempt(a: Assessment, ftj: dict, spec: dict, attempts: list[Attempt], failed: list[Attempt],
                  counted: int, stopping: list[dict], start: float | None, now: float, options: Options) -> None:
    s = a.status
    index = (attempts[-1].index + 1) if attempts else 1
    s.update(phase=contract.PENDING, reason=None)
    last_failure = failed[-1].failure if failed and failed[-1] is attempts[-1] else None
    if stopping:
        s["message"] = f"waiting for {len(stopping)} pod(s) of a stopped attempt to exit before attempt {index}"
        a.requeue(5.0)
        return
    if last_failure is not None:
        delay = 0.0
        if last_failure.counted and options.retry_backoff > 0:
            delay = min(options.retry_backoff * 2 ** max(counted - 1, 0), options.retry_backoff_max)
        at = (last_failure.at or now) + delay
        if now < at:
            s["message"] = clip(f"attempt {attempts[-1].index} failed ({last_failure.reason}: "
                                 f"{last_failure.message}); attempt {index} starts in {at - now:.0f}s")
            a.requeue(at - now)
            return
    deadline = ftj.get("spec", {}).get("activeDeadlineSeconds")
    remaining = None
    if deadline:
        remaining = max(1, int(deadline - (now - start))) if start else int(deadline)
    # The same message as while the Job's pod starts: one status write per new attempt, not three.
    s.update(attempt=index, jobName=jobset.attempt_name(ftj["metadata"]["name"], index, spec),
             message=_waiting(index))
    a.actions.append(Action("create-attempt", name=s["jobName"], attempt=index, spec=spec,
                            deadline_seconds=remaining))


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
