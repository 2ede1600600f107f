"""A running job keeps the spec it started with (Observed.effective): only the run policy
(contract.MUTABLE_SPEC_FIELDS) follows the live spec; a change to anything else is ignored, with a warning Event."""
from __future__ import annotations

from controller import naming
from controller.naming import spec_hash
from controller.policies.observed import Observed
from controller.policies.results import Decision, Event
from runner.api import status as contract


def changed(o: Observed) -> Decision | None:
    """Warn once per generation when the spec changed after the first attempt started."""
    first = o.first
    if first is None or o.ftj["metadata"].get("generation") == o.old.get("observedGeneration"):
        return None
    recorded = first.job["metadata"].get("annotations", {}).get(naming.ANNOTATION_SPEC_HASH)
    if not recorded or recorded == spec_hash(o.spec):
        return None
    return Decision(events=[Event(
        "Warning", "SpecChangeIgnored",
        "the spec changed after the job started; only " + ", ".join(contract.MUTABLE_SPEC_FIELDS)
        + " may change, the running job keeps its original spec (delete and re-create the FineTuneJob to change it)")])
