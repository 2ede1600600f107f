"""One attempt of a FineTuneJob (one batch/v1 Job and its Pods, or with several nodes one JobSet and its pods),
what became of it, and why it failed: pure functions of the observed objects.

Each attempt is one batch/v1 Job named `<ftj>-<n>` with backoffLimit 0; the controller, not the Job
controller, decides about retries, because only it can read the runner's exit code on every Kubernetes
version (podFailurePolicy needs 1.26+). A pod that fails:
  * exit 0 .................................... never (phase Succeeded)
  * exit 2 (runner: permanent) ................ Failed, reason from the runner's result (InvalidSpec, ...)
  * exit 3 or OOMKilled / exit 137 ............ Failed, OutOfMemory
  * exit 1, 75, anything else ................. retried (counted against spec.backoffLimit)
  * evicted / preempted / node shut down ...... retried, not counted (like podFailurePolicy's Ignore)
  * Job or pod DeadlineExceeded ............... Failed, DeadlineExceeded

A JobSet attempt (controller/jobset.py) succeeded when the JobSet is Completed (node 0's pod holds the result);
it failed when the JobSet is Failed or any of its pods failed (one pod failing fails the whole JobSet). Which
pod's failure decides, as above: node 0's if it is permanent, else another node's permanent one (a node out of
memory), else a disruption on any node (not counted), else node 0's, else the first pod that failed. Until then
the attempt is Pending while any pod is, and Running when every node's pod runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

from controller import jobset, limits, naming
from runner.api import errors, status as contract

# Kubernetes' own phases and condition types of Pods and Jobs.
POD_PENDING, POD_RUNNING, POD_SUCCEEDED, POD_FAILED = "Pending", "Running", "Succeeded", "Failed"
JOB_COMPLETE, JOB_FAILED = "Complete", "Failed"
K8S_DEADLINE_EXCEEDED = "DeadlineExceeded"  # the reason Kubernetes gives a Job or Pod past its deadline
# Kubelet waiting reasons.
IMAGE_PULL_WAITING = ("ErrImagePull", "ImagePullBackOff", "RegistryUnavailable", "ErrImageInspect")
IMAGE_PULL_FATAL = ("InvalidImageName", "ErrImageNeverPull")
CONFIG_WAITING = ("CreateContainerConfigError", "CreateContainerError")
# Pod-level reasons of involuntary disruptions: retried without counting against backoffLimit.
DISRUPTION_REASONS = ("Evicted", "Preempting", "Preempted", "Shutdown", "NodeShutdown", "Terminated", "NodeLost",
                      "UnexpectedAdmissionError")
MESSAGE_LIMIT = 1024


# ------------------------------------------------------------------------------------------ time
def parse_time(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def format_time(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")



# ------------------------------------------------------------------------------- small accessors
def true_condition(obj: dict, type_: str) -> dict | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return c
    return None


def attempt_of(job: dict) -> int:
    try:
        return int(job["metadata"].get("labels", {}).get(naming.LABEL_ATTEMPT, "0"))
    except ValueError:
        return 0


def owner_uid(obj: dict, kind: str) -> str | None:
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("kind") == kind and ref.get("controller"):
            return ref.get("uid")
    return None


def runner_container(pod: dict) -> dict:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for cs in statuses:
        if cs.get("name") == naming.RUNNER_CONTAINER:
            return cs
    return statuses[0] if statuses else {}


def terminated(pod: dict) -> dict | None:
    cs = runner_container(pod)
    return (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")


def result_of(term: dict | None) -> dict:
    """The runner's final result JSON, from the termination message (empty if it is not one). Whatever runs in
    the pod writes that message: it is parsed only when short and shallow (controller/limits.py)."""
    doc, _ = limits.loads_bounded((term or {}).get("message") or "")
    return doc if isinstance(doc, dict) else {}


def _not_a_result(term: dict) -> str:
    """What to show of a termination message that is not a result: the text (a crash's last log lines), or,
    for something that looks like JSON but is not a usable result, why it was not read."""
    text = term.get("message")
    if not isinstance(text, str) or not text.strip():
        return ""
    if text.lstrip()[:1] in ("{", "["):
        _, why = limits.loads_bounded(text)
        return f"the termination message is not a runner result ({why or 'not an object'})"
    return text


def clip(text: str | None) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 3] + "..."


def pod_phase(pod: dict) -> str:
    return (pod.get("status") or {}).get("phase") or POD_PENDING


def deleting(obj: dict) -> bool:
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
    job_failed = true_condition(job, JOB_FAILED)
    at = parse_time((job_failed or {}).get("lastTransitionTime"))
    if (job_failed and job_failed.get("reason") == K8S_DEADLINE_EXCEEDED) or (
        pod and (pod.get("status") or {}).get("reason") == K8S_DEADLINE_EXCEEDED
    ):
        return Failure(contract.DEADLINE_EXCEEDED, clip((job_failed or {}).get("message")
                                                 or "the job ran past spec.activeDeadlineSeconds"), False, at=at)
    if pod is None:
        kind = "JobSet" if jobset.is_jobset(job) else "Job"
        return Failure(errors.TRAINING_FAILED, clip(f"the attempt's {kind} failed without a pod on record: "
                                                     + str((job_failed or {}).get("message") or "")), True, at=at)
    st = pod.get("status") or {}
    term = terminated(pod)
    result = result_of(term)
    code = (term or {}).get("exitCode")
    at = parse_time((term or {}).get("finishedAt")) or at
    disrupted = st.get("reason") in DISRUPTION_REASONS or bool(true_condition(pod, "DisruptionTarget"))
    reason = result.get("reason") if result.get("reason") in contract.RUNNER_REASONS else errors.TRAINING_FAILED
    runner_msg = result.get("message") if isinstance(result.get("message"), str) else ""
    if disrupted:
        msg = f"the pod was disrupted ({st.get('reason') or 'DisruptionTarget'}: {st.get('message') or ''})"
        return Failure(reason, clip(msg), True, counted=False, at=at, exit_code=code)
    if term is None:
        return Failure(errors.TRAINING_FAILED, clip(f"pod {pod['metadata']['name']} failed: "
                                                     f"{st.get('reason') or ''} {st.get('message') or ''}"),
                       True, at=at)
    if term.get("reason") == "OOMKilled" or code == 137:
        memory = "resources.memory"
        msg = (f"the runner was killed for running out of memory (exit {code}, {term.get('reason')}); "
               f"raise {memory} or lower training.batchSize / dataset.maxLength")
        return Failure(errors.OUT_OF_MEMORY, clip(msg), False, at=at, exit_code=code)
    if code == errors.EXIT_OUT_OF_MEMORY:
        return Failure(errors.OUT_OF_MEMORY, clip(runner_msg or "CUDA out of memory"), False, at=at, exit_code=code)
    detail = "" if result else _not_a_result(term)
    if code == errors.EXIT_PERMANENT:
        msg = runner_msg or f"the runner failed permanently (exit {code})" + (f": {detail}" if detail else "")
        return Failure(reason, clip(msg), False, at=at, exit_code=code)
    detail = runner_msg or detail
    msg = f"exit code {code}" + (f": {detail}" if detail else "")
    return Failure(reason, clip(msg), True, at=at, exit_code=code)


def belongs(obj: dict, pod: dict) -> bool:
    """Whether `pod` runs for the attempt's Job or JobSet."""
    if jobset.is_jobset(obj):
        return jobset.owns(obj, pod)
    return owner_uid(pod, "Job") == obj["metadata"].get("uid")


def _created(p: dict) -> tuple:
    return p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]


def attempts_of(jobs: list[dict], pods: list[dict]) -> list[Attempt]:
    """The attempts, from their Jobs or JobSets (`jobs`) and the pods."""
    out = []
    for job in jobs:
        if deleting(job):
            continue
        a = Attempt(attempt_of(job), job, sorted((p for p in pods if belongs(job, p)), key=_created))
        (_jobset_outcome if jobset.is_jobset(job) else _job_outcome)(a)
        out.append(a)
    return sorted(out, key=lambda a: a.index)


def _job_outcome(a: Attempt) -> None:
    job, ps = a.job, a.pods
    done = [p for p in ps if pod_phase(p) == POD_SUCCEEDED]
    # A pod deleted by hand (`kubectl delete pod`) exits on its SIGTERM and may show Failed while it goes; where the
    # Job does not count it (it makes a replacement pod of the same attempt), it is no failure of the attempt.
    failed = [p for p in ps if pod_phase(p) == POD_FAILED and (not deleting(p) or true_condition(job, JOB_FAILED))]
    if done or true_condition(job, JOB_COMPLETE):
        a.outcome, a.pod = "succeeded", (done[-1] if done else None)
        a.result = result_of(terminated(a.pod)) if a.pod else {}
    elif failed or true_condition(job, JOB_FAILED):
        a.outcome, a.pod = "failed", (failed[-1] if failed else None)
        a.failure = classify_failure(a.pod, job)
        a.result = result_of(terminated(a.pod)) if a.pod else {}
    else:
        live = [p for p in ps if not deleting(p)]
        a.pod = live[-1] if live else None


def _jobset_outcome(a: Attempt) -> None:
    js = a.job
    by_rank: dict[int, dict] = {}
    for p in a.pods:  # the newest pod of each node (a suspended JobSet's pods are made anew)
        rank = jobset.node_rank(p)
        if rank is not None:
            by_rank[rank] = p
    leader = by_rank.get(0)
    failed = sorted((p for p in a.pods if pod_phase(p) == POD_FAILED),
                    key=lambda p: (p is not leader, (terminated(p) or {}).get("finishedAt") or "", *_created(p)))
    if true_condition(js, jobset.COMPLETED):
        a.outcome, a.pod = "succeeded", leader
        a.result = result_of(terminated(leader)) if leader else {}
    elif failed or true_condition(js, jobset.FAILED):
        a.outcome = "failed"
        failures = [(p, classify_failure(p, js)) for p in failed] or [(None, classify_failure(None, js))]
        a.pod, a.failure = next((x for x in failures if not x[1].retryable), None) or next(
            (x for x in failures if not x[1].counted), None) or failures[0]
        a.result = result_of(terminated(a.pod)) if a.pod else {}
    else:
        live = [p for r, p in sorted(by_rank.items()) if not deleting(p)]
        pending = [p for p in live if pod_phase(p) == POD_PENDING]
        if pending:
            a.pod = pending[0]
        elif len(live) >= jobset.nodes_in(js):
            a.pod = leader if leader in live else live[0]
        else:
            a.pod = None  # not every node's pod exists yet
