"""spec.ttlSecondsAfterFinished: that long after a job finished, its attempts' Jobs (and with them their pods and
logs) are deleted; the FineTuneJob and its status stay."""
from __future__ import annotations

from controller.attempts import deleting, parse_time
from controller.policies.observed import Observed
from controller.policies.results import ActionKind, Assessment, Decision, delete


def clean_up(o: Observed, a: Assessment) -> Decision | None:
    ttl = o.spec.get("ttlSecondsAfterFinished")
    done_at = parse_time(a.status.get("completionTime"))
    if not a.terminal or ttl is None or done_at is None or not o.jobs:
        return None
    if o.now < done_at + ttl:
        return Decision(requeue_after=done_at + ttl - o.now)
    doomed = {x.name for x in a.actions if x.kind == ActionKind.DELETE_JOB}
    return Decision(actions=[delete(j) for j in o.jobs if not deleting(j) and j["metadata"]["name"] not in doomed])
