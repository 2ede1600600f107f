"""What the policies return (controller/policies/): a Verdict (the job is decided), a Decision (status fields,
actions, events, when to look again), and the Assessment that controller/status.py combines them into."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from controller import jobset
from runner.api import status as contract


class ActionKind(StrEnum):
    CREATE_ATTEMPT = "create-attempt"
    DELETE_JOB = "delete-job"
    REVOKE_IDENTITY = "revoke-identity"


@dataclass
class Action:
    kind: ActionKind
    name: str = ""
    attempt: int = 0
    spec: dict | None = None
    deadline_seconds: int | None = None
    resource: str = "jobs"  # what delete-job deletes: jobs, or jobsets (an attempt on several nodes)


def delete(obj: dict) -> Action:
    """Delete an attempt's Job or JobSet."""
    return Action(ActionKind.DELETE_JOB, name=obj["metadata"]["name"],
                  resource=jobset.PLURAL if jobset.is_jobset(obj) else "jobs")


@dataclass
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Verdict:
    """The job is decided: Succeeded or Failed, why, and since when."""
    phase: str
    reason: str | None
    message: str
    at: float | None = None  # when it was decided (the completionTime); None: now
    output: str | None = None  # of a job that succeeded
    metrics: dict | None = None

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"phase": self.phase, "reason": self.reason, "message": self.message}
        if self.phase == contract.SUCCEEDED:
            out.update(output=self.output, metrics=self.metrics)
        return out


@dataclass
class Decision:
    """One policy's part of a pass: the status fields it sets, what the controller must do, the Events to post,
    and the seconds after which to look again (None: no need)."""
    status: dict[str, Any] = field(default_factory=dict)
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None


@dataclass
class Assessment:
    """A pass's result: the controller-owned status, the actions, the Events, the earliest time to look again."""
    status: dict
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None

    def requeue(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)

    def apply(self, d: Decision | None) -> None:
        if d is None:
            return
        self.status.update(d.status)
        self.actions += d.actions
        self.events += d.events
        if d.requeue_after is not None:
            self.requeue(d.requeue_after)

    @property
    def terminal(self) -> bool:
        return self.status.get("phase") in contract.TERMINAL_PHASES
