"""The validating admission webhook (controller/webhook.py), registered with the real API server and called by
it over TLS, for real non-admin users: alice may only create FineTuneJobs; bob may also read his own Secret."""
from __future__ import annotations

import base64
import json
import statistics
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from controller import rbac, webhook
from runner.api import names
from tests.cluster.cluster import free_port
from tests.controller.conftest import EDITOR_RULES, Controller, create_as, ftj_doc, ftj_path, raw, wait_for


def make_certs(d: Path) -> tuple[Path, Path, Path]:
    """A CA and a serving certificate for 127.0.0.1 (the API server requires a subjectAltName)."""
    def ssl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
        "-subj", "/CN=finetune-webhook-test-ca")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "tls.key", "-out", "tls.csr", "-subj", "/CN=127.0.0.1")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    ssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", "tls.crt",
        "-days", "1", "-extfile", "san.ext")
    return d / "ca.crt", d / "tls.crt", d / "tls.key"


def webhook_configuration(name: str, port: int, ca: bytes, ns: str) -> dict:
    """As the chart registers it, but by URL (no Service: the controller runs here) and for one namespace."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{
            "name": f"validate.{names.PLURAL}.{names.GROUP}", "admissionReviewVersions": ["v1"],
            "sideEffects": "None", "failurePolicy": "Fail", "timeoutSeconds": 5,
            "clientConfig": {"url": f"https://127.0.0.1:{port}{webhook.PATH}",
                             "caBundle": base64.b64encode(ca).decode()},
            "rules": [{"apiGroups": [names.GROUP], "apiVersions": [names.VERSION], "resources": [names.PLURAL],
                       "operations": ["CREATE", "UPDATE"], "scope": "Namespaced"}],
            "namespaceSelector": {"matchLabels": {"finetune-webhook-test": ns}},
        }],
    }


@pytest.fixture
def served(k8s_cluster, controller_kubeconfig, k8s_namespace, tmp_path):
    """The controller serving the webhook, registered for the test namespace only; (controller, port)."""
    ns = k8s_namespace
    ca, cert, key = make_certs(tmp_path)
    k8s_cluster.request("POST", "/apis/rbac.authorization.k8s.io/v1/clusterroles", rbac.webhook_cluster_role())
    k8s_cluster.request("POST", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": rbac.WEBHOOK_CLUSTER_ROLE},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": rbac.WEBHOOK_CLUSTER_ROLE},
        "subjects": [{"kind": "ServiceAccount", "name": "finetune-controller", "namespace": "finetune-system"}]})
    port = free_port()
    ctl = Controller(controller_kubeconfig, ns, tmp_path, f"--webhook-cert={cert}", f"--webhook-key={key}",
                     f"--webhook-port={port}", "--webhook-host=127.0.0.1").start()
    name = f"finetune-{ns}"
    k8s_cluster.request("PATCH", f"/api/v1/namespaces/{ns}", {"metadata": {"labels": {"finetune-webhook-test": ns}}},
                        content_type="application/merge-patch+json")
    code, body = k8s_cluster.request("POST", "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations",
                                     webhook_configuration(name, port, ca.read_bytes(), ns))
    assert code == 201, body
    probe = json.dumps(ftj_doc("probe", image="evil.example/x:1")).encode()
    wait_for(lambda: "denied the request" in raw(k8s_cluster, "POST", ftj_path(ns) + "?dryRun=All", probe)[1], 20,
             what="the API server calling the webhook")
    try:
        yield ctl, port
    finally:
        k8s_cluster.request("DELETE", f"/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/{name}")
        ctl.stop()


def _bob_reads_his_secret(k8s_cluster, ns: str) -> str:
    for secret in ("bob-hf", "team-b-db"):
        k8s_cluster.request("POST", f"/api/v1/namespaces/{ns}/secrets", {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": secret}, "stringData": {"token": "x"}})
    k8s_cluster.request("POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "bob"},
        "rules": [{"apiGroups": [names.GROUP], "resources": [names.PLURAL],  # an editor who may also edit
                   "verbs": ["create", "get", "list", "watch", "delete", "patch", "update"]},
                  {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["bob-hf"], "verbs": ["get"]}]})
    k8s_cluster.request("POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "bob"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "bob"},
        "subjects": [{"kind": "User", "name": "bob", "apiGroup": "rbac.authorization.k8s.io"}]})
    return k8s_cluster.user_token("bob")


def kubectl_apply(k8s_cluster, user: str, ns: str, doc: dict):
    return k8s_cluster.kubectl_run("apply", "-n", ns, "-f", "-", user=user, input=yaml.safe_dump(doc), check=False)


def test_kubectl_apply_is_refused_at_once_with_every_problem(served, k8s_cluster, cluster_api, editor):
    ns = cluster_api.ns
    bob = _bob_reads_his_secret(k8s_cluster, ns)
    bad = ftj_doc("bad", output={"destination": "hf://org/model"},  # runner rule: checkpoints required
                  dataset={"source": "s3://data/train.jsonl", "template": {"text": "{t}", "prompt": "{p}",
                                                                           "completion": "{c}"}},
                  image="evil.example/miner:1",  # admin policy
                  hfTokenSecretRef={"name": "team-b-db"})  # a Secret alice may not read
    r = kubectl_apply(k8s_cluster, "alice", ns, bad)
    assert r.returncode != 0 and "denied the request" in r.stderr, r.stderr
    for fragment in ("output.checkpoints", "dataset.template", "spec.image", "policy.imagePrefixes",
                     "spec.hfTokenSecretRef: alice may not get Secret 'team-b-db'"):
        assert fragment in r.stderr, (fragment, r.stderr)
    assert raw(k8s_cluster, "GET", ftj_path(ns, "bad"), None)[0] == 404  # never became InvalidSpec later
    # alice may not borrow bob's Secret either; bob may use it, and his job runs
    r = kubectl_apply(k8s_cluster, "alice", ns, ftj_doc("alice-job", hfTokenSecretRef={"name": "bob-hf"}))
    assert r.returncode != 0 and "alice may not get Secret 'bob-hf'" in r.stderr, r.stderr
    for i, ref in enumerate(({"hfTokenSecretRef": {"name": "bob-hf"}}, {"s3SecretRef": {"name": "team-b-db"}},
                             {"gcsSecretRef": {"name": "team-b-db"}}, {"imagePullSecrets": ["team-b-db"]})):
        r = kubectl_apply(k8s_cluster, "bob", ns, ftj_doc(f"bob-{i}", **ref))
        assert (r.returncode == 0) is (i == 0), r.stderr
    cluster_api.wait_phase("bob-0", "Pending")
    assert wait_for(lambda: cluster_api.jobs("bob-0"), 20, what="bob's Job")
    # UPDATE (1.20 enforces no immutability): the run policy may change, a Secret bob may not read may not come
    # in - not into a running job, nor into one created suspended to get past the check at creation
    def patch(name: str, spec: dict) -> tuple[int, str]:
        return raw(k8s_cluster, "PATCH", ftj_path(ns, name), json.dumps({"spec": spec}).encode(), token=bob,
                   content_type="application/merge-patch+json")

    assert patch("bob-0", {"suspend": True})[0] == 200
    code, body = patch("bob-0", {"s3SecretRef": {"name": "team-b-db"}})
    assert code == 403 and "bob may not get Secret 'team-b-db'" in body, body
    assert create_as(k8s_cluster, bob, ns, ftj_doc("later", suspend=True))[0] == 201
    code, body = patch("later", {"hfTokenSecretRef": {"name": "team-b-db"}, "suspend": False})
    assert code == 403, body
    assert "hfTokenSecretRef" not in cluster_api.ftj("later")["spec"]


def test_webhook_latency_on_create(served, k8s_cluster, cluster_api, editor, k8s_namespace):
    """The time the webhook adds to a create (raw API calls, alice's token), and to `kubectl apply`."""
    ns = cluster_api.ns
    plain_ns = f"{ns}-nohook"
    k8s_cluster.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                       "metadata": {"name": plain_ns, "labels": {"ftc-test": "1"}}})
    k8s_cluster.request("POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{plain_ns}/roles", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "finetune-editor"},
        "rules": EDITOR_RULES})
    k8s_cluster.request("POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{plain_ns}/rolebindings", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "alice"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "finetune-editor"},
        "subjects": [{"kind": "User", "name": "alice", "apiGroup": "rbac.authorization.k8s.io"}]})
    wait_for(lambda: raw(k8s_cluster, "GET", ftj_path(plain_ns), None, token=editor)[0] == 200, 10, what="role")
    try:
        def create_seconds(target_ns: str, n: int = 15) -> float:
            times = []
            for i in range(n):
                doc = json.dumps(ftj_doc(f"lat-{i}", suspend=True)).encode()
                t = time.monotonic()
                code, body = raw(k8s_cluster, "POST", ftj_path(target_ns) + "?dryRun=All", doc, token=editor)
                times.append(time.monotonic() - t)
                assert code == 201, body[:300]
            return statistics.median(times)

        create_seconds(ns, 3), create_seconds(plain_ns, 3)  # warm both paths
        with_hook, without = create_seconds(ns), create_seconds(plain_ns)

        def apply_seconds(target_ns: str, n: int = 5) -> float:
            times = []
            for i in range(n):
                t = time.monotonic()
                r = kubectl_apply(k8s_cluster, "alice", target_ns, ftj_doc(f"applied-{i}", suspend=True))
                times.append(time.monotonic() - t)
                assert r.returncode == 0, r.stderr
            return statistics.median(times)

        apply_with, apply_without = apply_seconds(ns), apply_seconds(plain_ns)
        print(f"\ncreate (median of 15, dry run): {with_hook * 1000:.1f} ms with the webhook, {without * 1000:.1f} ms "
              f"without (+{(with_hook - without) * 1000:.1f} ms); kubectl apply (median of 5): {apply_with:.2f} s with, "
              f"{apply_without:.2f} s without")
        assert with_hook - without < 0.5
    finally:
        k8s_cluster.request("DELETE", f"/api/v1/namespaces/{plain_ns}")
