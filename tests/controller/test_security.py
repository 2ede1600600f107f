"""The FineTuneJob as a trust boundary (README: "Security"), against the real API server.

The attacker is a user who may only create, get, list, watch and delete FineTuneJobs in one namespace (the
`finetune-editor` rules below), or the runner's own least-privilege token, or whatever runs in the runner pod
(its termination message). Each attack must gain nothing through the controller and stop nothing but its own
FineTuneJob.
"""
from __future__ import annotations

import json
import ssl
import sys
import time
import urllib.error
import urllib.request

import pytest

from controller import limits
from runner.api import names
from tests.controller.conftest import Controller, ftj_doc, pod_of, wait_for

EDITOR_RULES = [{"apiGroups": [names.GROUP], "resources": [names.PLURAL],
                 "verbs": ["create", "get", "list", "watch", "delete"]}]
FTJ_PATH = "/apis/{gv}/namespaces/{ns}/{plural}"


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


def ftj_path(ns: str, name: str | None = None, sub: str | None = None) -> str:
    p = FTJ_PATH.format(gv=names.API_VERSION, ns=ns, plural=names.PLURAL)
    return p + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")


def create_as(cluster, token: str, ns: str, doc: dict | str) -> tuple[int, str]:
    body = doc if isinstance(doc, str) else json.dumps(doc)
    return raw(cluster, "POST", ftj_path(ns), body.encode(), token=token)


@pytest.fixture
def editor(k8s_cluster, k8s_namespace) -> str:
    """alice's token; alice may only create, get, list, watch and delete FineTuneJobs in the namespace."""
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


def timed_failure(cluster_api, name: str, t0: float, reason: str, timeout: float = 30) -> tuple[float, dict]:
    s = cluster_api.wait_phase(name, "Failed", timeout=timeout, reason=reason)
    return time.monotonic() - t0, s


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

    # 1. spec.affinity nested 1,000 levels (6 KB: the API server stores it, Python's json cannot read it)
    doc = json.dumps(ftj_doc("deep-spec", affinity="AFFINITY")).replace('"AFFINITY"', '{"nodeAffinity":' + deep(1000)
                                                                         + "}")
    t0 = time.monotonic()
    code, body = create_as(k8s_cluster, editor, ns, doc)
    assert code == 201, body
    # 2. a 1 MB spec (free-form affinity: the CRD cannot bound what is inside)
    big = ftj_doc("big-spec", affinity={"nodeAffinity": {"x": "A" * 1_000_000}})
    t1 = time.monotonic()
    code, body = create_as(k8s_cluster, editor, ns, big)
    assert code == 201, body[:300]
    # 3. the runner's own token patches status.metrics 1,000 deep: refused by the CRD (metrics are numbers)
    runner_token = k8s_cluster.service_account_token(ns, "victim-runner", create=False)
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
    t2 = time.monotonic()
    code, body = raw(k8s_cluster, "PATCH", ftj_path(ns, "victim-mb", "status"),
                     json.dumps({"status": {"metrics": {"K" * 1_000_000: 1.0}}}).encode(), token=mb_token,
                     content_type="application/merge-patch+json")
    assert code == 200, body[:300]
    # 5. termination messages nested 1,000 deep, after a permanent failure and after a success
    pods = {n: pod_of(fake_kubelet, ns, f"{n}-1") for n in ("deep-term", "deep-term-ok")}
    for pod in pods.values():
        fake_kubelet.running(pod)
    t3 = time.monotonic()
    fake_kubelet.failed(pods["deep-term"], exit_code=2, message="[" * 1000 + "]" * 1000)
    fake_kubelet.succeeded(pods["deep-term-ok"], message="[" * 1000 + "]" * 1000)

    # meanwhile every normal job moves from Pending through Running to Succeeded
    for i in range(NORMAL_JOBS):
        pod = pod_of(fake_kubelet, ns, f"normal-{i}-1", timeout=60)
        fake_kubelet.running(pod)
        fake_kubelet.succeeded(pod, message=json.dumps({"event": "result", "phase": "Succeeded", "exitCode": 0,
                                                        "output": f"s3://models/normal-{i}"}))

    times["spec.affinity 1,000 deep"], s = timed_failure(cluster_api, "deep-spec", t0, "InvalidSpec")
    assert "spec.affinity.nodeAffinity" in s["message"] and "nested deeper than" in s["message"], s["message"]
    times["1 MB spec"], s = timed_failure(cluster_api, "big-spec", t1, "InvalidSpec")
    assert "larger than" in s["message"], s["message"]
    times["1 MB status.metrics key"], s = timed_failure(cluster_api, "victim-mb", t2, "InvalidStatus")
    assert "status.metrics" in s["message"], s["message"]
    times["termination message 1,000 deep"], s = timed_failure(cluster_api, "deep-term", t3, "TrainingFailed")
    assert "not a runner result (nested deeper than" in s["message"], s["message"]
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
    assert cluster_api.jobs("after") and not cluster_api.jobs("deepest")
    assert controller.proc.poll() is None, controller.log()
