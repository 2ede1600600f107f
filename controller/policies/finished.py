"""A decided job (Succeeded or Failed) has nothing left to run: it gets its completionTime, its active attempts
are deleted and the runner's identity is revoked. A finished job stays finished: when the observations would
start a new attempt (the Jobs were cleaned up by ttlSecondsAfterFinished, or backoffLimit was raised afterwards),
or still show an attempt active that the verdict deleted (the watch cache has not had the Job's deletion yet, while
its pod is already going), the recorded terminal status is kept and such an attempt deleted again - never a
second Job of the same attempt. A verdict found again on a later pass (VERDICTS come first) is rebuilt as ever."""
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
    if not o.finished:
        return None
    return Decision(status={k: o.old.get(k) for k in _KEPT}, actions=[delete(x.job) for x in o.active])


def revoke_identity(o: Observed, a: Assessment) -> Decision | None:
    if not (a.terminal and o.has_identity):
        return None
    return Decision(actions=[Action(ActionKind.REVOKE_IDENTITY)])
