"""An active attempt's phase: Pending while its pod waits (queued, unschedulable, pulling its image), Running (or
the runner's reported stage) once every node's pod runs. A runner pod deleted by hand (`kubectl delete pod`) whose
Job makes a new pod for the same attempt is no failure: the status says the pod was replaced and from which
checkpoint step the new one resumes, with one Normal PodReplaced Event. A pod that cannot pull its image or find its Secrets
fails the job at once when that cannot heal (a bad image name), else after the controller's image pull timeout."""
from __future__ import annotations

from controller import jobset
from controller.attempts import (
    CONFIG_WAITING, IMAGE_PULL_FATAL, IMAGE_PULL_WAITING, POD_RUNNING, POD_SUCCEEDED, Attempt, clip, deleting,
    parse_time, pod_phase, runner_container,
)
from controller.policies.finished import completion_time
from controller.policies.observed import Observed
from controller.policies.results import Decision, Event, delete
from runner.api import status as contract


def waiting(index: int) -> str:
    """The message from an attempt's creation until its pod starts (one status write per new attempt)."""
    return f"attempt {index}: waiting for the runner pod to start"


def phase(o: Observed) -> Decision | None:
    if not o.active:
        return None
    x = o.active[-1]
    pod = x.pod
    gone = _replaced_pod(o, x)
    if pod is None:
        queued = bool((x.job.get("spec") or {}).get("suspend"))
        if gone:
            return _status(contract.PENDING, message=f"attempt {x.index}: pod {gone} was deleted; waiting for "
                                                     f"the pod that replaces it")
        return _status(contract.PENDING, message=waiting(x.index) + (
            " (queued: the Job is suspended by its queue)" if queued else ""))
    name = pod["metadata"]["name"]
    st = pod.get("status") or {}
    if pod_phase(pod) in (POD_RUNNING, POD_SUCCEEDED) and gone:
        return _replaced(o, x, gone, pod)
    if pod_phase(pod) in (POD_RUNNING, POD_SUCCEEDED):  # (succeeded: node 0 of a JobSet not yet Completed)
        runner = o.old.get("runner") or {}
        reported = runner.get("phase") if runner.get("pod") == name else None
        where = (f"the pods of its {jobset.nodes_in(x.job)} nodes are running (node 0: {name})"
                 if jobset.is_jobset(x.job) else f"pod {name} is running")
        return _status(reported if reported in contract.ACTIVE_RUNNER_PHASES else contract.RUNNING,
                       message=f"attempt {x.index}: {where}")
    sched = next((c for c in st.get("conditions") or [] if c.get("type") == "PodScheduled"), None)
    if sched and sched.get("status") == "False" and sched.get("reason") == "Unschedulable":
        return _status(contract.PENDING, reason=contract.UNSCHEDULABLE,
                       message=clip(f"attempt {x.index}: {sched.get('message') or ''}"))
    stuck = (runner_container(pod).get("state") or {}).get("waiting") or {}
    why = stuck.get("reason")
    if why not in IMAGE_PULL_WAITING + IMAGE_PULL_FATAL + CONFIG_WAITING:
        return _replaced(o, x, gone, pod) if gone else _status(contract.PENDING, message=waiting(x.index))
    reason = contract.INVALID_SPEC if why in CONFIG_WAITING else contract.IMAGE_PULL_FAILED
    message = clip(f"attempt {x.index}: {why}: {stuck.get('message') or ''}")
    since = parse_time(st.get("startTime")) or parse_time(pod["metadata"].get("creationTimestamp")) or o.now
    give_up = since + o.options.image_pull_timeout
    if why in IMAGE_PULL_FATAL or o.now >= give_up:
        d = _status(contract.FAILED, reason=reason, message=message)
        d.status["completionTime"] = completion_time(o, contract.FAILED, o.now)
        d.actions.append(delete(x.job))
        return d
    d = _status(contract.PENDING, reason=reason, message=message)
    d.requeue_after = give_up - o.now
    return d


def _replaced_pod(o: Observed, x: Attempt) -> str | None:
    """The runner pod of this attempt that was deleted while its Job goes on (the Job makes a new pod): the one
    the runner last reported from, now being deleted or gone. None for a JobSet (it restarts all its nodes)."""
    if jobset.is_jobset(x.job):
        return None
    runner = o.old.get("runner") or {}
    before = runner.get("pod")
    if not before or o.old.get("attempt") != x.index or runner.get("attempt") not in (None, x.index):
        return None
    live = {p["metadata"]["name"] for p in x.pods if not deleting(p)}
    return None if before in live else before


def _replaced(o: Observed, x: Attempt, gone: str, pod: dict) -> Decision:
    """The new pod of the same attempt, until its runner reports: it resumes from the newest checkpoint."""
    name = pod["metadata"]["name"]
    step = (o.old.get("lastCheckpoint") or {}).get("step")
    resumes = f"resumes from the checkpoint of step {step}" if step else "starts over (no checkpoint was saved)"
    message = (f"attempt {x.index}: pod {gone} was deleted and replaced by pod {name} (the same attempt, not a "
               f"failure); it {resumes}")
    running = pod_phase(pod) in (POD_RUNNING, POD_SUCCEEDED)
    d = _status(contract.RUNNING if running else contract.PENDING, message=message)
    if name not in (o.old.get("message") or ""):  # once per replacement
        d.events.append(Event("Normal", contract.EVENT_POD_REPLACED, clip(message)))
    return d


def _status(phase: str, *, message: str, reason: str | None = None) -> Decision:
    return Decision(status={"phase": phase, "reason": reason, "message": message})
