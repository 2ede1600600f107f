"""No attempt is active and the job is not decided: the next attempt waits until every pod of a stopped attempt
has exited (so two runners never share checkpoints) and the backoff after a failure has passed
(controller/policies/backoff.py); then the controller creates it."""
from __future__ import annotations

from controller import jobset
from controller.attempts import clip
from controller.policies import backoff, deadline
from controller.policies.active import waiting
from controller.policies.observed import Observed
from controller.policies.results import Action, ActionKind, Decision
from runner.api import status as contract

STOPPING_POLL = 5.0  # seconds between looks at a stopped attempt's pods


def start(o: Observed) -> Decision:
    index = (o.last.index + 1) if o.last else 1
    pending = {"phase": contract.PENDING, "reason": None}
    if o.stopping:
        return Decision(status={**pending, "message": f"waiting for {len(o.stopping)} pod(s) of a stopped attempt "
                                                      f"to exit before attempt {index}"},
                        requeue_after=STOPPING_POLL)
    failed = o.failed
    if failed and failed[-1] is o.last and failed[-1].failure is not None:
        f = failed[-1].failure
        at = backoff.retry_at(o, f)
        if o.now < at:
            return Decision(status={**pending, "message": clip(
                f"attempt {o.last.index} failed ({f.reason}: {f.message}); attempt {index} starts in "
                f"{at - o.now:.0f}s")}, requeue_after=at - o.now)
    name = jobset.attempt_name(o.ftj["metadata"]["name"], index, o.effective)
    # The same message as while the Job's pod starts: one status write per new attempt, not three.
    return Decision(status={**pending, "attempt": index, "jobName": name, "message": waiting(index)},
                    actions=[Action(ActionKind.CREATE_ATTEMPT, name=name, attempt=index, spec=o.effective,
                                    deadline_seconds=deadline.remaining(o))])
