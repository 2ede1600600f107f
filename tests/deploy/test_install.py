"""`helm install` into the real test API server, then the installed controller runs a FineTuneJob.

The test cluster has no kubelet, so the controller Deployment's pod never starts. Instead the controller runs
here as a subprocess with the installed Deployment's own arguments, AUTHENTICATED AS THE CHART'S
ServiceAccount (a TokenRequest token): what it can do is exactly what the chart's RBAC grants.

No flag turns helm's validation off: helm validates against the server's OpenAPI, and the chart leaves the CRD's
CEL rules (`x-kubernetes-validations`, 1.25+) out on older servers such as this 1.20 one.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from tests.cluster.cluster import free_port
from tests.cluster.conftest_plugin import project_crd_files
from tests.cluster.cluster import wait_for
from tests.deploy.conftest import CHART, EXAMPLES, ROOT

CRD = "customresourcedefinition/finetunejobs.finetune.dev"
RUNNER_IMAGE = "registry.example/finetune-runner"


@pytest.fixture(scope="module", autouse=True)
def restore_crd(k8s_cluster):
    """The releases here own and change the session's CRD (labels, runner defaults); put it back after."""
    yield
    k8s_cluster.apply_crds(project_crd_files())


@pytest.fixture
def namespace(k8s_cluster):
    """namespace(prefix) -> a fresh namespace, deleted after the test."""
    made = []

    def make(prefix: str) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        code, body = k8s_cluster.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                                          "metadata": {"name": name}})
        assert code == 201, body
        made.append(name)
        return name

    yield make
    for name in made:  # no kubelet: pods go at once, so the namespaces do too
        k8s_cluster.request("DELETE", f"/api/v1/namespaces/{name}/pods?gracePeriodSeconds=0")
        k8s_cluster.request("DELETE", f"/api/v1/namespaces/{name}")


def helm_install(cluster, release: str, ns: str, *sets: str) -> None:
    """With the webhook registered by URL on a free port of this machine, where InstalledController serves it (no
    kubelet runs the Deployment's pods, and a Service's Endpoints cannot hold a loopback address)."""
    # The session's CRD was created with kubectl-like tools: let this release adopt it, as README explains.
    cluster.kubectl_run("label", CRD, "app.kubernetes.io/managed-by=Helm", "--overwrite")
    cluster.kubectl_run("annotate", CRD, f"meta.helm.sh/release-name={release}",
                        f"meta.helm.sh/release-namespace={ns}", "--overwrite")
    port = free_port()
    args = ["install", release, str(CHART), "-n", ns, "--set", f"runner.image.repository={RUNNER_IMAGE}",
            "--set", f"webhook.port={port}", "--set", f"webhook.url=https://127.0.0.1:{port}"]
    for s in sets:
        args += ["--set", s]
    cluster.helm_run(*args)


class InstalledController:
    """`python -m controller` with the installed Deployment's arguments, as the chart's ServiceAccount."""

    def __init__(self, cluster, release_ns: str, deployment: str, log_dir):
        self.cluster, self.namespace = cluster, release_ns
        deploy = json.loads(cluster.kubectl_run("get", "deploy", deployment, "-n", release_ns, "-o", "json").stdout)
        pod = deploy["spec"]["template"]["spec"]
        self.args = pod["containers"][0]["args"]
        token = cluster.service_account_token(release_ns, pod["serviceAccountName"], create=False)
        self.kubeconfig = cluster.kubeconfig_for(token=token)
        self.port = free_port()
        self.log_path = log_dir / f"controller-{release_ns}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "InstalledController":
        env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
        env.update(KUBECONFIG=self.kubeconfig, PYTHONPATH=str(ROOT), POD_NAMESPACE=self.namespace)  # (fieldRef)
        with open(self.log_path, "w") as log:
            # the image's ENTRYPOINT is `python -m controller`; only the port differs (free one here)
            self.proc = subprocess.Popen([sys.executable, "-m", "controller", *self.args, f"--http-port={self.port}"],
                                         cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        wait_for(lambda: self.proc.poll() is not None or self.http("/readyz") == 200, 40, what="controller /readyz")
        assert self.proc.poll() is None, self.log()
        return self

    def http(self, path: str) -> int:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status
        except OSError:
            return 0

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def can(self, verb: str, resource: str, ns: str) -> bool:
        r = subprocess.run([self.cluster.kubectl, "auth", "can-i", verb, resource, "-n", ns],
                           env=self.cluster.env(token=None) | {"KUBECONFIG": self.kubeconfig},
                           capture_output=True, text=True, timeout=30)
        return r.stdout.strip() == "yes"


def apply_example(cluster, ns: str, name: str) -> str:
    cluster.kubectl_run("apply", "-n", ns, "-f", str(EXAMPLES / name))
    return json.loads(cluster.kubectl_run("apply", "-n", ns, "-f", str(EXAMPLES / name), "--dry-run=client",
                                          "-o", "json").stdout)["metadata"]["name"]


def ftj(cluster, ns: str, name: str) -> dict:
    code, body = cluster.request("GET", f"/apis/finetune.dev/v1alpha1/namespaces/{ns}/finetunejobs/{name}")
    assert code == 200, body
    return body


def jobs(cluster, ns: str) -> list[dict]:
    return cluster.request("GET", f"/apis/batch/v1/namespaces/{ns}/jobs")[1]["items"]


def wait_pending_with_job(cluster, controller, ns: str, name: str) -> dict:
    def ready():
        s = ftj(cluster, ns, name).get("status") or {}
        return s.get("phase") == "Pending" and jobs(cluster, ns) and s
    try:
        wait_for(ready, 30, what=f"{ns}/{name} Pending with a Job")
    except AssertionError as e:
        status = ftj(cluster, ns, name).get("status")
        raise AssertionError(f"{e}\nstatus: {status}\ncontroller log:\n{controller.log()}") from None
    [job] = jobs(cluster, ns)
    return job


def test_helm_install_all_namespaces_runs_a_finetunejob_and_uninstall_keeps_the_crd(k8s_cluster, namespace,
                                                                                    tmp_path):
    release_ns, jobs_ns = namespace("ftc-operator"), namespace("ftc-team")
    release = "ftc-all"
    helm_install(k8s_cluster, release, release_ns, "runner.image.tag=v1")
    status = json.loads(k8s_cluster.helm_run("status", release, "-n", release_ns, "-o", "json").stdout)
    assert status["info"]["status"] == "deployed"
    for kind, name in (("deploy", release + "-finetune-operator"), ("sa", release + "-finetune-operator"),
                       ("svc", release + "-finetune-operator-metrics")):
        k8s_cluster.kubectl_run("get", kind, name, "-n", release_ns)
    k8s_cluster.kubectl_run("get", "clusterrole", release + "-finetune-operator")

    controller = InstalledController(k8s_cluster, release_ns, release + "-finetune-operator", tmp_path).start()
    try:
        assert controller.can("create", "jobs.batch", jobs_ns) and not controller.can("get", "secrets", jobs_ns)
        name = apply_example(k8s_cluster, jobs_ns, "llama2-jsonl-s3.yaml")
        job = wait_pending_with_job(k8s_cluster, controller, jobs_ns, name)
        pod = job["spec"]["template"]["spec"]
        assert pod["containers"][0]["image"] == f"{RUNNER_IMAGE}:v1"  # the chart's runner image
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert "imagePullSecrets" not in pod
        assert ftj(k8s_cluster, jobs_ns, name)["status"]["jobName"] == job["metadata"]["name"]
    finally:
        controller.stop()

    out = k8s_cluster.helm_run("uninstall", release, "-n", release_ns).stdout
    assert "kept due to the resource policy" in out
    k8s_cluster.kubectl_run("get", CRD)  # still there, and so is the FineTuneJob
    ftj(k8s_cluster, jobs_ns, name)
    assert k8s_cluster.kubectl_run("get", "clusterrole", release + "-finetune-operator", check=False).returncode != 0


def test_helm_install_namespaced_needs_no_cluster_permission_on_jobs_and_applies_runner_defaults(
        k8s_cluster, namespace, tmp_path):
    release_ns = namespace("ftc-operator")
    watched, other = namespace("ftc-watched"), namespace("ftc-other")
    release = "ftc-ns"
    helm_install(k8s_cluster, release, release_ns, f"watchNamespaces={{{watched}}}",
                 "runner.gpuResourceName=example.com/gpu", "runner.imagePullSecrets={regcred}")
    # the only cluster-wide grant: reading CRDs and Namespaces
    role = json.loads(k8s_cluster.kubectl_run("get", "clusterrole", release + "-finetune-operator-discovery",
                                              "-o", "json").stdout)
    assert {r for rule in role["rules"] for r in rule["resources"]} == {"customresourcedefinitions", "namespaces"}
    assert {v for rule in role["rules"] for v in rule["verbs"]} == {"get", "list", "watch"}
    assert k8s_cluster.kubectl_run("get", "clusterrole", release + "-finetune-operator", check=False).returncode

    controller = InstalledController(k8s_cluster, release_ns, release + "-finetune-operator", tmp_path).start()
    try:
        assert controller.can("create", "jobs.batch", watched) and not controller.can("create", "jobs.batch", other)
        assert not controller.can("list", "finetunejobs.finetune.dev", other)
        name = apply_example(k8s_cluster, watched, "llama2-chat-guanaco.yaml")
        apply_example(k8s_cluster, other, "llama2-chat-guanaco.yaml")
        # the API server filled in this release's runner defaults
        spec = ftj(k8s_cluster, watched, name)["spec"]
        assert spec["resources"]["gpuResourceName"] == "example.com/gpu" and spec["imagePullSecrets"] == ["regcred"]

        job = wait_pending_with_job(k8s_cluster, controller, watched, name)
        pod = job["spec"]["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"] == {"example.com/gpu": "1", "memory": "48Gi"}
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
        time.sleep(1.0)  # the unwatched namespace's job is left alone
        assert not jobs(k8s_cluster, other) and not ftj(k8s_cluster, other, name).get("status")
        assert controller.proc.poll() is None, controller.log()
    finally:
        controller.stop()
    k8s_cluster.helm_run("uninstall", release, "-n", release_ns)
