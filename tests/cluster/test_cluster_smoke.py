"""Smoke tests of the test cluster harness itself (not of the product): a real apiserver, the real Job
controller, the real garbage collector and RBAC, kubectl and helm, with FakeKubelet playing the kubelet.
The product's own CRD and operator are tested in tests/controller and tests/deploy."""

from __future__ import annotations

import json
import subprocess

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.cluster.cluster import wait_for

pytestmark = pytest.mark.k8s


def make_job(name: str, backoff_limit: int = 0, parallelism: int = 1, completions: int = 1,
             restart_policy: str = "Never") -> client.V1Job:
    return client.V1Job(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1JobSpec(
            backoff_limit=backoff_limit,
            parallelism=parallelism,
            completions=completions,
            template=client.V1PodTemplateSpec(
                spec=client.V1PodSpec(
                    restart_policy=restart_policy,
                    containers=[client.V1Container(
                        name="trainer", image="ghcr.io/example/finetune-runner:0.1.0",
                        command=["finetune-runner"],
                        resources=client.V1ResourceRequirements(limits={"memory": "1Gi", "cpu": "1"}),
                    )],
                )
            ),
        ),
    )


def job_condition(batch: client.BatchV1Api, ns: str, name: str, type_: str):
    job = batch.read_namespaced_job_status(name, ns)
    for c in job.status.conditions or []:
        if c.type == type_ and c.status == "True":
            return job, c
    return None


def test_cluster_basics(k8s_cluster, k8s_client, fake_kubelet):
    ver = client.VersionApi(k8s_client).get_code()
    assert ver.git_version == "v1.20.2"
    assert k8s_cluster.is_running()
    crds = {c.metadata.name: c for c in client.ApiextensionsV1Api(k8s_client).list_custom_resource_definition().items}
    widgets = crds["widgets.clustertest.example.com"]  # the harness's own test CRD is served
    assert any(c.type == "Established" and c.status == "True" for c in widgets.status.conditions)
    node = fake_kubelet.ensure_node(gpus=1)
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "1"


def test_job_pod_succeeds_job_complete(k8s_namespace, k8s_client, fake_kubelet):
    ns = k8s_namespace
    batch = client.BatchV1Api(k8s_client)
    job = batch.create_namespaced_job(ns, make_job("ok"))

    pod = wait_for(lambda: fake_kubelet.job_pods(ns, "ok"), 20, what="job pod")[0]
    owner = pod["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == ("Job", "ok", job.metadata.uid, True)
    assert pod["status"]["phase"] == "Pending" and not pod["spec"].get("nodeName")

    running = fake_kubelet.running(pod)
    assert running["spec"]["nodeName"] == "fake-node"
    assert running["status"]["phase"] == "Running"
    assert running["status"]["containerStatuses"][0]["state"]["running"]["startedAt"]
    wait_for(lambda: batch.read_namespaced_job_status("ok", ns).status.active == 1, 20, what="job active=1")

    done = fake_kubelet.succeeded(pod, message="merged adapter pushed")
    term = done["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 0 and term["reason"] == "Completed" and term["message"] == "merged adapter pushed"
    assert term["startedAt"] <= term["finishedAt"]

    job, cond = wait_for(lambda: job_condition(batch, ns, "ok", "Complete"), 20, what="Job Complete")
    assert job.status.succeeded == 1 and not job.status.active
    assert job.status.completion_time is not None
    # the status the "kubelet" wrote is what a reader gets back
    pod = fake_kubelet.get(pod)
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"] == "merged adapter pushed"
    assert {c["type"]: c["status"] for c in pod["status"]["conditions"]}["Ready"] == "False"


def test_job_oom_retries_then_fails(k8s_namespace, k8s_client, fake_kubelet):
    ns = k8s_namespace
    batch = client.BatchV1Api(k8s_client)
    batch.create_namespaced_job(ns, make_job("oom", backoff_limit=1))

    first = wait_for(lambda: fake_kubelet.job_pods(ns, "oom"), 20, what="first pod")[0]
    fake_kubelet.running(first)
    failed = fake_kubelet.oom_killed(first, message="CUDA out of memory")
    term = failed["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (failed["status"]["phase"], term["exitCode"], term["reason"]) == ("Failed", 137, "OOMKilled")

    # backoffLimit=1: one retry (the 1.20 Job controller may wait its 10 s back-off first)
    second = wait_for(
        lambda: [p for p in fake_kubelet.job_pods(ns, "oom") if p["metadata"]["name"] != first["metadata"]["name"]],
        60, what="replacement pod",
    )[0]
    # the controller creates the Pod, then writes the Job status: poll
    wait_for(lambda: batch.read_namespaced_job_status("oom", ns).status.failed == 1, 20, what="status.failed=1")
    fake_kubelet.failed(second, exit_code=137, reason="OOMKilled")

    job, cond = wait_for(lambda: job_condition(batch, ns, "oom", "Failed"), 60, what="Job Failed")
    assert cond.reason == "BackoffLimitExceeded"
    assert job.status.failed == 2
    assert len(fake_kubelet.job_pods(ns, "oom")) == 2  # no third attempt


def test_job_on_failure_restarts_count_against_backoff_limit(k8s_namespace, k8s_client, fake_kubelet):
    ns = k8s_namespace
    batch = client.BatchV1Api(k8s_client)
    batch.create_namespaced_job(ns, make_job("restarts", backoff_limit=2, restart_policy="OnFailure"))
    pod = wait_for(lambda: fake_kubelet.job_pods(ns, "restarts"), 20, what="pod")[0]
    fake_kubelet.running(pod)
    p = fake_kubelet.restarted(pod, exit_code=137, reason="OOMKilled")
    cs = p["status"]["containerStatuses"][0]
    assert cs["restartCount"] == 1 and cs["lastState"]["terminated"]["reason"] == "OOMKilled"
    assert "running" in cs["state"] and p["status"]["phase"] == "Running"
    p = fake_kubelet.restarted(pod, exit_code=137, reason="OOMKilled", back_off=True)
    cs = p["status"]["containerStatuses"][0]
    assert cs["restartCount"] == 2 and cs["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    job, cond = wait_for(lambda: job_condition(batch, ns, "restarts", "Failed"), 30, what="Job Failed")
    assert cond.reason == "BackoffLimitExceeded"


def test_job_failed_exit_code_and_waiting_states(k8s_namespace, k8s_client, fake_kubelet):
    ns = k8s_namespace
    batch = client.BatchV1Api(k8s_client)
    batch.create_namespaced_job(ns, make_job("states"))
    pod = wait_for(lambda: fake_kubelet.job_pods(ns, "states"), 20, what="pod")[0]

    p = fake_kubelet.unschedulable(pod)
    cond = {c["type"]: c for c in p["status"]["conditions"]}["PodScheduled"]
    assert (cond["status"], cond["reason"]) == ("False", "Unschedulable") and "Insufficient" in cond["message"]
    assert not p["spec"].get("nodeName") and p["status"]["phase"] == "Pending"

    p = fake_kubelet.image_pull_error(pod)
    w = p["status"]["containerStatuses"][0]["state"]["waiting"]
    assert w["reason"] == "ErrImagePull" and "ghcr.io/example/finetune-runner:0.1.0" in w["message"]
    assert {c["type"]: c["status"] for c in p["status"]["conditions"]}["PodScheduled"] == "True"
    p = fake_kubelet.image_pull_error(pod, back_off=True)
    assert p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "ImagePullBackOff"
    assert p["status"]["phase"] == "Pending"

    fake_kubelet.running(pod)
    p = fake_kubelet.failed(pod, exit_code=3, reason="Error", message='{"error": "bad dataset"}')
    term = p["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (term["exitCode"], term["reason"], json.loads(term["message"])) == (3, "Error", {"error": "bad dataset"})
    job, cond = wait_for(lambda: job_condition(batch, ns, "states", "Failed"), 30, what="Job Failed")
    assert cond.reason == "BackoffLimitExceeded" and job.status.failed == 1


def test_deleting_job_garbage_collects_pods(k8s_namespace, k8s_client, fake_kubelet):
    ns = k8s_namespace
    batch = client.BatchV1Api(k8s_client)
    batch.create_namespaced_job(ns, make_job("gc", parallelism=2, completions=2))
    pods = wait_for(lambda: (lambda ps: ps if len(ps) == 2 else None)(fake_kubelet.job_pods(ns, "gc")), 20,
                    what="2 pods")
    fake_kubelet.running(pods[0])  # bound + running: deletion is graceful (needs the kubelet)
    # pods[1] stays Pending and unbound: deleted at once

    # batch/v1 Jobs default to orphaning their Pods: ask for background propagation
    batch.delete_namespaced_job("gc", ns, propagation_policy="Background")
    wait_for(lambda: all(p["metadata"].get("deletionTimestamp") for p in fake_kubelet.job_pods(ns, "gc")), 30,
             what="GC to delete pods")
    fake_kubelet.process_deletions(ns)
    wait_for(lambda: fake_kubelet.job_pods(ns, "gc") == [], 30, what="pods gone")
    with pytest.raises(ApiException) as e:
        batch.read_namespaced_job("gc", ns)
    assert e.value.status == 404


def test_gc_of_objects_owned_by_custom_resource(k8s_namespace, k8s_client):
    ns = k8s_namespace
    co = client.CustomObjectsApi(k8s_client)
    core = client.CoreV1Api(k8s_client)
    w = co.create_namespaced_custom_object("clustertest.example.com", "v1", ns, "widgets", {
        "apiVersion": "clustertest.example.com/v1", "kind": "Widget", "metadata": {"name": "w1"}, "spec": {"size": 1},
    })
    core.create_namespaced_config_map(ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(
        name="owned", owner_references=[client.V1OwnerReference(
            api_version="clustertest.example.com/v1", kind="Widget", name="w1", uid=w["metadata"]["uid"],
            controller=True, block_owner_deletion=True)])))
    co.delete_namespaced_custom_object("clustertest.example.com", "v1", ns, "widgets", "w1")

    def gone():
        try:
            core.read_namespaced_config_map("owned", ns)
            return False
        except ApiException as e:
            return e.status == 404
    wait_for(gone, 20, what="ConfigMap owned by a Widget to be collected")


def test_rbac_token_user_denied_then_allowed(k8s_cluster, k8s_namespace, k8s_client):
    ns = k8s_namespace
    alice = k8s_cluster.api_client(user="alice")
    try:
        batch_alice = client.BatchV1Api(alice)
        with pytest.raises(ApiException) as e:
            batch_alice.list_namespaced_job(ns)
        assert e.value.status == 403
        assert 'User "alice" cannot list resource "jobs"' in json.loads(e.value.body)["message"]

        rbac = client.RbacAuthorizationV1Api(k8s_client)
        rbac.create_namespaced_role(ns, client.V1Role(
            metadata=client.V1ObjectMeta(name="job-reader"),
            rules=[client.V1PolicyRule(api_groups=["batch"], resources=["jobs"], verbs=["get", "list", "watch"])]))
        rbac.create_namespaced_role_binding(ns, client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="alice-job-reader"),
            role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="job-reader"),
            subjects=[client.RbacV1Subject(kind="User", name="alice", api_group="rbac.authorization.k8s.io")]))

        def allowed():
            try:
                return batch_alice.list_namespaced_job(ns) is not None
            except ApiException as e:
                if e.status == 403:
                    return False
                raise
        wait_for(allowed, 10, what="RBAC grant to take effect")
        # still denied for what the Role does not grant, and in other namespaces
        with pytest.raises(ApiException) as e:
            batch_alice.create_namespaced_job(ns, make_job("nope"))
        assert e.value.status == 403
        with pytest.raises(ApiException) as e:
            batch_alice.list_namespaced_job("default")
        assert e.value.status == 403
    finally:
        alice.close()


def test_service_account_token_and_rbac(k8s_cluster, k8s_namespace, k8s_client):
    ns = k8s_namespace
    token = k8s_cluster.service_account_token(ns, "operator")
    sa = k8s_cluster.api_client(token=token)
    try:
        core_sa = client.CoreV1Api(sa)
        with pytest.raises(ApiException) as e:
            core_sa.list_namespaced_config_map(ns)
        assert e.value.status == 403
        assert f'User "system:serviceaccount:{ns}:operator"' in json.loads(e.value.body)["message"]

        rbac = client.RbacAuthorizationV1Api(k8s_client)
        rbac.create_namespaced_role(ns, client.V1Role(
            metadata=client.V1ObjectMeta(name="cm"),
            rules=[client.V1PolicyRule(api_groups=[""], resources=["configmaps"], verbs=["list"])]))
        rbac.create_namespaced_role_binding(ns, client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="operator-cm"),
            role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="cm"),
            subjects=[client.RbacV1Subject(kind="ServiceAccount", name="operator", namespace=ns)]))

        def allowed():
            try:
                return core_sa.list_namespaced_config_map(ns) is not None
            except ApiException as e:
                if e.status == 403:
                    return False
                raise
        wait_for(allowed, 10, what="RBAC grant for the ServiceAccount")
    finally:
        sa.close()


def test_kubectl_and_helm(k8s_cluster, k8s_namespace):
    r = k8s_cluster.kubectl_run("get", "namespace", k8s_namespace, "-o", "jsonpath={.metadata.name}")
    assert r.stdout == k8s_namespace
    r = k8s_cluster.kubectl_run("auth", "can-i", "list", "jobs", "-n", k8s_namespace, user="carol", check=False)
    assert r.stdout.strip() == "no"
    r = k8s_cluster.kubectl_run("apply", "-n", k8s_namespace, "-f", "-", input=(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: from-kubectl\ndata:\n  a: b\n"))
    assert "configmap/from-kubectl" in r.stdout
    r = subprocess.run([k8s_cluster.helm, "version", "--short"], capture_output=True, text=True,
                       env=k8s_cluster.env(), check=True)
    assert r.stdout.startswith("v3.6.2")
    r = k8s_cluster.helm_run("list", "-n", k8s_namespace, "-o", "json")
    assert json.loads(r.stdout) == []
