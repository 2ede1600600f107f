"""The kopf wiring: watch caches (kopf indexes), watch handlers that queue FineTuneJob keys, and workers.

Kopf does the watching (resumable list+watch, reconnects, server-side label selectors) and keeps the
caches; it calls no handler before every cache has listed its objects, so no pass sees a half-synced
world. Every event of a FineTuneJob, of its Jobs (JobSets, with several nodes), Pods or runner RoleBinding only
queues the FineTuneJob's key. Workers take keys from a `WorkQueue` (one pass per key at a time, dirty keys
re-queued, delayed re-queues for retries, back-offs and deadlines) and run `Reconciler.reconcile` in a
thread. A pass raises `kopf.TemporaryError` (retried after its delay) or `kopf.PermanentError` (not
retried). Level-triggered: any pass recomputes everything, so a missed or merged event costs nothing.

Several replicas (the chart runs two): each serves health, metrics and the admission webhook, and keeps its watch
caches warm (kopf's indexes and event handlers only read and queue keys); only the holder of the leader Lease
(controller/leader.py) starts the workers, the one part that writes, so only one ever reconciles and a standby that
takes over acts within a pass of getting the Lease. A replica that loses the Lease exits and restarts as a standby. The webhook's certificate and the attribution key are kept by
controller/certs.py before anything else starts.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import kopf

from controller import attribution, certs, jobset, leader, limits, metrics, naming, webhook
from controller.kube import Kube, load_configuration
from controller.reconciler import Reconciler, Snapshot
from controller.status import Options
from controller.workqueue import WorkQueue
from runner.api import names

log = logging.getLogger("controller")
SELECTOR = naming.LABEL_JOB_UID  # children are watched with this label only (server-side)


@dataclass
class Webhook:
    """The admission webhook's server (controller/webhook.py). `cert`/`key`: files another tool keeps (cert-manager);
    without them the controller makes and rotates its own (`state`)."""
    cert: str | None = None
    key: str | None = None
    port: int = 8443
    host: str = "0.0.0.0"


@dataclass
class KeptState:
    """The controller's own Secret (controller/certs.py): the webhook's certificate and the attribution key."""
    namespace: str
    secret: str
    service: str
    registrations: list[certs.Registration]
    hosts: tuple[str, ...] = ()  # of a registration by URL: names the certificate is for besides the Service's
    refresh_seconds: float = 3600.0


@dataclass
class Election:
    """Leader election over a Lease (controller/leader.py)."""
    namespace: str
    name: str
    timing: leader.Timing = field(default_factory=leader.Timing)


@dataclass
class Config:
    image: str
    workers: int = 8
    http_port: int = 8080
    http_host: str = "0.0.0.0"
    kubeconfig: str | None = None
    options: Options = field(default_factory=Options)
    webhook: Webhook | None = None
    state: KeptState | None = None
    election: Election | None = None
    unattributed: attribution.Unattributed = attribution.Unattributed.REFUSE
    jobsets: bool = True  # watch and create JobSets (resources.nodes > 1); False: such jobs are refused


class _State:
    config: Config
    queue: WorkQueue
    reconciler: Reconciler
    pool: ThreadPoolExecutor
    workers: list[asyncio.Task]
    ready: bool = False
    leader: asyncio.Event  # set once this replica leads: the workers start
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
    return {(namespace, name): limits.screen({"metadata": _slim_meta(body.metadata, annotations=(
                                                 attribution.ANNOTATION,)), "spec": dict(body.spec),
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
    STATE.reconciler = Reconciler(STATE.kube, image=cfg.image, options=STATE.options, jobsets=cfg.jobsets)
    STATE.starter = asyncio.create_task(_work_when_leading(cfg.workers))
    metrics.register_live(lambda: [next(iter(s)).get("status", {}).get("phase") for s in
                                   list(STATE.indices["ftj_cache"].values()) if s],
                          lambda: len(STATE.queue))
    STATE.ready = True
    log.info("controller started: %d workers, runner image %s", cfg.workers, cfg.image)


async def _work_when_leading(count: int) -> None:
    """The workers start once this replica leads (at once without leader election); until then events only queue."""
    await STATE.leader.wait()
    STATE.workers = [asyncio.create_task(_worker(i), name=f"worker-{i}") for i in range(count)]
    log.info("reconciling: %d workers, %d jobs queued", count, len(STATE.queue))


@kopf.on.cleanup()
async def _cleanup(**_):
    for t in getattr(STATE, "workers", []):
        t.cancel()


def _watch_jobsets() -> None:
    selector = {SELECTOR: kopf.PRESENT}
    kopf.index(jobset.GROUP, jobset.VERSION, jobset.PLURAL, labels=selector)(jobset_cache)
    kopf.on.event(jobset.GROUP, jobset.VERSION, jobset.PLURAL, labels=selector)(jobset_changed)


async def _keep_state(keeper: certs.Keeper, context, every: float) -> None:
    """Re-check the certificate and caBundle periodically; a rotated certificate is served to new connections."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(every)
        try:
            if await loop.run_in_executor(STATE.pool, keeper.ensure) and context is not None:
                context.load_cert_chain(str(keeper.cert_file), str(keeper.key_file))
                log.info("webhook certificate reloaded")
        except Exception as e:  # noqa: BLE001 - the current certificate stays; tried again next time
            log.warning("webhook certificate check failed: %s", e)


def _lead_or_exit(elector: leader.Elector, loop: asyncio.AbstractEventLoop) -> None:
    """Acquire the Lease, let the workers start, renew it until that fails, then exit at once: another replica may
    be acting already. (A clean stop releases it instead: elector.release.)"""
    if not elector.acquire():
        return
    loop.call_soon_threadsafe(STATE.leader.set)
    if not elector.keep():
        return
    log.error("lost the leader lease: exiting, to restart as a standby")
    logging.shutdown()
    os._exit(1)


async def _main(config: Config, namespaces: list[str]) -> None:
    loop = asyncio.get_running_loop()
    STATE.kube = Kube.from_config(load_configuration(config.kubeconfig, pool_size=config.workers + 4))
    STATE.pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="reconcile")
    STATE.workers = []
    options = config.options
    keeper = None
    if config.state:
        st = config.state
        keeper = certs.Keeper(STATE.kube, st.namespace, st.secret, st.service, st.registrations, hosts=st.hosts,
                              directory=Path(tempfile.mkdtemp(prefix="webhook-tls-")),
                              manage_tls=bool(config.webhook and not config.webhook.cert))
        try:
            await loop.run_in_executor(STATE.pool, keeper.ensure)
        except Exception as e:  # noqa: BLE001 - RBAC or the API server: say which Secret, retry by restarting
            log.error("cannot keep the Secret %s/%s (webhook certificate, attribution key): %s", st.namespace,
                      st.secret, getattr(e, "reason", None) or e)
            raise SystemExit(75) from None
    options = dataclasses.replace(options, attribution=attribution.Attribution(
        key=keeper.state.attribution_key if keeper else None, unattributed=config.unattributed))
    STATE.options = options
    STATE.leader = asyncio.Event()
    servers = []
    if config.http_port:
        servers.append(await metrics.serve(
            config.http_port, ready=lambda: STATE.ready,
            healthy=lambda: all(not t.done() for t in STATE.workers), host=config.http_host))
    context = None
    if config.webhook:
        hook = config.webhook
        cert, key = (hook.cert, hook.key) if hook.cert else (str(keeper.cert_file), str(keeper.key_file))
        context = webhook.tls_context(cert, key)
        servers.append(await webhook.serve(hook.port, context, options.policy, webhook.sar_check(STATE.kube),
                                           STATE.pool, host=hook.host, attribution_key=options.attribution.key))
    refresher = (asyncio.create_task(_keep_state(keeper, context, config.state.refresh_seconds))
                 if keeper else None)
    elector = None
    if config.election:
        e = config.election
        elector = leader.Elector(STATE.kube, e.namespace, e.name, timing=e.timing)
        threading.Thread(target=_lead_or_exit, args=(elector, loop), name="leader-lease", daemon=True).start()
    else:
        STATE.leader.set()
    try:
        await kopf.operator(standalone=True, clusterwide=not namespaces, namespaces=namespaces)
    finally:
        if elector is not None:
            await loop.run_in_executor(None, elector.release)
        if refresher:
            refresher.cancel()
        for server in servers:
            await server.cleanup()
        STATE.pool.shutdown(wait=False, cancel_futures=True)


def run(config: Config, namespaces: list[str]) -> None:
    STATE.config = config
    if config.jobsets:
        _watch_jobsets()
    limits.raise_recursion_limit()  # before kopf parses its first watch event (and before any thread starts)
    asyncio.run(_main(config, namespaces))
