"""The FineTuneJob as a trust boundary (README: "Security"), against the real API server.

The attacker is a user who may only create, get, list, watch and delete FineTuneJobs in one namespace (the
chart's editor ClusterRole, controller/rbac.py EDITOR_RULES), or the runner's own least-privilege token, or
whatever runs in the runner pod (its termination message). Each attack must gain nothing through the controller and stop nothing but its own
FineTuneJob.
"""
from __future__ import annotations

import json
import sys
import threading
import time

import pytest

from controller import limits, naming
from tests.controller.conftest import Controller, create_as, ftj_doc, ftj_path, pod_of, raw, wait_for



# ------------------------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def deep_json_in_this_process():
    """This test process reads the poison objects back, so it needs the controller's parse depth too."""
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(limits.RECURSION_LIMIT)
    yield
    sys.setrecursionlimit(before)


def deep(depth: int) -> str:
    """JSON text nested `depth` levels ({"a": {"a": ...}}): json.dumps cannot write it."""
    return '{"a":' * depth + "{}" + "}" * depth


class FailureClock(threading.Thread):
    """Polls FineTuneJobs (every 50 ms, its own connections) and notes when each first shows phase Failed."""

    def __init__(self, cluster, ns: str):
        super().__init__(daemon=True)
        self.cluster, self.ns = cluster, ns
        self.started: dict[str, float] = {}
        self.failed: dict[str, float] = {}
        self.halt = threading.Event()

    def start_clock(self, name: str) -> None:
        self.started[name] = time.monotonic()

    def run(self) -> None:
        while not self.halt.is_set():
            for name in [n for n in self.started if n not in self.failed]:
                code, body = raw(self.cluster, "GET", ftj_path(self.ns, name), None)
                if code == 200 and '"phase":"Failed"' in body:
                    self.failed[name] = time.monotonic()
            time.sleep(0.05)

    def seconds(self, name: str) -> float:
        wait_for(lambda: name in self.failed, 30, what=f"{name} Failed")
        return self.failed[name] - self.started[name]


# --------------------------------------------------------------------------------- finding 2: poison
NORMAL_JOBS = 20


def test_poison_objects_fail_alone_while_other_jobs_keep_moving(controller, cluster_api, fake_kubelet, k8s_cluster,
                                                                editor):
    """Poison from each untrusted source - a user's spec, the runner's status token, the pod's termination
    message - fails its own FineTuneJob (or is refused by the API server); 20 other jobs run to success meanwhile
    and the controller never exits."""
    ns = cluster_api.ns
    for i in range(NORMAL_JOBS):
        assert create_as(k8s_cluster, editor, ns, ftj_doc(f"normal-{i}"))[0] == 201
    for name in ("victim", "victim-mb", "deep-term", "deep-term-ok"):
        assert create_as(k8s_cluster, editor, ns, ftj_doc(name))[0] == 201
    for name in ("victim", "victim-mb"):
        cluster_api.wait_phase(name, "Pending")
    times, refused = {}, []
    clock = FailureClock(k8s_cluster, ns)
    clock.start()

    # 1. spec.affinity nested 1,000 levels (6 KB: the API server stores it, Python's json cannot read it)
    doc = json.dumps(ftj_doc("deep-spec", affinity="AFFINITY")).replace('"AFFINITY"', '{"nodeAffinity":' + deep(1000)
                                                                         + "}")
    clock.start_clock("deep-spec")
    code, body = create_as(k8s_cluster, editor, ns, doc)
    assert code == 201, body
    # 2. a 1 MB spec (free-form affinity: the CRD cannot bound what is inside)
    big = ftj_doc("big-spec", affinity={"nodeAffinity": {"x": "A" * 1_000_000}})
    clock.start_clock("big-spec")
    code, body = create_as(k8s_cluster, editor, ns, big)
    assert code == 201, body[:300]
    # 3. the runner's own token patches status.metrics 1,000 deep: refused by the CRD (metrics are numbers)
    runner_token = k8s_cluster.service_account_token(ns, "victim-runner", create=False)
    # the runner's RoleBinding reaches the apiserver's RBAC cache a moment after it is created
    wait_for(lambda: raw(k8s_cluster, "GET", ftj_path(ns, "victim", "status"), None, token=runner_token)[0] == 200,
             20, what="the runner's token to read its job's status")
    code, body = raw(k8s_cluster, "PATCH", ftj_path(ns, "victim", "status"),
                     ('{"status":{"metrics":' + deep(1000) + "}}").encode(), token=runner_token,
                     content_type="application/merge-patch+json")
    assert code == 422 and "status.metrics" in body, (code, body[:300])
    refused.append("status.metrics nested 1,000 deep (runner token): HTTP 422")
    # ... and the same nesting in a typed field is pruned by the API server, never stored
    code, _ = raw(k8s_cluster, "PATCH", ftj_path(ns, "victim", "status"),
                  ('{"status":{"progress":' + deep(1000) + "}}").encode(), token=runner_token,
                  content_type="application/merge-patch+json")
    assert code in (200, 422) and "a" not in (cluster_api.status("victim").get("progress") or {})
    refused.append(f"status.progress nested 1,000 deep (runner token): HTTP {code}, nothing stored")
    for field, value in (("message", "M" * 1_000_000), ("progress", {"summary": "S" * 1_000_000})):
        code, body = raw(k8s_cluster, "PATCH", ftj_path(ns, "victim", "status"),
                         json.dumps({"status": {field: value}}).encode(), token=runner_token,
                         content_type="application/merge-patch+json")
        assert code == 422, (field, code, body[:300])
        refused.append(f"status.{field} of 1 MB (runner token): HTTP 422")
    # 4. a 1 MB status the CRD cannot refuse (a metric's name is a map key) reaches the controller
    mb_token = k8s_cluster.service_account_token(ns, "victim-mb-runner", create=False)
    wait_for(lambda: raw(k8s_cluster, "GET", ftj_path(ns, "victim-mb", "status"), None, token=mb_token)[0] == 200,
             20, what="the runner's token to read its job's status")
    clock.start_clock("victim-mb")
    code, body = raw(k8s_cluster, "PATCH", ftj_path(ns, "victim-mb", "status"),
                     json.dumps({"status": {"metrics": {"K" * 1_000_000: 1.0}}}).encode(), token=mb_token,
                     content_type="application/merge-patch+json")
    assert code == 200, body[:300]
    # 5. termination messages nested 1,000 deep, after a permanent failure and after a success
    pods = {n: pod_of(fake_kubelet, ns, f"{n}-1") for n in ("deep-term", "deep-term-ok")}
    for pod in pods.values():
        fake_kubelet.running(pod)
    clock.start_clock("deep-term")
    fake_kubelet.failed(pods["deep-term"], exit_code=2, message="[" * 1000 + "]" * 1000)
    fake_kubelet.succeeded(pods["deep-term-ok"], message="[" * 1000 + "]" * 1000)

    # meanwhile every normal job moves from Pending through Running to Succeeded
    for i in range(NORMAL_JOBS):
        pod = pod_of(fake_kubelet, ns, f"normal-{i}-1", timeout=60)
        fake_kubelet.running(pod)
        fake_kubelet.succeeded(pod, message=json.dumps({"event": "result", "phase": "Succeeded", "exitCode": 0,
                                                        "output": f"s3://models/normal-{i}"}))

    s = cluster_api.wait_phase("deep-spec", "Failed", reason="InvalidSpec")
    assert "spec.affinity.nodeAffinity" in s["message"] and "nested deeper than" in s["message"], s["message"]
    s = cluster_api.wait_phase("big-spec", "Failed", reason="InvalidSpec")
    assert "larger than" in s["message"], s["message"]
    s = cluster_api.wait_phase("victim-mb", "Failed", reason="InvalidStatus")
    assert "status.metrics" in s["message"], s["message"]
    s = cluster_api.wait_phase("deep-term", "Failed", reason="TrainingFailed")
    assert "not a runner result (nested deeper than" in s["message"], s["message"]
    for what, name in (("spec.affinity 1,000 deep", "deep-spec"), ("1 MB spec", "big-spec"),
                       ("1 MB status (a metric's name)", "victim-mb"), ("termination message 1,000 deep",
                                                                         "deep-term")):
        times[what] = clock.seconds(name)
    clock.halt.set()
    s = cluster_api.wait_phase("deep-term-ok", "Succeeded")  # success is the exit code's: it is not stuck
    assert s.get("output") is None and not s.get("metrics")

    for i in range(NORMAL_JOBS):
        s = cluster_api.wait_phase(f"normal-{i}", "Succeeded", timeout=60)
        assert s["output"] == f"s3://models/normal-{i}"
    # the poison left nothing behind: no Job for a poison spec, the bad status fields removed, and the
    # victim's Job deleted (its runner stopped)
    assert not cluster_api.jobs("deep-spec") and not cluster_api.jobs("big-spec")
    wait_for(lambda: not cluster_api.jobs("victim-mb"), 20, what="the victim's Job deleted")
    assert "metrics" not in cluster_api.status("victim-mb")
    assert cluster_api.status("victim")["phase"] == "Pending"  # refused patches changed nothing
    assert controller.proc.poll() is None and controller.http("/healthz")[0] == 200, controller.log()
    assert "Traceback" not in controller.log(), controller.log()
    print(f"\npoison marked Failed while {NORMAL_JOBS} jobs ran (s): "
          + ", ".join(f"{k}: {v:.2f}" for k, v in times.items())
          + "\nrefused by the API server: " + "; ".join(refused))


def test_the_deepest_spec_the_api_server_stores_is_contained(controller, cluster_api, k8s_cluster, editor):
    """~10,000 levels: the most the API server accepts (its JSON decoder stops at 10,000)."""
    ns = cluster_api.ns
    doc = json.dumps(ftj_doc("deepest", affinity="A")).replace('"A"', '{"nodeAffinity":' + deep(9_990) + "}")
    code, body = create_as(k8s_cluster, editor, ns, doc)
    assert code == 201, body[:300]
    assert create_as(k8s_cluster, editor, ns, ftj_doc("after"))[0] == 201
    cluster_api.wait_phase("deepest", "Failed", reason="InvalidSpec")
    cluster_api.wait_phase("after", "Pending")
    wait_for(lambda: cluster_api.jobs("after"), 60, what="the Job of the job created after it")  # Pending comes first
    assert not cluster_api.jobs("deepest")
    assert controller.proc.poll() is None, controller.log()


# ----------------------------------------------------------------------- finding 1: the admin policy
CONTROL_PLANE = "node-role.kubernetes.io/control-plane"
ATTACKS = {  # name -> (spec fields, what the refusal must name)
    "image": ({"image": "evil.example/miner:latest"}, ["spec.image", "policy.imagePrefixes"]),
    "image-lookalike": ({"image": "registry.example/finetune-runner:test-evil"}, ["spec.image"]),
    "cluster-admin-sa": ({"serviceAccountName": "admin-sa"}, ["spec.serviceAccountName",
                                                               "policy.serviceAccountNames"]),
    "other-teams-secret": ({"env": [{"name": "STOLEN", "valueFrom": {"secretKeyRef": {"name": "team-b-db",
                                                                                        "key": "password"}}}]},
                           ["spec.env[0].valueFrom.secretKeyRef", "policy.envValueFrom"]),
    "configmap-env": ({"env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k"}}}]},
                      ["spec.env[0].valueFrom.configMapKeyRef", "policy.envValueFrom"]),
    "override-finetune-env": ({"env": [{"name": "FINETUNE_JOB_NAME", "value": "someone-elses-job"}]},
                              ["spec.env[0]", "FINETUNE_JOB_NAME is reserved"]),
    "redirect-hub": ({"env": [{"name": "HF_ENDPOINT", "value": "https://evil.example"}],
                      "hfTokenSecretRef": {"name": "hf"}}, ["HF_ENDPOINT is reserved"]),
    "redirect-s3": ({"env": [{"name": "AWS_ENDPOINT_URL", "value": "https://evil.example"}]},
                    ["AWS_ENDPOINT_URL is reserved"]),
    "swap-gcs-key": ({"env": [{"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": "/scratch/planted.json"}],
                      "gcsSecretRef": {"name": "gcs"}}, ["GOOGLE_APPLICATION_CREDENTIALS is reserved"]),
    "redirect-apiserver": ({"env": [{"name": "KUBERNETES_SERVICE_HOST", "value": "evil.example"}]},
                           ["KUBERNETES_SERVICE_HOST is reserved"]),
    "tolerate-everything": ({"tolerations": [{"operator": "Exists"}]}, ["spec.tolerations[0]",
                                                                       "policy.tolerationKeys"]),
    "tolerate-control-plane": ({"tolerations": [{"key": CONTROL_PLANE, "operator": "Exists",
                                                 "effect": "NoSchedule"}]},
                               ["spec.tolerations[0].key", "policy.tolerationKeys"]),
    "select-control-plane": ({"nodeSelector": {CONTROL_PLANE: "true"}}, ["spec.nodeSelector", "policy.nodeSelectorKeys"]),
    "affinity-control-plane": ({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": CONTROL_PLANE, "operator": "Exists"}]}]}}}},
        ["spec.affinity.nodeAffinity", "policy.nodeSelectorKeys"]),
    "pod-affinity": ({"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"app": "db"}}}]}}},
        ["spec.affinity.podAffinity", "policy.podAffinity"]),
    "system-priority": ({"priorityClassName": "system-cluster-critical"},
                        ["spec.priorityClassName", "policy.priorityClassNames"]),
}


def _admin_sa_and_secret(k8s_cluster, ns: str) -> None:
    """What an attacker would like to borrow: a ServiceAccount bound to cluster-admin, another team's Secret."""
    k8s_cluster.request("POST", f"/api/v1/namespaces/{ns}/serviceaccounts",
                        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "admin-sa"}})
    k8s_cluster.request("POST", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": f"admin-sa-{ns}"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": "admin-sa", "namespace": ns}]})
    k8s_cluster.request("POST", f"/api/v1/namespaces/{ns}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "team-b-db"},
        "stringData": {"password": "team-b-password"}})


def test_default_policy_refuses_every_confused_deputy_attack(controller, cluster_api, fake_kubelet, k8s_cluster,
                                                             editor):
    """A user who gets 403 on pods, Jobs and Secrets asks the controller for them through a FineTuneJob: each
    spec is refused (Failed, InvalidSpec, naming the field and the policy key) before any Job or runner
    identity exists. A plain job of the same user runs, as a hardened pod."""
    ns = cluster_api.ns
    _admin_sa_and_secret(k8s_cluster, ns)
    for name, (spec, _) in ATTACKS.items():
        code, body = create_as(k8s_cluster, editor, ns, ftj_doc(name, **spec))
        assert code == 201, (name, body[:300])
    assert create_as(k8s_cluster, editor, ns, ftj_doc("plain"))[0] == 201
    for name, (_, fragments) in ATTACKS.items():
        s = cluster_api.wait_phase(name, "Failed", reason="InvalidSpec")
        for f in fragments:
            assert f in s["message"], (name, f, s["message"])
        assert "refused by the operator's policy" in s["message"] or "reserved" in s["message"], s["message"]
    cluster_api.wait_phase("plain", "Pending")
    time.sleep(1.0)  # longer than a pass: nothing more happens for the refused jobs
    jobs = {j["metadata"]["annotations"][naming.ANNOTATION_JOB_NAME] for j in cluster_api.jobs()}
    assert jobs == {"plain"}
    assert {b["metadata"]["name"] for b in cluster_api.list("rbac.authorization.k8s.io/v1", "rolebindings")
            if b["metadata"]["name"].endswith("-runner")} == {"plain-runner"}
    events = [e for name in ATTACKS for e in cluster_api.events(name)]
    assert all("team-b-password" not in e["message"] for e in events)
    print(f"\nconfused-deputy attacks refused by the default policy: {len(ATTACKS)}/{len(ATTACKS)}")

    # finding 4: the one job that runs is a hardened pod (as the API server and the Job controller made it)
    pod = pod_of(fake_kubelet, ns, "plain-1")
    spec = pod["spec"]
    c = spec["containers"][0]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["securityContext"]["allowPrivilegeEscalation"] is False and spec["securityContext"]["runAsNonRoot"]
    assert spec["serviceAccountName"] == "plain-runner" and spec["automountServiceAccountToken"] is True
    env = {e["name"]: e.get("value") for e in c["env"]}
    writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
    for path in (env["HOME"], env["TMPDIR"], env["FINETUNE_WORK_DIR"], "/tmp", c["workingDir"]):
        assert any(path == w or path.startswith(w + "/") for w in writable), (path, writable)


POLICY = {"imagePrefixes": ["registry.example/team/"], "serviceAccountNames": ["trainer"],
          "envValueFrom": ["configMapKeyRef"], "tolerationKeys": ["nvidia.com/gpu", "gpu"],
          "nodeSelectorKeys": ["gpu-type"], "priorityClassNames": ["batch"], "reservedEnv": ["WANDB_MODE"]}


def test_an_admin_policy_allows_what_it_lists_and_nothing_more(controller_kubeconfig, cluster_api, k8s_cluster,
                                                              editor, tmp_path):
    ns = cluster_api.ns
    ctl = Controller(controller_kubeconfig, ns, tmp_path, f"--policy={json.dumps(POLICY)}").start()
    try:
        allowed = {"image": "registry.example/team/runner:2", "serviceAccountName": "trainer",
                   "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k"}}}],
                   "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                   "nodeSelector": {"gpu-type": "h200"}, "priorityClassName": "batch",
                   "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                       {"weight": 1, "preference": {"matchExpressions": [{"key": "gpu-type", "operator": "In",
                                                                           "values": ["h200"]}]}}]}}}
        refused = {"lookalike": ({"image": "registry.example/team-evil/runner:2"}, "spec.image"),
                   "other-sa": ({"serviceAccountName": "admin-sa"}, "spec.serviceAccountName"),
                   "secret-env": ({"env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
                                  "policy.envValueFrom allows configMapKeyRef"),
                   "admin-reserved": ({"env": [{"name": "WANDB_MODE", "value": "online"}]}, "WANDB_MODE is reserved"),
                   "other-taint": ({"tolerations": [{"operator": "Exists"}]}, "spec.tolerations[0]"),
                   "other-label": ({"nodeSelector": {"kubernetes.io/hostname": "n1"}}, "spec.nodeSelector")}
        assert create_as(k8s_cluster, editor, ns, ftj_doc("allowed", **allowed))[0] == 201
        # allowed by the policy, malformed for Kubernetes: the API server refuses the Job, the job fails
        assert create_as(k8s_cluster, editor, ns, ftj_doc("tol", tolerations=[{"key": "gpu",
                                                                                 "operator": "Sometimes"}]))[0] == 201
        for name, (spec, _) in refused.items():
            assert create_as(k8s_cluster, editor, ns, ftj_doc(name, **spec))[0] == 201
        cluster_api.wait_phase("allowed", "Pending")
        job = wait_for(lambda: cluster_api.jobs("allowed"), 20, what="Job allowed-1")[0]
        ps = job["spec"]["template"]["spec"]
        assert ps["containers"][0]["image"] == allowed["image"] and ps["serviceAccountName"] == "trainer"
        assert ps["priorityClassName"] == "batch" and ps["nodeSelector"] == {"gpu-type": "h200"}
        s = cluster_api.wait_phase("tol", "Failed", reason="InvalidSpec")
        assert "tolerations" in s["message"] and "Sometimes" in s["message"], s["message"]
        for name, (_, fragment) in refused.items():
            s = cluster_api.wait_phase(name, "Failed", reason="InvalidSpec")
            assert fragment in s["message"], (name, s["message"])
            assert not cluster_api.jobs(name)
    finally:
        ctl.stop()


def test_a_bad_policy_stops_the_controller_at_start(controller_kubeconfig, k8s_namespace, tmp_path):
    ctl = Controller(controller_kubeconfig, k8s_namespace, tmp_path, '--policy={"imagePrefix": ["x/"]}')
    with pytest.raises(AssertionError):
        ctl.start()
    assert ctl.proc.returncode == 2 and "imagePrefix" in ctl.log()
