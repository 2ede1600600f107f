"""A kubelet (and scheduler) stand-in for the test cluster.

No scheduler or kubelet runs in :class:`tests.cluster.cluster.TestCluster`, so Pods stay
Pending with no node. ``FakeKubelet`` writes, through the Pod ``/status`` subresource,
the same fields a real kubelet (or the scheduler) writes: ``phase``, ``conditions``,
``hostIP``, ``podIP(s)``, ``startTime``, ``containerStatuses[]`` (``state`` /
``lastState`` with ``running.startedAt`` or ``terminated.{exitCode,reason,message,
startedAt,finishedAt,containerID}`` or ``waiting.{reason,message}``, ``ready``,
``started``, ``restartCount``, ``image``, ``imageID``, ``containerID``) and
``initContainerStatuses[]``. Before any kubelet-side status it binds the Pod to a node
(``spec.nodeName``) through the ``binding`` subresource, like the scheduler does,
which also sets ``PodScheduled=True``.

Pod IPs default to 127.0.0.1 so that a controller that dials a Pod only ever reaches
loopback (the test machines must not send traffic elsewhere).

Every method takes a Pod name (plus namespace) or a ``V1Pod`` / dict with metadata,
and returns the Pod as the server stored it (a dict).
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable

from kubernetes import client
from kubernetes.client.rest import ApiException

# Messages as container runtimes / the scheduler write them.
OOM_MESSAGE = ""  # containerd leaves message empty for OOMKilled; the reason carries it
ERR_IMAGE_PULL_MESSAGE = (
    'rpc error: code = NotFound desc = failed to pull and unpack image "{image}": failed to resolve '
    'reference "{image}": {image}: not found'
)
IMAGE_PULL_BACKOFF_MESSAGE = 'Back-off pulling image "{image}"'
UNSCHEDULABLE_MESSAGE = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."


def _now(offset_s: float = 0.0) -> str:
    t = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=offset_s)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _hex64(*parts: str) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()


class FakeKubelet:
    """Plays kubelet + scheduler on a test cluster.

    Args:
        api: a ``kubernetes.client.ApiClient`` with rights to bind Pods and write
            ``pods/status`` (the cluster's admin client), or a ``TestCluster``.
        node_name: the node Pods are bound to (no Node object is needed; see ``ensure_node``).
        host_ip / pod_ip: addresses written to status (loopback by default).
    """

    def __init__(self, api: client.ApiClient, node_name: str = "fake-node", host_ip: str = "127.0.0.1",
                 pod_ip: str = "127.0.0.1", runtime: str = "containerd"):
        if hasattr(api, "api_client") and not isinstance(api, client.ApiClient):  # a TestCluster
            api = api.api_client()
        self.api = api
        self.core = client.CoreV1Api(api)
        self.node_name = node_name
        self.host_ip = host_ip
        self.pod_ip = pod_ip
        self.runtime = runtime

    # ------------------------------------------------------------------ plumbing
    @staticmethod
    def _ref(pod: Any, namespace: str | None) -> tuple[str, str]:
        if isinstance(pod, str):
            if namespace is None:
                if "/" in pod:
                    ns, name = pod.split("/", 1)
                    return ns, name
                raise ValueError("namespace required (or pass 'namespace/name')")
            return namespace, pod
        if isinstance(pod, dict):
            md = pod["metadata"]
            return md.get("namespace") or namespace, md["name"]
        return pod.metadata.namespace or namespace, pod.metadata.name

    def get(self, pod: Any, namespace: str | None = None) -> dict:
        ns, name = self._ref(pod, namespace)
        r = self.core.read_namespaced_pod(name, ns, _preload_content=False)
        return json.loads(r.data)

    def _update_status(self, pod: Any, namespace: str | None, mutate: Callable[[dict], None],
                       bind: bool = True) -> dict:
        ns, name = self._ref(pod, namespace)
        for _ in range(20):
            cur = self.get(name, ns)
            if bind and not cur["spec"].get("nodeName"):
                self.bind(name, ns)
                continue
            cur.setdefault("status", {})
            mutate(cur)
            try:
                r = self.core.replace_namespaced_pod_status(name, ns, cur, _preload_content=False)
                return json.loads(r.data)
            except ApiException as e:
                if e.status == 409:  # stale resourceVersion: re-read and retry
                    time.sleep(0.02)
                    continue
                raise
        raise RuntimeError(f"could not update status of pod {ns}/{name}: too many conflicts")

    def _container_id(self, pod: dict, cname: str, restart: int = 0) -> str:
        return f"{self.runtime}://" + _hex64(pod["metadata"]["uid"], cname, str(restart))

    @staticmethod
    def _image_id(image: str) -> str:
        repo = image.split("@")[0]
        last = repo.rsplit("/", 1)[-1]
        if ":" in last:
            repo = repo[: -(len(last) - last.index(":"))]
        if "/" not in repo:
            repo = "docker.io/library/" + repo
        elif "." not in repo.split("/")[0] and ":" not in repo.split("/")[0] and repo.split("/")[0] != "localhost":
            repo = "docker.io/" + repo
        return f"{repo}@sha256:{_hex64(image)}"

    @staticmethod
    def _cond(type_: str, status: bool, reason: str | None = None, message: str | None = None,
              ts: str | None = None) -> dict:
        c: dict = {"type": type_, "status": "True" if status else "False", "lastProbeTime": None,
                   "lastTransitionTime": ts or _now()}
        if reason:
            c["reason"] = reason
        if message:
            c["message"] = message
        return c

    @staticmethod
    def _set_conditions(status: dict, new: Iterable[dict]) -> None:
        """Merge conditions by type; keep lastTransitionTime when the status did not change."""
        conds = {c["type"]: c for c in status.get("conditions") or []}
        for c in new:
            old = conds.get(c["type"])
            if old and old.get("status") == c["status"]:
                c["lastTransitionTime"] = old.get("lastTransitionTime") or c["lastTransitionTime"]
            conds[c["type"]] = c
        order = ["Initialized", "Ready", "ContainersReady", "PodScheduled"]
        status["conditions"] = sorted(conds.values(), key=lambda c: order.index(c["type"]) if c["type"] in order else 99)

    def _base_status(self, pod: dict) -> dict:
        st = pod["status"]
        st["hostIP"] = self.host_ip
        st.setdefault("startTime", _now())
        if self.pod_ip and not pod["spec"].get("hostNetwork"):
            st["podIP"] = self.pod_ip
            st["podIPs"] = [{"ip": self.pod_ip}]
        elif pod["spec"].get("hostNetwork"):
            st["podIP"] = self.host_ip
            st["podIPs"] = [{"ip": self.host_ip}]
        st.setdefault("qosClass", _qos_class(pod["spec"]))
        return st

    def _init_statuses_done(self, pod: dict, started: str) -> list[dict]:
        out = []
        for c in pod["spec"].get("initContainers") or []:
            out.append({
                "name": c["name"], "image": c["image"], "imageID": self._image_id(c["image"]),
                "containerID": self._container_id(pod, c["name"]), "ready": True, "restartCount": 0,
                "state": {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": started,
                                         "finishedAt": started, "containerID": self._container_id(pod, c["name"])}},
                "lastState": {},
            })
        return out

    def _old_cs(self, pod: dict, cname: str) -> dict:
        for cs in pod["status"].get("containerStatuses") or []:
            if cs["name"] == cname:
                return cs
        return {}

    # ------------------------------------------------------------------ scheduler side
    def bind(self, pod: Any, namespace: str | None = None, node_name: str | None = None) -> None:
        """Bind the Pod to a node like the scheduler (sets spec.nodeName and PodScheduled=True)."""
        ns, name = self._ref(pod, namespace)
        body = client.V1Binding(
            metadata=client.V1ObjectMeta(name=name),
            target=client.V1ObjectReference(api_version="v1", kind="Node", name=node_name or self.node_name),
        )
        try:
            # _preload_content=False: the response is a Status, which the client cannot
            # deserialize into a V1Binding.
            self.core.create_namespaced_pod_binding(name, ns, body, _preload_content=False)
        except ApiException as e:
            if e.status != 409:  # already bound
                raise

    def unschedulable(self, pod: Any, namespace: str | None = None, message: str = UNSCHEDULABLE_MESSAGE) -> dict:
        """Like the scheduler when no node fits: phase Pending, PodScheduled=False/Unschedulable."""
        def m(p: dict) -> None:
            st = p["status"]
            st["phase"] = "Pending"
            self._set_conditions(st, [self._cond("PodScheduled", False, "Unschedulable", message)])
        return self._update_status(pod, namespace, m, bind=False)

    def ensure_node(self, name: str | None = None, gpus: int = 0) -> dict:
        """Create a Ready Node object (optional: Pods can be bound without one)."""
        name = name or self.node_name
        capacity = {"cpu": "16", "memory": "64Gi", "pods": "110", "ephemeral-storage": "100Gi"}
        if gpus:
            capacity["nvidia.com/gpu"] = str(gpus)
        body = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}}}
        try:
            self.core.create_node(body)
        except ApiException as e:
            if e.status != 409:
                raise
        status = {"capacity": capacity, "allocatable": capacity,
                  "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                  "message": "kubelet is posting ready status", "lastHeartbeatTime": _now(),
                                  "lastTransitionTime": _now()}],
                  "addresses": [{"type": "InternalIP", "address": self.host_ip},
                                {"type": "Hostname", "address": name}]}
        r = self.core.patch_node_status(name, {"status": status}, _preload_content=False)
        return json.loads(r.data)

    # ------------------------------------------------------------------ kubelet side
    def running(self, pod: Any, namespace: str | None = None, ready: bool = True) -> dict:
        """All containers running (and Ready unless ready=False); phase Running."""
        def m(p: dict) -> None:
            st = self._base_status(p)
            started = st["startTime"]
            if p["spec"].get("initContainers"):
                st["initContainerStatuses"] = self._init_statuses_done(p, started)
            css = []
            for c in p["spec"]["containers"]:
                old = self._old_cs(p, c["name"])
                restarts = old.get("restartCount", 0)
                prev_running = (old.get("state") or {}).get("running")
                css.append({
                    "name": c["name"], "image": c["image"], "imageID": self._image_id(c["image"]),
                    "containerID": self._container_id(p, c["name"], restarts),
                    "ready": ready, "started": True, "restartCount": restarts,
                    "state": {"running": {"startedAt": prev_running["startedAt"] if prev_running else _now()}},
                    "lastState": old.get("lastState") or {},
                })
            st["containerStatuses"] = css
            st["phase"] = "Running"
            names = [c["name"] for c in p["spec"]["containers"]]
            not_ready = None if ready else f"containers with unready status: [{' '.join(names)}]"
            self._set_conditions(st, [
                self._cond("Initialized", True),
                self._cond("Ready", ready, None if ready else "ContainersNotReady", not_ready),
                self._cond("ContainersReady", ready, None if ready else "ContainersNotReady", not_ready),
                self._cond("PodScheduled", True),
            ])
        return self._update_status(pod, namespace, m)

    def _terminate(self, pod: Any, namespace: str | None, exit_code: int, reason: str,
                   message: str | None, container: str | None, duration_s: float,
                   signal: int | None) -> dict:
        def m(p: dict) -> None:
            st = self._base_status(p)
            if p["spec"].get("initContainers"):
                st["initContainerStatuses"] = self._init_statuses_done(p, st["startTime"])
            finished = _now()
            css = []
            targets = {container} if container else {c["name"] for c in p["spec"]["containers"]}
            for c in p["spec"]["containers"]:
                old = self._old_cs(p, c["name"])
                restarts = old.get("restartCount", 0)
                prev_running = (old.get("state") or {}).get("running")
                started = prev_running["startedAt"] if prev_running else _now(-duration_s)
                cid = self._container_id(p, c["name"], restarts)
                if c["name"] in targets:
                    code, rsn, msg = exit_code, reason, message
                else:  # sidecars: a failing main container does not stop them, but for
                    # a finished Pod every container has terminated; they exit 0 on SIGTERM
                    code, rsn, msg = (0, "Completed", None) if exit_code == 0 else (143, "Error", None)
                term: dict = {"exitCode": code, "reason": rsn, "startedAt": started, "finishedAt": finished,
                              "containerID": cid}
                if msg:
                    term["message"] = msg
                if signal is not None and c["name"] in targets:
                    term["signal"] = signal
                css.append({
                    "name": c["name"], "image": c["image"], "imageID": self._image_id(c["image"]),
                    "containerID": cid, "ready": False, "started": False, "restartCount": restarts,
                    "state": {"terminated": term}, "lastState": old.get("lastState") or {},
                })
            st["containerStatuses"] = css
            succeeded = exit_code == 0
            st["phase"] = "Succeeded" if succeeded else "Failed"
            names = " ".join(c["name"] for c in p["spec"]["containers"])
            if succeeded:
                ready = [self._cond("Ready", False, "PodCompleted"), self._cond("ContainersReady", False, "PodCompleted")]
            else:
                msg = f"containers with unready status: [{names}]"
                ready = [self._cond("Ready", False, "ContainersNotReady", msg),
                         self._cond("ContainersReady", False, "ContainersNotReady", msg)]
            init = self._cond("Initialized", True, "PodCompleted" if succeeded else None)
            self._set_conditions(st, [init, *ready, self._cond("PodScheduled", True)])
        return self._update_status(pod, namespace, m)

    def succeeded(self, pod: Any, namespace: str | None = None, message: str | None = None,
                  duration_s: float = 5.0) -> dict:
        """Every container exited 0 (reason Completed; ``message`` = the termination message
        the container wrote to /dev/termination-log); phase Succeeded."""
        return self._terminate(pod, namespace, 0, "Completed", message, None, duration_s, None)

    def failed(self, pod: Any, namespace: str | None = None, exit_code: int = 1, reason: str | None = None,
               message: str | None = None, container: str | None = None, duration_s: float = 5.0) -> dict:
        """The container (default: all) exited with ``exit_code``; phase Failed.

        ``reason`` defaults to what containerd reports: "OOMKilled" for 137 is NOT assumed
        (137 is also a plain SIGKILL), so pass reason="OOMKilled" explicitly; otherwise "Error".
        """
        return self._terminate(pod, namespace, exit_code, reason or "Error", message, container, duration_s, None)

    def oom_killed(self, pod: Any, namespace: str | None = None, message: str | None = None,
                   container: str | None = None) -> dict:
        """Failed with exit code 137, reason OOMKilled (what the kubelet shows for a cgroup OOM kill)."""
        return self.failed(pod, namespace, 137, "OOMKilled", message, container)

    def restarted(self, pod: Any, namespace: str | None = None, exit_code: int = 1, reason: str = "Error",
                  message: str | None = None, container: str | None = None, back_off: bool = False) -> dict:
        """restartPolicy OnFailure/Always: the container died and the kubelet restarted it.
        restartCount += 1, lastState.terminated holds the death; the Pod stays Running.
        With back_off=True the container waits in CrashLoopBackOff instead of running."""
        def m(p: dict) -> None:
            st = self._base_status(p)
            css = []
            for c in p["spec"]["containers"]:
                old = self._old_cs(p, c["name"])
                restarts = old.get("restartCount", 0)
                if container and c["name"] != container and old:
                    css.append(old)
                    continue
                prev_running = (old.get("state") or {}).get("running")
                term = {"exitCode": exit_code, "reason": reason,
                        "startedAt": prev_running["startedAt"] if prev_running else _now(-5),
                        "finishedAt": _now(), "containerID": self._container_id(p, c["name"], restarts)}
                if message:
                    term["message"] = message
                if back_off:
                    state = {"waiting": {"reason": "CrashLoopBackOff",
                                         "message": f"back-off 10s restarting failed container={c['name']} "
                                                    f"pod={p['metadata']['name']}_{p['metadata']['namespace']}"
                                                    f"({p['metadata']['uid']})"}}
                else:
                    state = {"running": {"startedAt": _now()}}
                css.append({
                    "name": c["name"], "image": c["image"], "imageID": self._image_id(c["image"]),
                    "containerID": self._container_id(p, c["name"], restarts + 1) if not back_off
                    else self._container_id(p, c["name"], restarts),
                    "ready": not back_off, "started": not back_off, "restartCount": restarts + 1,
                    "state": state, "lastState": {"terminated": term},
                })
            st["containerStatuses"] = css
            st["phase"] = "Running"
            all_ready = all(cs["ready"] for cs in css)
            msg = None if all_ready else "containers with unready status: [" + " ".join(
                cs["name"] for cs in css if not cs["ready"]) + "]"
            self._set_conditions(st, [
                self._cond("Initialized", True),
                self._cond("Ready", all_ready, None if all_ready else "ContainersNotReady", msg),
                self._cond("ContainersReady", all_ready, None if all_ready else "ContainersNotReady", msg),
                self._cond("PodScheduled", True),
            ])
        return self._update_status(pod, namespace, m)

    def waiting(self, pod: Any, namespace: str | None = None, reason: str = "ErrImagePull",
                message: str | None = None, container: str | None = None) -> dict:
        """Container(s) waiting (phase Pending): reason ErrImagePull, ImagePullBackOff,
        CreateContainerConfigError, ContainerCreating, ... with the runtime's message."""
        def m(p: dict) -> None:
            st = self._base_status(p)
            css = []
            for c in p["spec"]["containers"]:
                old = self._old_cs(p, c["name"])
                if container and c["name"] != container and old:
                    css.append(old)
                    continue
                msg = message
                if msg is None:
                    if reason == "ErrImagePull":
                        msg = ERR_IMAGE_PULL_MESSAGE.format(image=_full_image(c["image"]))
                    elif reason == "ImagePullBackOff":
                        msg = IMAGE_PULL_BACKOFF_MESSAGE.format(image=c["image"])
                w: dict = {"reason": reason}
                if msg:
                    w["message"] = msg
                css.append({
                    "name": c["name"], "image": c["image"], "imageID": "", "ready": False, "started": False,
                    "restartCount": old.get("restartCount", 0), "state": {"waiting": w},
                    "lastState": old.get("lastState") or {},
                })
            st["containerStatuses"] = css
            st["phase"] = "Pending"
            names = " ".join(cs["name"] for cs in css if not cs["ready"])
            msg = f"containers with unready status: [{names}]"
            self._set_conditions(st, [
                self._cond("Initialized", True),
                self._cond("Ready", False, "ContainersNotReady", msg),
                self._cond("ContainersReady", False, "ContainersNotReady", msg),
                self._cond("PodScheduled", True),
            ])
        return self._update_status(pod, namespace, m)

    def image_pull_error(self, pod: Any, namespace: str | None = None, back_off: bool = False,
                         message: str | None = None) -> dict:
        """ErrImagePull (first failure) or, with back_off=True, ImagePullBackOff."""
        return self.waiting(pod, namespace, "ImagePullBackOff" if back_off else "ErrImagePull", message)

    def process_deletions(self, namespace: str, label_selector: str | None = None) -> list[str]:
        """What a kubelet does for Pods marked for deletion (deletionTimestamp set, which
        happens to Pods bound to a node and not yet finished): stop the containers
        (SIGTERM -> exit 143 "Error"... written to status) and remove the Pod with grace 0.
        Returns the names of the Pods removed."""
        done = []
        for p in self.pods(namespace, label_selector):
            if not p["metadata"].get("deletionTimestamp"):
                continue
            name = p["metadata"]["name"]
            try:
                if p["status"].get("phase") not in ("Succeeded", "Failed") and p["spec"].get("nodeName"):
                    self._terminate(name, namespace, 143, "Error", None, None, 5.0, None)
                self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=0,
                                                body=client.V1DeleteOptions(
                                                    grace_period_seconds=0,
                                                    preconditions=client.V1Preconditions(uid=p["metadata"]["uid"])))
            except ApiException as e:
                if e.status not in (404, 409):
                    raise
            done.append(name)
        return done

    # ------------------------------------------------------------------ helpers for tests
    def pods(self, namespace: str, label_selector: str | None = None) -> list[dict]:
        r = self.core.list_namespaced_pod(namespace, label_selector=label_selector, _preload_content=False)
        return json.loads(r.data)["items"]

    def job_pods(self, namespace: str, job_name: str) -> list[dict]:
        """Pods of a Job (label job-name=<name>), oldest first."""
        pods = self.pods(namespace, f"job-name={job_name}")
        return sorted(pods, key=lambda p: (p["metadata"]["creationTimestamp"], p["metadata"]["name"]))

    def wait_for_pods(self, namespace: str, label_selector: str | None = None, count: int = 1,
                      timeout: float = 30, predicate: Callable[[dict], bool] | None = None) -> list[dict]:
        """Poll until at least ``count`` Pods match (and satisfy ``predicate``); returns them."""
        deadline = time.monotonic() + timeout
        while True:
            pods = [p for p in self.pods(namespace, label_selector) if predicate is None or predicate(p)]
            if len(pods) >= count:
                return sorted(pods, key=lambda p: (p["metadata"]["creationTimestamp"], p["metadata"]["name"]))
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pods)}/{count} pods matching {label_selector!r} in {namespace} "
                                   f"after {timeout}s")
            time.sleep(0.05)

    @staticmethod
    def is_active(pod: dict) -> bool:
        return pod.get("status", {}).get("phase") not in ("Succeeded", "Failed") and not pod["metadata"].get(
            "deletionTimestamp")


def _full_image(image: str) -> str:
    first = image.split("/")[0]
    if "/" not in image:
        image = "docker.io/library/" + image
    elif "." not in first and ":" not in first and first != "localhost":
        image = "docker.io/" + image
    if ":" not in image.rsplit("/", 1)[-1] and "@" not in image:
        image += ":latest"
    return image


def _qos_class(spec: dict) -> str:
    containers = (spec.get("containers") or []) + (spec.get("initContainers") or [])
    any_set = False
    guaranteed = True
    for c in containers:
        res = c.get("resources") or {}
        req, lim = res.get("requests") or {}, res.get("limits") or {}
        if req or lim:
            any_set = True
        for r in ("cpu", "memory"):
            if r not in lim or (r in req and req[r] != lim[r]):
                guaranteed = False
    if not any_set:
        return "BestEffort"
    return "Guaranteed" if guaranteed else "Burstable"
