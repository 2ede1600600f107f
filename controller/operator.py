"""The kopf wiring: watch caches (kopf indexes), watch handlers that queue FineTuneJob keys, and workers.

Kopf does the watching (resumable list+watch, reconnects, server-side label selectors) and keeps the
caches; it calls no handler before every cache has listed its objects, so no pass sees a half-synced
world. Every event of a FineTuneJob, of its Jobs (JobSets, with several nodes), Pods or runner RoleBinding only
queues the FineTuneJob's key. Workers take keys from a `WorkQueue` (one pass per key at a time, dirty keys
re-queued, delayed re-queues for retries, back-offs and deadlines) and run `Reconciler.reconcile` in a
thread. A pass raises `kopf.TemporaryError` (retried after its delay) or `kopf.PermanentError` (not
retried). Level-triggered: any pass recomputes everything, so a missed or merged event costs nothing.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import kopf

from controller import jobset, limits, metrics, naming, webhook
from controller.kube import Kube, load_configuration
from controller.reconciler import Reconciler, Snapshot
from controller.status import Options
from controller.workqueue import WorkQueue
from runner.api import names

log = logging.getLogger("controller")
SELECTOR = naming.LABEL_JOB_UID  # children are watched with this label only (server-side)


@dataclass
class Webhook:
    """The validating admission webhook's server (controller/webhook.py)."""
    cert: str
    key: str
    port: int = 8443
    host: str = "0.0.0.0"


@dataclass
class Config:
    image: str
    workers: int = 8
    http_port: int = 8080
    http_host: str = "0.0.0.0"
    kubeconfig: str | None = None
    options: Options = field(default_factory=Options)
    webhook: Webhook | None = None
    jobsets: bool = True  # watch and create JobSets (resources.nodes > 1); False: such jobs are refused


class _State:
    config: Config
    queue: WorkQueue
    reconciler: Reconciler
    pool: ThreadPoolExecutor
    workers: list[asyncio.Task]
    ready: bool = False
    indices: dict


STATE = _State()


# ------------------------------------------------------------------------------------ caches
def _slim_meta(md, *, annotations: tuple[str, ...] = ()) -> dict:
    out = {k: md.get(k) for k in ("name", "namespace", "uid", "generation", "resourceVersion", "creationTimestamp",
                                  "deletionTimestamp", "labels", "ownerReferences") if md.get(k) is not None}
    ann = md.get("annotations") or {}
    out["annotations"] = {k: ann[k] for k in annotations if k in ann}
    return out


@kopf.index(names.GROUP, names.VERSION, names.PLURAL)
async def ftj_cache(namespace, name, body, **_):
    # Untrusted input: a spec or status out of bounds is set aside here, before anything else reads it.
    return {(namespace, name): limits.screen({"metadata": _slim_meta(body.metadata), "spec": dict(body.spec),
                                              "status": dict(body.status)})}


@kopf.index("batch", "v1", "jobs", labels={SELECTOR: kopf.PRESENT})
async def job_cache(body, labels, **_):
    tmpl = (body.spec.get("template") or {}).get("metadata") or {}
    spec = {"activeDeadlineSeconds": body.spec.get("activeDeadlineSeconds"), "suspend": body.spec.get("suspend"),
            "template": {"metadata": {"annotations": {k: v for k, v in (tmpl.get("annotations") or {}).items()
                                                      if k == naming.ANNOTATION_SPEC}}}}
    return {labels[SELECTOR]: {"metadata": _slim_meta(body.metadata, annotations=(naming.ANNOTATION_SPEC_HASH,)),
                               "spec": spec, "status": dict(body.status)}}


async def jobset_cache(body, labels, **_):
    """Registered by run() unless --no-jobsets. Kopf watches JobSets once their CRD exists (installed later too)."""
    rjobs = body.spec.get("replicatedJobs") or [{}]
    job_spec = (rjobs[0].get("template") or {}).get("spec") or {}
    tmpl = (job_spec.get("template") or {}).get("metadata") or {}
    spec = {"suspend": body.spec.get("suspend"), "replicatedJobs": [{"name": rjobs[0].get("name"), "template": {
        "spec": {"parallelism": job_spec.get("parallelism"), "template": {"metadata": {"annotations": {
            k: v for k, v in (tmpl.get("annotations") or {}).items() if k == naming.ANNOTATION_SPEC}}}}}}]}
    return {labels[SELECTOR]: {"kind": jobset.KIND,
                               "metadata": _slim_meta(body.metadata, annotations=(naming.ANNOTATION_SPEC_HASH,)),
                               "spec": spec, "status": {"conditions": body.status.get("conditions") or []}}}


@kopf.index("v1", "pods", labels={SELECTOR: kopf.PRESENT})
async def pod_cache(body, labels, **_):
    # (a JobSet's pods: the node's rank is the completion index the Indexed Job annotates)
    return {labels[SELECTOR]: {"metadata": _slim_meta(body.metadata, annotations=(jobset.COMPLETION_INDEX,)),
                               "status": dict(body.status)}}


@kopf.index("rbac.authorization.k8s.io", "v1", "rolebindings", labels={SELECTOR: kopf.PRESENT})
async def identity_cache(labels, name, **_):
    return {labels[SELECTOR]: name}


# ---------------------------------------------------------------------------------- triggers
def _queue(key) -> None:
    STATE.queue.add(key)


@kopf.on.event(names.GROUP, names.VERSION, names.PLURAL)
async def ftj_changed(namespace, name, **_):
    _queue((namespace, name))


def _queue_owner(namespace, body) -> None:
    """A child (Job, Pod, RoleBinding) changed: reconcile the FineTuneJob named in its annotation."""
    owner = body.metadata.get("annotations", {}).get(naming.ANNOTATION_JOB_NAME)
    if owner:
        _queue((namespace, owner))


@kopf.on.event("batch", "v1", "jobs", labels={SELECTOR: kopf.PRESENT})
async def job_changed(namespace, body, **_):
    _queue_owner(namespace, body)


async def jobset_changed(namespace, body, **_):
    _queue_owner(namespace, body)


@kopf.on.event("v1", "pods", labels={SELECTOR: kopf.PRESENT})
async def pod_changed(namespace, body, **_):
    _queue_owner(namespace, body)


@kopf.on.event("rbac.authorization.k8s.io", "v1", "rolebindings", labels={SELECTOR: kopf.PRESENT})
async def identity_changed(namespace, body, **_):
    _queue_owner(namespace, body)


# ------------------------------------------------------------------------------------ workers
def _snapshot(key) -> Snapshot | None:
    """Copy what the caches hold for one FineTuneJob (in the event loop, where the caches change)."""
    idx = STATE.indices
    store = idx["ftj_cache"].get(key)
    # (briefly two objects under one name: a deleted FineTuneJob and its re-creation; the live one wins)
    ftj = max(store, key=lambda f: (not f["metadata"].get("deletionTimestamp"),
                                     f["metadata"].get("creationTimestamp") or "")) if store else None
    if ftj is None:
        return None
    uid = ftj["metadata"]["uid"]
    jobs = list(idx["job_cache"].get(uid, []))
    if "jobset_cache" in idx:
        jobs += list(idx["jobset_cache"].get(uid, []))
    pods = list(idx["pod_cache"].get(uid, []))
    return Snapshot(ftj=ftj, jobs=jobs, pods=pods, has_identity=uid in idx["identity_cache"])


async def _worker(n: int) -> None:
    loop = asyncio.get_running_loop()
    q = STATE.queue
    while True:
        key = await q.get()
        t0 = time.monotonic()
        try:
            snap = _snapshot(key)
            if snap is None:
                q.forget(key)
                continue
            out = await loop.run_in_executor(STATE.pool, STATE.reconciler.reconcile, snap)
            q.forget(key)
            if out.patched and out.phase_after != out.phase_before and out.phase_after:
                metrics.TRANSITIONS.labels(out.phase_after).inc()
            if out.requeue_after is not None:
                q.add_after(key, out.requeue_after + 0.05)
        except kopf.TemporaryError as e:
            metrics.RECONCILE_ERRORS.labels("temporary").inc()
            log.info("%s/%s: %s (retrying)", *key, e)
            q.add_after(key, max(float(e.delay or 0), q.backoff(key)))
        except kopf.PermanentError as e:
            metrics.RECONCILE_ERRORS.labels("permanent").inc()
            log.error("%s/%s: %s (not retried)", *key, e)
        except Exception:  # noqa: BLE001 - a bug must not kill the worker; retry with back-off
            metrics.RECONCILE_ERRORS.labels("unexpected").inc()
            log.exception("%s/%s: reconcile failed", *key)
            q.add_after(key, q.backoff(key))
        finally:
            metrics.RECONCILE_SECONDS.observe(time.monotonic() - t0)
            q.done(key)


@kopf.on.startup()
async def _startup(settings: kopf.OperatorSettings, **kwargs):
    cfg = STATE.config
    settings.peering.standalone = True
    settings.posting.enabled = False  # the controller posts its own Events
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    for resource in (("batch", "jobs"), ("v1", "pods"), ("rbac.authorization.k8s.io", "rolebindings"),
                     (jobset.GROUP, jobset.PLURAL)):
        settings.watching.label_selectors[resource] = SELECTOR
    STATE.indices = {k: kwargs[k] for k in ("ftj_cache", "job_cache", "pod_cache", "identity_cache",
                                            "jobset_cache") if k in kwargs}
    STATE.queue = WorkQueue()
    kube = Kube.from_config(load_configuration(cfg.kubeconfig, pool_size=cfg.workers + 2))
    STATE.reconciler = Reconciler(kube, image=cfg.image, options=cfg.options, jobsets=cfg.jobsets)
    STATE.pool = ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="reconcile")
    STATE.workers = [asyncio.create_task(_worker(i), name=f"worker-{i}") for i in range(cfg.workers)]
    metrics.register_live(lambda: [next(iter(s)).get("status", {}).get("phase") for s in
                                   list(STATE.indices["ftj_cache"].values()) if s],
                          lambda: len(STATE.queue))
    if cfg.http_port:
        STATE.http = await metrics.serve(cfg.http_port, ready=lambda: STATE.ready,
                                         healthy=lambda: all(not t.done() for t in STATE.workers), host=cfg.http_host)
    if cfg.webhook:
        STATE.webhook = await webhook.serve(cfg.webhook.port, cfg.webhook.cert, cfg.webhook.key, cfg.options.policy,
                                            webhook.sar_check(kube), STATE.pool, host=cfg.webhook.host)
    STATE.ready = True
    log.info("controller started: %d workers, runner image %s", cfg.workers, cfg.image)


@kopf.on.cleanup()
async def _cleanup(**_):
    for t in getattr(STATE, "workers", []):
        t.cancel()
    for server in (getattr(STATE, "http", None), getattr(STATE, "webhook", None)):
        if server is not None:
            await server.cleanup()
    if getattr(STATE, "pool", None):
        STATE.pool.shutdown(wait=False, cancel_futures=True)


def _watch_jobsets() -> None:
    selector = {SELECTOR: kopf.PRESENT}
    kopf.index(jobset.GROUP, jobset.VERSION, jobset.PLURAL, labels=selector)(jobset_cache)
    kopf.on.event(jobset.GROUP, jobset.VERSION, jobset.PLURAL, labels=selector)(jobset_changed)


def run(config: Config, namespaces: list[str]) -> None:
    STATE.config = config
    if config.jobsets:
        _watch_jobsets()
    limits.raise_recursion_limit()  # before kopf parses its first watch event (and before any thread starts)
    kopf.run(standalone=True, clusterwide=not namespaces, namespaces=namespaces)
