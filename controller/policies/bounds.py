"""A spec or status outside the controller's bounds (controller/limits.py) fails the job: a spec out of bounds is
not read at all; invalid status fields (written through the status subresource) stop a job still running."""
from __future__ import annotations

from controller import limits
from controller.attempts import clip
from controller.policies.observed import Observed
from controller.policies.results import Verdict
from runner.api import status as contract


def spec_out_of_bounds(o: Observed) -> Verdict | None:
    why = o.untrusted.get("spec")
    if not why:
        return None
    return Verdict(contract.FAILED, contract.INVALID_SPEC, clip(
        f"{why}: the controller does not read a spec out of its bounds (depth {limits.SPEC_MAX_DEPTH}, "
        f"{limits.SPEC_MAX_BYTES // 1024} KiB); delete the FineTuneJob and create it with a valid spec"))


def status_invalid(o: Observed) -> Verdict | None:
    fields = o.untrusted.get("status")
    if not fields or o.finished:  # a finished job keeps its verdict; the fields go
        return None
    return Verdict(contract.FAILED, contract.INVALID_STATUS, clip(
        "the status held invalid fields, written through the status subresource (by the runner's identity or an "
        "admin): " + "; ".join(fields.values()) + "; they were removed and the job stopped"))
