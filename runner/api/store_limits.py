"""The limits on a runner's calls to remote stores, as values: their names, defaults and bounds, their text form
(FINETUNE_STORE_TIMEOUTS, the chart's runner.storeTimeouts) and a job's own tighter ones (spec.storeTimeouts).
Enforcing them is runner/store/timeouts.py.

    connect    seconds to open a connection (default 10)
    read       seconds to wait for the next byte of an answer, or to send the next byte (default 30)
    stall      seconds a request may wait for an answer from its endpoint, retries included (default 90): a frozen
               endpoint ends the attempt within read + stall + read (about 2.5 minutes with the defaults)
    deadline   seconds one operation may take in all, retries included (default 10800 = 3 h): a crawling endpoint

The environment's limits are the ceiling (on a cluster, the admin's chart value): a job's spec.storeTimeouts may
only tighten them; a value above the ceiling is cut to it, and the runner says so.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

from runner.api.cluster import STORE_MAX_SECONDS as MAX_SECONDS, StoreTimeouts

EXAMPLE = "connect=10,read=30,stall=90,deadline=10800"


@dataclass(frozen=True)
class StoreLimits:
    connect: float = 10.0
    read: float = 30.0
    stall: float = 90.0
    deadline: float = 3 * 3600.0

    def describe(self) -> str:
        return ",".join(f"{f.name}={getattr(self, f.name):g}" for f in fields(self))

    @classmethod
    def parse(cls, text: str, source: str) -> "StoreLimits":
        """`connect=10,read=30` (any subset; the rest default); a ValueError naming `source` and the fix."""
        values: dict[str, float] = {}
        names = {f.name for f in fields(cls)}
        for part in filter(None, (p.strip() for p in (text or "").replace(";", ",").split(","))):
            key, sep, value = part.partition("=")
            key = key.strip().lower()
            try:
                number = float(value) if sep and key in names else None
            except ValueError:
                number = None
            if number is None or not (0 < number < MAX_SECONDS):
                raise ValueError(f"{source}={text!r}: {part!r} is not a limit; write it as {EXAMPLE!r} (seconds, each "
                                 "above 0; any subset), or leave it unset for those defaults")
            values[key] = number
        return cls(**values)

    def tightened(self, job: StoreTimeouts | None) -> tuple["StoreLimits", list[str]]:
        """These limits with a job's tighter ones applied, and what the job asked above them (cut to them)."""
        if job is None:
            return self, []
        out, cut = self, []
        for f in fields(self):
            asked = getattr(job, f.name)
            if asked is None:
                continue
            ceiling = getattr(self, f.name)
            if asked > ceiling:
                cut.append(f"spec.storeTimeouts.{f.name}={asked:g} is above this cluster's {ceiling:g} (the "
                           f"admin's ceiling): {ceiling:g} applies")
            out = replace(out, **{f.name: min(asked, ceiling)})
        return out, cut


DEFAULTS = StoreLimits()
