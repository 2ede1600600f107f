"""Retries: a failure that counts (controller/attempts.py) makes the next attempt wait
`retry_backoff * 2**(failures-1)` seconds (capped at retry_backoff_max) after it; when more failures were
counted than spec.backoffLimit allows, the job is Failed (BackoffLimitExceeded). The next attempt resumes from
the newest checkpoint (the runner does that by itself when run again with the same spec)."""
from __future__ import annotations

from controller.attempts import Failure, clip
from controller.policies.observed import Observed
from controller.policies.results import Verdict
from runner.api import status as contract
from runner.api.cluster import ClusterFields

DEFAULT_LIMIT = ClusterFields.model_fields["backoff_limit"].default  # spec.backoffLimit when unset


def exhausted(o: Observed) -> Verdict | None:
    limit = int(o.spec.get("backoffLimit", DEFAULT_LIMIT))
    if o.active or o.counted <= limit:
        return None
    f = o.failed[-1].failure
    return Verdict(contract.FAILED, contract.BACKOFF_LIMIT_EXCEEDED,
                   clip(f"{o.counted} attempts failed (backoffLimit {limit}); last: {f.reason}: {f.message}"),
                   at=f.at)


def retry_at(o: Observed, failure: Failure) -> float:
    """When the attempt after `failure` may start."""
    delay = 0.0
    if failure.counted and o.options.retry_backoff > 0:
        delay = min(o.options.retry_backoff * 2 ** max(o.counted - 1, 0), o.options.retry_backoff_max)
    return (failure.at or o.now) + delay
