"""What a FineTuneJob's status is, and what the controller must do next: pure functions of what is observed.

    compute(ftj, jobs, pods, now=...) -> dict        the controller-owned status fields
    assess(ftj, jobs, pods, now=...) -> Assessment   the same status, plus actions, events and a requeue time

Inputs are plain dicts as the API server returns them: the FineTuneJob (its spec, metadata and the status
fields the runner reports), its attempt Jobs and their Pods. Nothing is remembered between passes, so a
restarted controller computes the same status and takes the same actions.

Attempts. Each attempt is one batch/v1 Job named `<ftj>-<n>` with backoffLimit 0; the controller, not the
Job controller, decides about retries, because only it can read the runner's exit code on every
Kubernetes version (podFailurePolicy needs 1.26+). A pod that fails:
  * exit 0 .................................... never (phase Succeeded)
  * exit 2 (runner: permanent) ................ Failed, reason from the runner's result (InvalidSpec, ...)
  * exit 3 or OOMKilled / exit 137 ............ Failed, OutOfMemory
  * exit 1, 75, anything else ................. retried (counted against spec.backoffLimit)
  * evicted / preempted / node shut down ...... retried, not counted (like podFailurePolicy's Ignore)
  * Job or pod DeadlineExceeded ............... Failed, DeadlineExceeded
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

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from controller import api
from runner import errors

# Kubelet waiting reasons.
IMAGE_PULL_WAITING = ("ErrImagePull", "ImagePullBackOff", "RegistryUnavailable", "ErrImageInspect")
IMAGE_PULL_FATAL = ("InvalidImageName", "ErrImageNeverPull")
CONFIG_WAITING = ("CreateContainerConfigError", "CreateContainerError")
# Pod-level reasons of involuntary disruptions: retried without counting against backoffLimit.
DISRUPTION_REASONS = ("Evicted", "Preempting", "Preempted", "Shutdown", "NodeShutdown", "Terminated", "NodeLost",
                      "UnexpectedAdmissionError")
RUNNER_REASONS = (errors.INVALID_SPEC, errors.DOWNLOAD_FAILED, errors.TRAINING_FAILED, errors.MERGE_FAILED,
                  errors.UPLOAD_FAILED, errors.OUT_OF_MEMORY)
MESSAGE_LIMIT = 1024


@dataclass(frozen=True)
class Options:
    retry_backoff: float = 10.0  # seconds before the 1st retry; doubles per counted failure
    retry_backoff_max: float = 300.0
    image_pull_timeout: float = 300.0  # a pod that cannot pull its image (or find its Secret) this long fails


# ------------------------------------------------------------------------------------------ time
def parse_time(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def format_time(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------------------- names
def _short_hash(text: str, n: int = 6) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def child_name(ftj_name: str, suffix: str, limit: int = 63) -> str:
    """`<ftj>-<suffix>`, deterministic, at most `limit` characters (a hash keeps long names unique)."""
    name = f"{ftj_name}-{suffix}"
    if len(name) <= limit:
        return name
    keep = limit - len(suffix) - 8
    return f"{ftj_name[:keep].rstrip('-.')}-{_short_hash(ftj_name)}-{suffix}"


def job_name(ftj_name: str, attempt: int) -> str:
    # Pods get the label job-name=<job>, and label values are limited to 63 characters.
    return child_name(ftj_name, str(attempt), 63)


def label_value(name: str) -> str:
    return name if len(name) <= 63 else f"{name[:56].rstrip('-.')}-{_short_hash(name)}"


def spec_hash(spec: dict) -> str:
    """Hash of the fields that may not change once the job exists (normalized through the pydantic model)."""
    from runner.spec import FineTuneJobSpec

    try:
        doc = FineTuneJobSpec.model_validate(spec).model_dump(by_alias=True, mode="json")
    except Exception:  # an invalid spec still has a hash
        doc = spec
    fixed = {k: v for k, v in doc.items() if k not in api.MUTABLE_SPEC_FIELDS}
    return hashlib.sha256(json.dumps(fixed, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def runner_manifest(ftj: dict, spec: dict) -> dict:
    """The job file the runner reads: a FineTuneJob manifest (the runner ignores the cluster-only fields)."""
    md = ftj["metadata"]
    return {"apiVersion": api.API_VERSION_FULL, "kind": api.KIND,
            "metadata": {"name": md["name"], "namespace": md.get("namespace")}, "spec": spec}


def spec_problems(ftj: dict, spec: dict) -> list[str]:
    from runner.errors import SpecError
    from runner.spec import parse_job

    try:
        parse_job(runner_manifest(ftj, spec))
    except SpecError as e:
        return e.problems
    return []


# ------------------------------------------------------------------------------- small accessors
def _cond(obj: dict, type_: str) -> dict | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return c
    return None


def _attempt_of(job: dict) -> int:
    try:
        return int(job["metadata"].get("labels", {}).get(api.LABEL_ATTEMPT, "0"))
    except ValueError:
        return 0


def _owner_uid(obj: dict, kind: str) -> str | None:
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("kind") == kind and ref.get("controller"):
            return ref.get("uid")
    return None


def _runner_status(pod: dict) -> dict:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for cs in statuses:
        if cs.get("name") == api.RUNNER_CONTAINER:
            return cs
    return statuses[0] if statuses else {}


def _terminated(pod: dict) -> dict | None:
    cs = _runner_status(pod)
    return (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")


def _result(term: dict | None) -> dict:
    """The runner's final result JSON, from the termination message (empty if it is not one)."""
    text = (term or {}).get("message") or ""
    try:
        doc = json.loads(text)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _clip(text: str | None) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 3] + "..."


def _pod_phase(pod: dict) -> str:
    return (pod.get("status") or {}).get("phase") or "Pending"


def _deleting(obj: dict) -> bool:
    return bool(obj["metadata"].get("deletionTimestamp"))


# ------------------------------------------------------------------------------------- attempts
@dataclass
class Failure:
    reason: str
    message: str
    retryable: bool
    counted: bool = True  # counts against backoffLimit
    at: float | None = None
    exit_code: int | None = None


@dataclass
class Attempt:
    index: int
    job: dict
    pods: list[dict]
    outcome: str = "active"  # active | succeeded | failed
    pod: dict | None = None  # the pod that decided the outcome, or the live one
    failure: Failure | None = None
    result: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.job["metadata"]["name"]


def classify_failure(pod: dict | None, job: dict) -> Failure:
    """Why an attempt failed, and whether another attempt can help."""
    job_failed = _cond(job, "Failed")
    at = parse_time((job_failed or {}).get("lastTransitionTime"))
    if (job_failed and job_failed.get("reason") == "DeadlineExceeded") or (
        pod and (pod.get("status") or {}).get("reason") == "DeadlineExceeded"
    ):
        return Failure("DeadlineExceeded", _clip((job_failed or {}).get("message")
                                                 or "the job ran past spec.activeDeadlineSeconds"), False, at=at)
    if pod is None:
        return Failure(errors.TRAINING_FAILED, _clip("the attempt's Job failed without a pod on record: "
                                                     + str((job_failed or {}).get("message") or "")), True, at=at)
    st = pod.get("status") or {}
    term = _terminated(pod)
    result = _result(term)
    code = (term or {}).get("exitCode")
    at = parse_time((term or {}).get("finishedAt")) or at
    disrupted = st.get("reason") in DISRUPTION_REASONS or bool(_cond(pod, "DisruptionTarget"))
    reason = result.get("reason") if result.get("reason") in RUNNER_REASONS else errors.TRAINING_FAILED
    runner_msg = result.get("message") or ""
    if disrupted:
        msg = f"the pod was disrupted ({st.get('reason') or 'DisruptionTarget'}: {st.get('message') or ''})"
        return Failure(reason, _clip(msg), True, counted=False, at=at, exit_code=code)
    if term is None:
        return Failure(errors.TRAINING_FAILED, _clip(f"pod {pod['metadata']['name']} failed: "
                                                     f"{st.get('reason') or ''} {st.get('message') or ''}"),
                       True, at=at)
    if term.get("reason") == "OOMKilled" or code == 137:
        memory = "resources.memory"
        msg = (f"the runner was killed for running out of memory (exit {code}, {term.get('reason')}); "
               f"raise {memory} or lower training.batchSize / dataset.maxLength")
        return Failure(errors.OUT_OF_MEMORY, _clip(msg), False, at=at, exit_code=code)
    if code == errors.EXIT_OUT_OF_MEMORY:
        return Failure(errors.OUT_OF_MEMORY, _clip(runner_msg or "CUDA out of memory"), False, at=at, exit_code=code)
    if code == errors.EXIT_PERMANENT:
        return Failure(reason, _clip(runner_msg or f"the runner failed permanently (exit {code})"), False, at=at,
                       exit_code=code)
    detail = runner_msg or (term.get("message") if not result else "") or ""
    msg = f"exit code {code}" + (f": {detail}" if detail else "")
    return Failure(reason, _clip(msg), True, at=at, exit_code=code)


def _attempts(jobs: list[dict], pods: list[dict]) -> list[Attempt]:
    by_job: dict[str, list[dict]] = {}
    for p in pods:
        by_job.setdefault(_owner_uid(p, "Job") or "", []).append(p)
    out = []
    for job in jobs:
        if _deleting(job):
            continue
        ps = sorted(by_job.get(job["metadata"]["uid"], []),
                    key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]))
        a = Attempt(_attempt_of(job), job, ps)
        done = [p for p in ps if _pod_phase(p) == "Succeeded"]
        failed = [p for p in ps if _pod_phase(p) == "Failed"]
        if done or _cond(job, "Complete"):
            a.outcome, a.pod = "succeeded", (done[-1] if done else None)
            a.result = _result(_terminated(a.pod)) if a.pod else {}
        elif failed or _cond(job, "Failed"):
            a.outcome, a.pod = "failed", (failed[-1] if failed else None)
            a.failure = classify_failure(a.pod, job)
            a.result = _result(_terminated(a.pod)) if a.pod else {}
        else:
            live = [p for p in ps if not _deleting(p)]
            a.pod = live[-1] if live else None
        out.append(a)
    return sorted(out, key=lambda a: a.index)


# ------------------------------------------------------------------------------------ assessment
@dataclass
class Action:
    kind: str  # create-attempt | delete-job | revoke-identity
    name: str = ""
    attempt: int = 0
    spec: dict | None = None
    deadline_seconds: int | None = None


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
            options: Options = Options(), has_identity: bool = False) -> dict:
    """The controller-owned status fields of `ftj`, rebuilt from its Jobs and Pods."""
    return assess(ftj, jobs, pods, now=now, options=options, has_identity=has_identity).status


def assess(ftj: dict, jobs: list[dict], pods: list[dict], *, now: float | None = None,
           options: Options = Options(), has_identity: bool = False) -> Assessment:
    """Status, actions and events for one pass. `has_identity`: the runner's RoleBinding exists."""
    import time

    now = time.time() if now is None else now
    md, spec = ftj["metadata"], ftj.get("spec") or {}
    old = ftj.get("status") or {}
    uid = md.get("uid")
    jobs = [j for j in jobs if not uid or _owner_uid(j, api.KIND) in (uid, None)]
    attempts = _attempts(jobs, pods)
    live_job_uids = {j["metadata"]["uid"] for j in jobs if not _deleting(j)}
    stopping = [p for p in pods if _owner_uid(p, "Job") not in live_job_uids and _pod_phase(p) not in
                ("Succeeded", "Failed")]
    stopping += [j for j in jobs if _deleting(j)]

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
                               "the spec changed after the job started; only " + ", ".join(api.MUTABLE_SPEC_FIELDS)
                               + " may change, the running job keeps its original spec (delete and re-create "
                               "the FineTuneJob to change it)"))

    verdict_time = None
    if succeeded is not None:
        r = succeeded.result
        s.update(phase=api.SUCCEEDED, reason=None, message=_clip(f"attempt {succeeded.index} succeeded"),
                 output=r.get("output") if isinstance(r.get("output"), str) else None,
                 metrics=r.get("metrics") if isinstance(r.get("metrics"), dict) else None)
        term = _terminated(succeeded.pod) if succeeded.pod else None
        verdict_time = (parse_time((term or {}).get("finishedAt"))
                        or parse_time((succeeded.job.get("status") or {}).get("completionTime")))
    elif permanent is not None:
        f = permanent.failure
        s.update(phase=api.FAILED, reason=f.reason, message=_clip(f"attempt {permanent.index}: {f.message}"))
        verdict_time = f.at
    elif deadline and start and now >= start + deadline:
        s.update(phase=api.FAILED, reason="DeadlineExceeded",
                 message=f"the job ran longer than spec.activeDeadlineSeconds ({deadline}s)")
        verdict_time = start + deadline
    elif not active and counted > backoff_limit:
        f = failed[-1].failure
        s.update(phase=api.FAILED, reason="BackoffLimitExceeded",
                 message=_clip(f"{counted} attempts failed (backoffLimit {backoff_limit}); last: {f.reason}: "
                               f"{f.message}"))
        verdict_time = f.at
    elif not attempts and (problems := spec_problems(ftj, effective)):
        s.update(phase=api.FAILED, reason="InvalidSpec", message=_clip("; ".join(problems)))

    if s.get("phase") in api.TERMINAL_PHASES:
        s["completionTime"] = _keep_time(old, s, verdict_time or now)
        for x in active:  # a decided job has nothing left to run
            a.actions.append(Action("delete-job", name=x.name))
    elif not active and old.get("phase") in api.TERMINAL_PHASES and _cond(ftj, old["phase"]):
        # Finished stays finished: never start a new attempt for a job recorded as done.
        s.update({k: old.get(k) for k in api.CONTROLLER_STATUS_FIELDS if k not in ("observedGeneration",
                                                                                   "conditions")})
    elif spec.get("suspend"):
        for x in active:
            a.actions.append(Action("delete-job", name=x.name))
        n = len(active) + len(stopping)
        s.update(phase=api.SUSPENDED, reason=None,
                 message="suspended" + (f"; stopping {n} runner pod(s) (they save a checkpoint)" if n else
                                        "; set spec.suspend to false to resume from the last checkpoint"))
    elif active:
        _active_phase(a, ftj, active[-1], now, options)
    else:
        _next_attempt(a, ftj, effective, attempts, failed, counted, stopping, start, now, options)

    if deadline and start and s.get("phase") not in api.TERMINAL_PHASES:
        a.requeue(start + deadline - now)
    if s.get("phase") in api.TERMINAL_PHASES:
        if has_identity:
            a.actions.append(Action("revoke-identity"))
        ttl = spec.get("ttlSecondsAfterFinished")
        done_at = parse_time(s.get("completionTime"))
        if ttl is not None and done_at is not None and jobs:
            if now >= done_at + ttl:
                a.actions += [Action("delete-job", name=j["metadata"]["name"]) for j in jobs
                              if not _deleting(j) and not any(x.kind == "delete-job" and x.name ==
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
        text = (((first.job.get("spec") or {}).get("template") or {}).get("metadata") or {}).get(
            "annotations", {}).get(api.ANNOTATION_SPEC)
        if text:
            try:
                original = json.loads(text).get("spec")
            except ValueError:
                original = None
            if isinstance(original, dict):
                # run policy comes from the live spec; everything else from the original
                return {**original, **{k: spec[k] for k in api.MUTABLE_SPEC_FIELDS if k in spec}}
    return spec


def _changed_since_start(first: Attempt | None, spec: dict) -> bool:
    if first is None:
        return False
    recorded = first.job["metadata"].get("annotations", {}).get(api.ANNOTATION_SPEC_HASH)
    return bool(recorded) and recorded != spec_hash(spec)


def _active_phase(a: Assessment, ftj: dict, x: Attempt, now: float, options: Options) -> None:
    s = a.status
    pod = x.pod
    s.update(reason=None, message=None)
    if pod is None:
        queued = bool((x.job.get("spec") or {}).get("suspend"))
        s.update(phase=api.PENDING, message=_waiting(x.index) + (" (queued: the Job is suspended by its queue)"
                                                                  if queued else ""))
        return
    name = pod["metadata"]["name"]
    st = pod.get("status") or {}
    if _pod_phase(pod) == "Running":
        runner = (ftj.get("status") or {}).get("runner") or {}
        phase = runner.get("phase") if runner.get("pod") == name else None
        s.update(phase=phase if phase in api.RUNNER_PHASES else api.RUNNING,
                 message=f"attempt {x.index}: pod {name} is running")
        return
    s["phase"] = api.PENDING
    sched = next((c for c in st.get("conditions") or [] if c.get("type") == "PodScheduled"), None)
    if sched and sched.get("status") == "False" and sched.get("reason") == "Unschedulable":
        s.update(reason="Unschedulable", message=_clip(f"attempt {x.index}: {sched.get('message') or ''}"))
        return
    waiting = (_runner_status(pod).get("state") or {}).get("waiting") or {}
    why = waiting.get("reason")
    if why in IMAGE_PULL_WAITING + IMAGE_PULL_FATAL + CONFIG_WAITING:
        reason = "InvalidSpec" if why in CONFIG_WAITING else "ImagePullFailed"
        message = _clip(f"attempt {x.index}: {why}: {waiting.get('message') or ''}")
        since = parse_time(st.get("startTime")) or parse_time(pod["metadata"].get("creationTimestamp")) or now
        give_up = since + options.image_pull_timeout
        if why in IMAGE_PULL_FATAL or now >= give_up:
            s.update(phase=api.FAILED, reason=reason, message=message)
            s["completionTime"] = _keep_time(ftj.get("status") or {}, s, now)
            a.actions.append(Action("delete-job", name=x.name))
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
    s.update(phase=api.PENDING, reason=None)
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
            s["message"] = _clip(f"attempt {attempts[-1].index} failed ({last_failure.reason}: "
                                 f"{last_failure.message}); attempt {index} starts in {at - now:.0f}s")
            a.requeue(at - now)
            return
    deadline = ftj.get("spec", {}).get("activeDeadlineSeconds")
    remaining = None
    if deadline:
        remaining = max(1, int(deadline - (now - start))) if start else int(deadline)
    # The same message as while the Job's pod starts: one status write per new attempt, not three.
    s.update(attempt=index, jobName=job_name(ftj["metadata"]["name"], index), message=_waiting(index))
    a.actions.append(Action("create-attempt", name=s["jobName"], attempt=index, spec=spec,
                            deadline_seconds=remaining))


def _conditions(old: dict, s: dict, generation: int | None, now: float) -> list[dict]:
    phase = s.get("phase")
    running = phase in (api.RUNNING, *api.RUNNER_PHASES)
    want = [
        ("Succeeded", phase == api.SUCCEEDED, "Succeeded" if phase == api.SUCCEEDED else phase,
         s.get("message") if phase == api.SUCCEEDED else ""),
        ("Failed", phase == api.FAILED, s.get("reason") if phase == api.FAILED else phase,
         s.get("message") if phase == api.FAILED else ""),
        ("Running", running, phase, ""),
        ("Suspended", phase == api.SUSPENDED, phase, ""),
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
    if (s.get("failedAttempts") or 0) > (old.get("failedAttempts") or 0) and s.get("phase") != api.FAILED:
        a.events.append(Event("Warning", "AttemptFailed", _clip(s.get("message") or "an attempt failed")))
    if s.get("phase") != old.get("phase"):
        failed = s.get("phase") == api.FAILED
        text = s.get("message") or s.get("phase") or ""
        a.events.append(Event("Warning" if failed else "Normal",
                              (s.get("reason") or "Failed") if failed else str(s.get("phase")), _clip(text)))
    elif s.get("reason") != old.get("reason") and s.get("reason"):
        a.events.append(Event("Warning", s["reason"], _clip(s.get("message") or "")))
