"""Fixtures for the controller tests against the real test cluster (tests/cluster).

The controller runs as a real subprocess (`python -m controller --namespace <ns>`), under a ServiceAccount
bound to the ClusterRole that `python -m controller rbac` prints, so its RBAC is tested too.
"""
from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from controller import naming, rbac
from runner.api import names
from controller.kube import Kube, ns_path
from tests.cluster.cluster import free_port, wait_for  # noqa: F401 - re-exported to the controller tests

ROOT = Path(__file__).resolve().parents[2]
CONTROLLER_NS = "finetune-system"


def ftj_doc(name: str, **spec) -> dict:
    s = {"model": {"source": "hf://org/base"}, "dataset": {"source": "s3://data/train.jsonl"},
         "output": {"destination": f"s3://models/{name}"}}
    s.update(spec)
    return {"apiVersion": names.API_VERSION, "kind": names.KIND, "metadata": {"name": name}, "spec": s}


class Api:
    """Admin access to the test cluster, by path."""

    def __init__(self, kube: Kube, ns: str):
        self.kube, self.ns = kube, ns

    def create_ftj(self, doc: dict) -> dict:
        return self.kube.create(ns_path(names.API_VERSION, self.ns, names.PLURAL), doc)

    def ftj(self, name: str) -> dict:
        return self.kube.request("GET", ns_path(names.API_VERSION, self.ns, names.PLURAL, name))

    def status(self, name: str) -> dict:
        return self.ftj(name).get("status") or {}

    def patch_spec(self, name: str, spec: dict) -> dict:
        return self.kube.merge_patch(ns_path(names.API_VERSION, self.ns, names.PLURAL, name), {"spec": spec})

    def delete_ftj(self, name: str) -> None:
        self.kube.delete(ns_path(names.API_VERSION, self.ns, names.PLURAL, name))

    def jobs(self, ftj_name: str | None = None) -> list[dict]:
        items = self.kube.request("GET", ns_path("batch/v1", self.ns, "jobs"))["items"]
        return sorted((j for j in items if ftj_name is None or
                       j["metadata"].get("annotations", {}).get(naming.ANNOTATION_JOB_NAME) == ftj_name),
                      key=lambda j: j["metadata"]["name"])

    def list(self, gv: str, plural: str) -> list[dict]:
        return self.kube.request("GET", ns_path(gv, self.ns, plural))["items"]

    def events(self, name: str) -> list[dict]:
        items = self.kube.request("GET", ns_path("v1", self.ns, "events"))["items"]
        return [e for e in items if e["involvedObject"].get("kind") == names.KIND and e["involvedObject"]["name"] == name]

    def event_reasons(self, name: str, *expected: str, timeout: float = 10) -> list[str]:
        """The Events' reasons in order, once each of `expected` is among them (as often as listed): the
        controller posts an Event after the status patch that a test waits on, so reading at once races it."""
        def reasons():
            got = [e["reason"] for e in sorted(self.events(name), key=lambda e: e["metadata"]["creationTimestamp"])]
            return got if all(got.count(r) >= expected.count(r) for r in expected) else None
        if not expected:
            return reasons()
        return wait_for(reasons, timeout, what=f"Events {expected} on {name}")

    def wait_phase(self, name: str, phase: str, timeout: float = 20, reason: str | None = None) -> dict:
        def ok():
            s = self.status(name)
            return s if s.get("phase") == phase and (reason is None or s.get("reason") == reason) else None
        return wait_for(ok, timeout, what=f"{name} phase {phase} {reason or ''} (now {self.status(name)})")


class Controller:
    """`python -m controller --namespace <ns>` as a subprocess; kill() is SIGKILL, so a restart is real."""

    def __init__(self, kubeconfig: str, ns: str | None, log_dir: Path, *extra: str):
        """`ns` None: all namespaces."""
        self.kubeconfig, self.ns, self.extra = kubeconfig, ns, extra
        self.port = free_port()
        self.log_path = log_dir / f"controller-{ns or 'all'}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Controller":
        env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
        env.update(KUBECONFIG=self.kubeconfig, PYTHONPATH=str(ROOT))
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controller", *(["--namespace", self.ns] if self.ns else []),
             "--http-port", str(self.port),
             "--image", "registry.example/finetune-runner:test", "--retry-backoff", "0.5",
             "--image-pull-timeout", "2", *self.extra],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for(lambda: self.proc.poll() is not None or self.http("/readyz")[0] == 200, 30,
                 what="controller /readyz")
        assert self.proc.poll() is None, self.log()
        return self

    def http(self, path: str) -> tuple[int, str]:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, ""
        except OSError:
            return 0, ""

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""


@pytest.fixture(scope="session")
def controller_kubeconfig(k8s_cluster) -> str:
    """A kubeconfig for a ServiceAccount holding exactly the controller's ClusterRole."""
    k8s_cluster.request("POST", "/apis/rbac.authorization.k8s.io/v1/clusterroles", rbac.cluster_role())
    k8s_cluster.request("POST", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": rbac.CLUSTER_ROLE},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": rbac.CLUSTER_ROLE},
        "subjects": [{"kind": "ServiceAccount", "name": "finetune-controller", "namespace": CONTROLLER_NS}]})
    token = k8s_cluster.service_account_token(CONTROLLER_NS, "finetune-controller", expiration_seconds=7200)
    return k8s_cluster.kubeconfig_for(token=token)


@pytest.fixture
def kube(k8s_cluster):
    k = Kube(k8s_cluster.api_client())
    yield k
    k.close()


@pytest.fixture
def cluster_api(kube, k8s_namespace) -> Api:
    return Api(kube, k8s_namespace)


@pytest.fixture
def controller(controller_kubeconfig, k8s_namespace, tmp_path_factory):
    c = Controller(controller_kubeconfig, k8s_namespace, tmp_path_factory.mktemp("controller-logs")).start()
    yield c
    c.stop()


def pod_of(kubelet, ns, job_name, timeout=20):
    return wait_for(lambda: [p for p in kubelet.job_pods(ns, job_name) if kubelet.is_active(p)], timeout,
                    what=f"pod of {job_name}")[-1]


# ------------------------------------------------------------------ a user who may only run FineTuneJobs
# The chart's `<release>-editor` ClusterRole (README "Security"): FineTuneJobs only - no pods, Jobs, Secrets.
EDITOR_RULES = rbac.EDITOR_RULES


def ftj_path(ns: str, name: str | None = None, sub: str | None = None) -> str:
    return ns_path(names.API_VERSION, ns, names.PLURAL, name, sub)


def raw(cluster, method: str, path: str, body: bytes | None, *, token: str | None = None,
        content_type: str = "application/json") -> tuple[int, str]:
    req = urllib.request.Request(cluster.server + path, data=body, method=method, headers={
        "Authorization": f"Bearer {token or cluster.admin_token}", "Content-Type": content_type,
        "Accept": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(
        context=ssl.create_default_context(cafile=cluster.ca_file)))
    try:
        with opener.open(req, timeout=60) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def create_as(cluster, token: str, ns: str, doc: dict | str) -> tuple[int, str]:
    body = doc if isinstance(doc, str) else json.dumps(doc)
    return raw(cluster, "POST", ftj_path(ns), body.encode(), token=token)


@pytest.fixture
def editor(k8s_cluster, k8s_namespace) -> str:
    """alice's token; alice holds the chart's editor rules in the namespace: FineTuneJobs and nothing else."""
    ns = k8s_namespace
    k8s_cluster.request("POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "finetune-editor"},
        "rules": EDITOR_RULES})
    k8s_cluster.request("POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "alice-editor"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "finetune-editor"},
        "subjects": [{"kind": "User", "name": "alice", "apiGroup": "rbac.authorization.k8s.io"}]})
    token = k8s_cluster.user_token("alice")
    # what alice may not do herself (and so must not get done through the controller)
    wait_for(lambda: raw(k8s_cluster, "GET", ftj_path(ns), None, token=token)[0] == 200, 10, what="alice's role")
    for method, path in (("GET", f"/api/v1/namespaces/{ns}/secrets"), ("GET", f"/api/v1/namespaces/{ns}/pods"),
                         ("POST", f"/api/v1/namespaces/{ns}/pods"), ("POST", f"/apis/batch/v1/namespaces/{ns}/jobs"),
                         ("POST", f"/api/v1/namespaces/{ns}/serviceaccounts")):
        assert raw(k8s_cluster, method, path, b"{}" if method == "POST" else None, token=token)[0] == 403
    return token
