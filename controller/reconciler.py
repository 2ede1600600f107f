"""One reconcile pass for one FineTuneJob: assess what is observed, act, write status, post Events.

    Reconciler(kube, image=...).reconcile(Snapshot(ftj, jobs, pods, has_identity)) -> Outcome

The snapshot comes from the operator's watch caches; everything decided here comes from
`controller.status.assess`. Errors: `kopf.TemporaryError` (retry later: the API said 409/429/5xx, or a
name is still taken by an object being deleted) and `kopf.PermanentError` (nothing to retry).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import kopf
from kubernetes.client.exceptions import ApiException

from controller import children, jobset, limits, naming
from controller.kube import Kube, api_message, ns_path
from controller.attempts import format_time, parse_time
from controller.policies.results import Action, ActionKind, Assessment
from controller.status import Options, assess, finalize
from runner.api import names, status as contract

log = logging.getLogger("controller")
COMPONENT = "finetune-controller"
UNWATCHED_POLL = 5.0  # seconds between passes over a job whose JobSets kopf does not watch (Reconciler._jobs)


@dataclass
class Snapshot:
    ftj: dict
    jobs: list[dict] = field(default_factory=list)  # the attempts' Jobs and JobSets
    pods: list[dict] = field(default_factory=list)
    has_identity: bool = False


@dataclass
class Outcome:
    requeue_after: float | None
    phase_before: str | None
    phase_after: str | None
    patched: bool


def _retryable(e: ApiException) -> bool:
    return e.status in (409, 429) or (e.status or 500) >= 500


class Reconciler:
    def __init__(self, kube: Kube, *, image: str, options: Options = Options(), clock=time.time,
                 jobsets: bool = True):
        """`jobsets` False: never create JobSets (--no-jobsets), so jobs with several nodes are refused."""
        self.kube = kube
        self.image = image
        self.options = options
        self.clock = clock
        self.jobsets = jobset.Discovery(kube) if jobsets else None
        self._unwatched_logged = False

    def _jobs(self, snap: Snapshot) -> tuple[list[dict], bool]:
        """The attempts' Jobs and JobSets, and whether the JobSets had to be listed from the API. Kopf watches
        JobSets once their CRD exists, also one installed while the controller runs - but it looks for the new
        API on the CRD's own events, which can come before the API server serves it, and then misses it until
        a restart. So when a job on several nodes has started an attempt and the cache holds no JobSet of it,
        they are listed here (and the job looked at again every UNWATCHED_POLL seconds, as no event will come)."""
        ftj = snap.ftj
        started = ((ftj.get("status") or {}).get("attempt") is not None
                   and jobset.nodes_of(ftj.get("spec") or {}) > 1)
        if self.jobsets is None or not started or any(jobset.is_jobset(j) for j in snap.jobs):
            return snap.jobs, False
        md = ftj["metadata"]
        try:
            items = self.kube.request("GET", ns_path(jobset.API_VERSION, md["namespace"], jobset.PLURAL),
                                      query=[("labelSelector", f"{naming.LABEL_JOB_UID}={md['uid']}")])["items"]
        except ApiException as e:
            if e.status == 404:  # not installed (any more)
                return snap.jobs, False
            raise kopf.TemporaryError(f"listing JobSets: {e.status}: {api_message(e)}", delay=1.0) from e
        old = [js for js in items if self.clock() - (parse_time(js["metadata"].get("creationTimestamp")) or 0) > 30]
        if old and not self._unwatched_logged:  # (a younger one may just not be in the cache yet)
            self._unwatched_logged = True
            log.warning("JobSets are not in the watch cache (JobSet installed after the controller started?): "
                        "reading them every %ss; restart the controller to watch them", UNWATCHED_POLL)
        return [*snap.jobs, *({**js, "kind": jobset.KIND} for js in items)], bool(items)

    def _no_jobsets(self, ftj: dict) -> str | None:
        """Why a job with several nodes cannot run here (JobSet disabled or not installed), asked only for one."""
        nodes = jobset.nodes_of(ftj.get("spec") or {})
        if nodes <= 1:
            return None
        if self.jobsets is None:
            return jobset.refusal(nodes, disabled=True)
        try:
            return None if self.jobsets.available() else jobset.refusal(nodes)
        except ApiException as e:
            raise kopf.TemporaryError(f"JobSet discovery: {e.status}: {api_message(e)}", delay=1.0) from e

    # ------------------------------------------------------------------------------------- pass
    def reconcile(self, snap: Snapshot) -> Outcome:
        """Status first, then actions: the status patch carries the snapshot's resourceVersion, so a pass
        that decided from a stale view of the FineTuneJob fails with a conflict (and is retried) before it
        can act. Otherwise a pass could miss a verdict it wrote itself a moment ago, after the evidence
        for it (a deleted Job) is already gone from the cache."""
        ftj = snap.ftj
        old = ftj.get("status") or {}
        if ftj["metadata"].get("deletionTimestamp"):  # the garbage collector removes the children
            return Outcome(None, old.get("phase"), old.get("phase"), False)
        now = self.clock()
        jobs, unwatched = self._jobs(snap)
        a = assess(ftj, jobs, snap.pods, now=now, options=self.options, has_identity=snap.has_identity,
                   no_jobsets=self._no_jobsets(ftj) if not jobs else None)
        if unwatched and a.status.get("phase") not in contract.TERMINAL_PHASES:
            a.requeue(UNWATCHED_POLL)
        creates = any(x.kind == ActionKind.CREATE_ATTEMPT for x in a.actions)
        rv = self._write_status(ftj, a, force=creates)  # never start an attempt from a stale view
        patched = rv is not None
        if patched:
            self._events(ftj, a)
        try:
            for action in a.actions:
                self._act(ftj, action, a)
        except ApiException as e:
            create = next((x for x in a.actions if x.kind == ActionKind.CREATE_ATTEMPT), None)
            several = create is not None and jobset.nodes_of(create.spec or ftj["spec"]) > 1
            if create is not None and (e.status == 422 or (e.status == 404 and several)):
                # The API server refused the runner's Job (e.g. malformed tolerations): a spec error. Or the
                # JobSet CRD went away since discovery said it was there.
                fresh = {**ftj, "metadata": {**ftj["metadata"], "resourceVersion": rv or
                                             ftj["metadata"].get("resourceVersion")}, "status": {**old, **a.status}}
                what = "JobSet" if several else "Job"
                why = (jobset.refusal(jobset.nodes_of(create.spec or ftj["spec"])) if e.status == 404 else
                       f"the runner {what} was rejected: {api_message(e)}")
                a = self._invalid(fresh, now, why)
                if self._write_status(fresh, a) is not None:
                    self._events(fresh, a)
                patched = True
            elif _retryable(e):
                raise kopf.TemporaryError(f"{e.status}: {api_message(e)}", delay=1.0) from e
            else:
                raise kopf.PermanentError(f"{e.status}: {api_message(e)}") from e
        return Outcome(a.requeue_after, old.get("phase"), a.status.get("phase"), patched)

    def _events(self, ftj: dict, a: Assessment) -> None:
        for ev in a.events:
            self._event(ftj, ev.type, ev.reason, ev.message)

    def _invalid(self, ftj: dict, now: float, message: str) -> Assessment:
        a = Assessment(status={"observedGeneration": ftj["metadata"].get("generation"), "phase": contract.FAILED,
                               "reason": contract.INVALID_SPEC, "message": message[:1024],
                               "completionTime": format_time(now), "failedAttempts": 0})
        finalize(a, ftj, now)
        return a

    # ---------------------------------------------------------------------------------- actions
    def _act(self, ftj: dict, action: Action, a: Assessment) -> None:
        ns = ftj["metadata"]["namespace"]
        if action.kind == ActionKind.CREATE_ATTEMPT:
            self._ensure_identity(ftj)
            spec = action.spec or ftj["spec"]
            if jobset.nodes_of(spec) > 1:
                body = jobset.jobset(ftj, action.attempt, spec, image=self.image,
                                     deadline_seconds=action.deadline_seconds, runner=self.options.runner)
                path = ns_path(jobset.API_VERSION, ns, jobset.PLURAL)
            else:
                body = children.job(ftj, action.attempt, spec, image=self.image,
                                    deadline_seconds=action.deadline_seconds, runner=self.options.runner)
                path = ns_path("batch/v1", ns, "jobs")
            try:
                self.kube.create(path, body)
                log.info("%s/%s: created %s %s", ns, ftj["metadata"]["name"], body["kind"], action.name)
            except ApiException as e:
                if e.status != 409:
                    raise
                # Taken: ours (the cache has not seen it yet) or a deleted attempt's Job still going away.
                a.requeue(1.0)
        elif action.kind == ActionKind.DELETE_JOB:
            gv = jobset.API_VERSION if action.resource == jobset.PLURAL else "batch/v1"
            if self.kube.delete(ns_path(gv, ns, action.resource, action.name), propagation="Background"):
                log.info("%s/%s: deleted %s %s", ns, ftj["metadata"]["name"], action.resource, action.name)
        elif action.kind == ActionKind.REVOKE_IDENTITY:
            name = naming.identity_name(ftj["metadata"]["name"])
            self.kube.delete(ns_path("rbac.authorization.k8s.io/v1", ns, "rolebindings", name), propagation=None)
            self.kube.delete(ns_path("rbac.authorization.k8s.io/v1", ns, "roles", name), propagation=None)
            if not (ftj.get("spec") or {}).get("serviceAccountName"):
                self.kube.delete(ns_path("v1", ns, "serviceaccounts", name), propagation=None)
        else:  # pragma: no cover - a programming error
            raise kopf.PermanentError(f"unknown action {action.kind}")

    def _ensure_identity(self, ftj: dict) -> None:
        """The runner's ServiceAccount, Role and RoleBinding (already there: fine)."""
        ns = ftj["metadata"]["namespace"]
        objs = [("rbac.authorization.k8s.io/v1", "roles", children.role(ftj)),
                ("rbac.authorization.k8s.io/v1", "rolebindings", children.role_binding(ftj))]
        if not (ftj.get("spec") or {}).get("serviceAccountName"):
            objs.insert(0, ("v1", "serviceaccounts", children.service_account(ftj)))
        for gv, plural, body in objs:
            try:
                self.kube.create(ns_path(gv, ns, plural), body)
            except ApiException as e:
                if e.status != 409:
                    raise

    # ----------------------------------------------------------------------------------- status
    def _write_status(self, ftj: dict, a: Assessment, force: bool = False) -> str | None:
        """Merge-patch the controller's status fields if they changed (or `force`: an unchanged patch still
        checks the resourceVersion, and the API server writes nothing); the new resourceVersion, or None."""
        old = ftj.get("status") or {}
        new = {k: a.status.get(k) for k in contract.CONTROLLER_STATUS_FIELDS}
        unchanged = all(_same(old.get(k), v) for k, v in new.items())
        junk = limits.problems(ftj).get("status") or {}
        for key in junk:  # fields set aside by the watch cache: removed (merge patch null), runner's ones too
            new.setdefault(key, None)
        unchanged = unchanged and not junk
        if unchanged and not force:
            return None
        md = ftj["metadata"]
        path = ns_path(names.API_VERSION, md["namespace"], names.PLURAL, md["name"], "status")
        body: dict = {"status": new}
        if md.get("resourceVersion"):
            body["metadata"] = {"resourceVersion": md["resourceVersion"]}  # optimistic concurrency
        try:
            rv = self.kube.merge_patch(path, body)["metadata"]["resourceVersion"]
            return None if unchanged else rv
        except ApiException as e:
            if e.status == 404:
                raise kopf.PermanentError("the FineTuneJob is gone") from e
            if e.status == 409:  # decided on a stale view: decide again once the cache has caught up
                raise kopf.TemporaryError("status changed meanwhile", delay=0.2) from e
            if _retryable(e):
                raise kopf.TemporaryError(f"status patch: {e.status}: {api_message(e)}", delay=1.0) from e
            raise kopf.PermanentError(f"status patch: {e.status}: {api_message(e)}") from e

    def _event(self, ftj: dict, type_: str, reason: str, message: str) -> None:
        body = children.event(ftj, type_, reason, message, format_time(self.clock()), COMPONENT)
        try:
            self.kube.create(ns_path("v1", ftj["metadata"]["namespace"], "events"), body)
        except ApiException as e:  # an Event is best effort: never fail the pass for it
            log.warning("could not post Event %s on %s: %s", reason, ftj["metadata"]["name"], api_message(e))


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
