"""spec.suspend deletes the active attempt's Job (the runner gets SIGTERM and saves a checkpoint); resuming creates
the next attempt once every pod of the stopped one is gone (controller/policies/next_attempt.py), so two runners
never share checkpoints."""
from __future__ import annotations

from controller.policies.observed import Observed
from controller.policies.results import Decision, delete
from runner.api import status as contract


def suspended(o: Observed) -> Decision | None:
    if not o.spec.get("suspend"):
        return None
    n = len(o.active) + len(o.stopping)
    return Decision(
        status={"phase": contract.SUSPENDED, "reason": None,
                "message": "suspended" + (f"; stopping {n} runner pod(s) (they save a checkpoint)" if n else
                                          "; set spec.suspend to false to resume from the last checkpoint")},
        actions=[delete(x.job) for x in o.active])
