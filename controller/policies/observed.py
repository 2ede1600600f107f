"""What one pass observes of a FineTuneJob, as every policy (controller/policies/) reads it, and the controller's
options that the policies follow.

Inputs are plain dicts as the API server returns them: the FineTuneJob (its spec, metadata and the status
fields the runner reports), its attempts' Jobs (JobSets with several nodes: controller/jobset.py) and their
Pods. What one attempt ended as is controller/attempts.py.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from controller import jobset, limits, naming
from controller.attempts import (
    POD_FAILED, POD_SUCCEEDED, Attempt, attempts_of, belongs, deleting, owner_uid, parse_time, pod_phase,
    true_condition,
)
from controller.attribution import Attribution, Unattributed
from controller.podtemplate import RunnerPod
from controller.policy import Policy
from runner.api import names, status as contract


@dataclass(frozen=True)
class Options:
    retry_backoff: float = 10.0  # seconds before the 1st retry; doubles per counted failure
    retry_backoff_max: float = 300.0
    image_pull_timeout: float = 300.0  # a pod that cannot pull its image (or find its Secret) this long fails
    policy: Policy = field(default_factory=Policy)  # what a spec may ask of the cluster (controller/policy.py)
    runner: RunnerPod = field(default_factory=RunnerPod)  # the admin's pod additions (controller/podtemplate.py)
    # which Secret references the controller trusts (controller/attribution.py); the operator always sets it from
    # its flags (--unattributed-secrets), this default serves the pure functions' callers
    attribution: Attribution = field(default_factory=lambda: Attribution(unattributed=Unattributed.ALLOW))


@dataclass(frozen=True)
class Observed:
    ftj: dict
    spec: dict  # the live spec
    effective: dict  # the spec the job runs with: its first attempt's, with the live run policy
    old: dict  # the status as last written
    now: float
    options: Options
    has_identity: bool  # the runner's RoleBinding exists
    no_jobsets: str | None  # why JobSets cannot be created (not installed), or None
    untrusted: dict  # what the watch cache set aside (controller/limits.py): {"spec": why} / {"status": {...}}
    jobs: list[dict]  # this job's Jobs and JobSets
    attempts: list[Attempt]  # by index
    stopping: list[dict]  # pods and Jobs of stopped attempts that have not exited yet
    start: float | None  # when the first attempt started
    finished: bool  # the recorded status is terminal, and its condition says so

    @property
    def first(self) -> Attempt | None:
        return self.attempts[0] if self.attempts else None

    @property
    def last(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

    @property
    def active(self) -> list[Attempt]:
        return [x for x in self.attempts if x.outcome == "active"]

    @property
    def failed(self) -> list[Attempt]:
        return [x for x in self.attempts if x.outcome == "failed"]

    @property
    def counted(self) -> int:
        """The failures that count against spec.backoffLimit."""
        return sum(1 for x in self.failed if x.failure and x.failure.counted)


def observe(ftj: dict, jobs: list[dict], pods: list[dict], *, now: float, options: Options,
            has_identity: bool, no_jobsets: str | None) -> Observed:
    md, spec = ftj["metadata"], ftj.get("spec") or {}
    old = ftj.get("status") or {}
    uid = md.get("uid")
    jobs = [j for j in jobs if not uid or owner_uid(j, names.KIND) in (uid, None)]
    attempts = attempts_of(jobs, pods)
    # Pods still running outside a live attempt (its Job deleted), or in a failed one (a JobSet's other nodes
    # being stopped): the next attempt waits for them, so two runners never share checkpoints.
    settled = [x.job for x in attempts if x.outcome != "failed"]
    stopping: list[dict] = [p for p in pods if pod_phase(p) not in (POD_SUCCEEDED, POD_FAILED)
                            and not any(belongs(j, p) for j in settled)]
    stopping += [j for j in jobs if deleting(j)]
    starts = [parse_time((x.job.get("status") or {}).get("startTime") or x.job["metadata"].get("creationTimestamp"))
              for x in attempts]
    return Observed(
        ftj=ftj, spec=spec, effective=effective_spec(attempts[0] if attempts else None, spec), old=old,
        now=now, options=options, has_identity=has_identity, no_jobsets=no_jobsets,
        untrusted=limits.problems(ftj), jobs=jobs, attempts=attempts, stopping=stopping,
        start=min((t for t in starts if t), default=None),
        finished=old.get("phase") in contract.TERMINAL_PHASES and bool(true_condition(ftj, old["phase"])))


def effective_spec(first: Attempt | None, spec: dict) -> dict:
    """The spec the job runs with: the one its first attempt was created with (spec changes are ignored)."""
    if first is not None:
        text = (jobset.pod_template_of(first.job).get("metadata") or {}).get("annotations", {}).get(
            naming.ANNOTATION_SPEC)
        if text:
            try:
                original = json.loads(text).get("spec")
            except ValueError:
                original = None
            if isinstance(original, dict):
                # run policy comes from the live spec; everything else from the original
                return {**original, **{k: spec[k] for k in contract.MUTABLE_SPEC_FIELDS if k in spec}}
    return spec
