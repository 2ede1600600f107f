"""What the attempts ended as decides the job: the newest attempt that succeeded makes it Succeeded (with the
runner's output and metrics), a failure another attempt cannot help makes it Failed (controller/attempts.py
says which failures those are)."""
from __future__ import annotations

from controller import limits
from controller.attempts import clip, parse_time, terminated
from controller.policies.observed import Observed
from controller.policies.results import Verdict
from runner.api import status as contract


def succeeded(o: Observed) -> Verdict | None:
    x = next((x for x in reversed(o.attempts) if x.outcome == "succeeded"), None)
    if x is None:
        return None
    term = terminated(x.pod) if x.pod else None
    return Verdict(contract.SUCCEEDED, None, clip(f"attempt {x.index} succeeded"),
                   at=(parse_time((term or {}).get("finishedAt"))
                       or parse_time((x.job.get("status") or {}).get("completionTime"))),
                   output=limits.clean_output(x.result.get("output")),
                   metrics=limits.clean_metrics(x.result.get("metrics")))


def permanent_failure(o: Observed) -> Verdict | None:
    x = next((x for x in reversed(o.failed) if x.failure and not x.failure.retryable), None)
    if x is None:
        return None
    f = x.failure
    return Verdict(contract.FAILED, f.reason, clip(f"attempt {x.index}: {f.message}"), at=f.at)
