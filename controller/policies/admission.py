"""Whether the spec may start an attempt at all: the cluster admin's policy (controller/policy.py), a JobSet
install for a job on several nodes, Secrets checked at admission (controller/attribution.py), and the contract's rules (runner/api/parse.py, as `runner validate` and the
admission webhook apply them). Each refusal fails the job with InvalidSpec before any Job exists; the policy and
the JobSet install are checked again before every retry (either may have changed meanwhile)."""
from __future__ import annotations

from controller import attribution, jobset, naming
from controller.attempts import clip
from controller.policies.observed import Observed
from controller.policies.results import Verdict
from runner.api import status as contract
from runner.api.errors import SpecError
from runner.api.parse import parse_job


def spec_problems(ftj: dict, spec: dict) -> list[str]:
    """What the contract refuses in `spec`, as the runner would say it (empty: nothing)."""
    try:
        parse_job(naming.runner_manifest(ftj, spec))
    except SpecError as e:
        return e.problems
    return []


def _refused(problems: list[str] | str) -> Verdict:
    text = problems if isinstance(problems, str) else "; ".join(problems)
    return Verdict(contract.FAILED, contract.INVALID_SPEC, clip(text))


def refused_by_policy(o: Observed) -> Verdict | None:
    if o.active or o.finished:
        return None
    refusals = o.options.policy.refusals(o.effective)
    return _refused(refusals) if refusals else None


def unattributed_secrets(o: Observed) -> Verdict | None:
    """A Secret the admission webhook did not check for the job's creator never reaches a pod
    (controller/attribution.py); checked before every attempt."""
    if o.active or o.finished:
        return None
    refusals = attribution.refusals(o.options.attribution, o.ftj["metadata"], o.spec, runs_with=o.effective)
    return _refused(refusals) if refusals else None


def needs_jobsets(o: Observed) -> Verdict | None:
    if o.active or o.finished or not o.no_jobsets or jobset.nodes_of(o.effective) <= 1:
        return None
    return _refused(o.no_jobsets)


def invalid_spec(o: Observed) -> Verdict | None:
    if o.attempts:
        return None
    problems = spec_problems(o.ftj, o.effective)
    return _refused(problems) if problems else None
