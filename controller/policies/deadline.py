"""spec.activeDeadlineSeconds counts from the first attempt's start, across every attempt: past it the job is
Failed (DeadlineExceeded); before it, the controller looks again when it passes, and each new attempt's Job
gets what is left as its own activeDeadlineSeconds."""
from __future__ import annotations

from controller.policies.observed import Observed
from controller.policies.results import Assessment, Decision, Verdict
from runner.api import status as contract


def _deadline(o: Observed) -> int | None:
    return o.spec.get("activeDeadlineSeconds")


def exceeded(o: Observed) -> Verdict | None:
    deadline = _deadline(o)
    if not (deadline and o.start and o.now >= o.start + deadline):
        return None
    return Verdict(contract.FAILED, contract.DEADLINE_EXCEEDED,
                   f"the job ran longer than spec.activeDeadlineSeconds ({deadline}s)", at=o.start + deadline)


def wake(o: Observed, a: Assessment) -> Decision | None:
    """Look again when the deadline passes, unless the job is decided."""
    deadline = _deadline(o)
    if not (deadline and o.start) or a.terminal:
        return None
    return Decision(requeue_after=o.start + deadline - o.now)


def remaining(o: Observed) -> int | None:
    """The seconds a new attempt may run (at least 1), or None without a deadline."""
    deadline = _deadline(o)
    if not deadline:
        return None
    return max(1, int(deadline - (o.now - o.start))) if o.start else int(deadline)
