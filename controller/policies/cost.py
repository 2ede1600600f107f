"""status.estimate: the training time and GPU-hours the spec alone allows (runner/api/cost.py), on every pass from
the first (Pending) on. The controller reads no data and no model config: a spec with epochs and no maxSteps, or a
model the table does not know by name, says `unknown` and why. A spec the watch cache set aside as out of bounds,
or one the contract refuses, gets none. The work is bounded (the table's rows, the first characters of a name)
and each spec's estimate is made once (a bounded cache keyed by the spec)."""
from __future__ import annotations

import functools
import json

from controller import naming
from controller.policies.observed import Observed
from runner.api import cost
from runner.api.errors import RunnerError
from runner.api.parse import parse_job


def estimate(o: Observed) -> dict | None:
    if o.untrusted.get("spec"):
        return None
    found = _estimate(json.dumps(naming.runner_manifest(o.ftj, o.effective), sort_keys=True))
    return json.loads(found) if found else None  # a copy: the caller may change it


@functools.lru_cache(maxsize=1024)
def _estimate(manifest: str) -> str | None:
    try:
        spec = parse_job(json.loads(manifest)).spec
    except RunnerError:
        return None
    return cost.from_spec(spec).model_dump_json(by_alias=True, exclude_none=True)
