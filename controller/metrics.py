"""Prometheus metrics and the health endpoints, served on one port (`/metrics`, `/healthz`, `/readyz`)."""
from __future__ import annotations

from collections import Counter as _Tally
from typing import Callable, Iterable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from runner.api import status as contract

REGISTRY = CollectorRegistry()
TRANSITIONS = Counter("finetune_phase_transitions_total", "FineTuneJob phase changes written by the controller.",
                      ["phase"], registry=REGISTRY)
RECONCILE_ERRORS = Counter("finetune_reconcile_errors_total", "Reconcile passes that failed, by kind "
                           "(temporary: retried; permanent: not retried; unexpected: a bug, retried).", ["kind"],
                           registry=REGISTRY)
RECONCILE_SECONDS = Histogram("finetune_reconcile_duration_seconds", "Time of one reconcile pass.",
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=REGISTRY)


class _Live:
    """Gauges computed at scrape time from the watch caches (no state of their own)."""

    def __init__(self, phases: Callable[[], Iterable[str | None]], depth: Callable[[], int]):
        self.phases, self.depth = phases, depth

    def collect(self):
        jobs = GaugeMetricFamily("finetune_jobs", "FineTuneJobs by status.phase.", labels=["phase"])
        tally = _Tally(p or "Unknown" for p in self.phases())
        for phase in (*contract.PHASES, "Unknown"):
            jobs.add_metric([phase], tally.get(phase, 0))
        yield jobs
        yield GaugeMetricFamily("finetune_workqueue_depth", "FineTuneJobs waiting for a reconcile pass.",
                                value=self.depth())


def register_live(phases: Callable[[], Iterable[str | None]], depth: Callable[[], int]) -> None:
    REGISTRY.register(_Live(phases, depth))


async def serve(port: int, ready: Callable[[], bool], healthy: Callable[[], bool], host: str = "0.0.0.0") -> web.AppRunner:
    async def metrics(_):
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_):
        ok = healthy()
        return web.Response(status=200 if ok else 503, text="ok\n" if ok else "workers stopped\n")

    async def readyz(_):
        ok = ready()
        return web.Response(status=200 if ok else 503, text="ok\n" if ok else "starting\n")

    app = web.Application()
    app.add_routes([web.get("/metrics", metrics), web.get("/healthz", healthz), web.get("/readyz", readyz)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_port=True).start()  # replicas in one node network share it
    return runner
