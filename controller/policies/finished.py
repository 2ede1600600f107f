"""A decided job (Succeeded or Failed) has nothing left to run: it gets its completionTime, its active attempts
are deleted and the runner's identity is revoked. A finished job stays finished: when no attempt is active and
the observations would start a new one (the Jobs were cleaned up by ttlSecondsAfterFinished, or backoffLimit was
raised afterwards), the recorded terminal status is kept. While an attempt is active, the status is always
rebuilt from observations."""
from __future__ import annotations

from controller.attempts import format_time
from controller.policies.observed import Observed
from controller.policies.results import Action, ActionKind, Assessment, Decision, Verdict, delete
from runner.api import status as contract

# What a job recorded as finished keeps of its status (the rest is rebuilt on every pass).
_KEPT = tuple(k for k in contract.CONTROLLER_STATUS_FIELDS if k not in ("observedGeneration", "conditions"))


def completion_time(o: Observed, phase: str, fallback: float) -> str:
    """The recorded completionTime while the phase stays the same, else `fallback`."""
    if o.old.get("phase") == phase and o.old.get("completionTime"):
        return o.old["completionTime"]
    return format_time(fallback)


def decided(o: Observed, v: Verdict) -> Decision:
    return Decision(status={**v.fields(), "completionTime": completion_time(o, v.phase, v.at or o.now)},
                    actions=[delete(x.job) for x in o.active])


def kept(o: Observed) -> Decision | None:
    if o.active or not o.finished:
        return None
    return Decision(status={k: o.old.get(k) for k in _KEPT})


def revoke_identity(o: Observed, a: Assessment) -> Decision | None:
    if not (a.terminal and o.has_identity):
        return None
    return Decision(actions=[Action(ActionKind.REVOKE_IDENTITY)])
