"""The webhook with the controller's own certificate (controller/certs.py) and the Secret attribution it signs
(controller/attribution.py), on the real API server: registered as the chart does it with webhook.url (Endpoints
cannot hold a loopback address, so not through a Service here) and no caBundle, which the controller writes; and
the controller refusing a job whose Secrets the webhook did not check."""
from __future__ import annotations

import base64
import datetime as dt
import json
import ssl

import pytest
from cryptography import x509

from controller import attribution, certs, rbac, webhook
from controller.kube import Kube
from runner.api import names
from tests.cluster.cluster import free_port
from tests.controller.conftest import Controller, create_as, ftj_doc, ftj_path, raw, wait_for

SERVICE, STATE = "ftc-webhook", "ftc-webhook-state"


def _registration(kind: str, name: str, ns: str, port: int) -> dict:
    """As the chart registers it with webhook.url (no caBundle), for the test namespace only."""
    path = webhook.ATTRIBUTE_PATH if kind == "Mutating" else webhook.PATH
    hook = {"name": f"{kind.lower()}.{names.PLURAL}.{names.GROUP}", "admissionReviewVersions": ["v1"],
            "sideEffects": "None", "failurePolicy": "Fail", "timeoutSeconds": 5,
            "clientConfig": {"url": f"https://127.0.0.1:{port}{path}"},
            "rules": [{"apiGroups": [names.GROUP], "apiVersions": [names.VERSION], "resources": [names.PLURAL],
                       "operations": ["CREATE", "UPDATE"], "scope": "Namespaced"}],
            "namespaceSelector": {"matchLabels": {"finetune-webhook-test": ns}}}
    if kind == "Mutating":
        hook["reinvocationPolicy"] = "Never"
    return {"apiVersion": "admissionregistration.k8s.io/v1", "kind": f"{kind}WebhookConfiguration",
            "metadata": {"name": name}, "webhooks": [hook]}


@pytest.fixture
def own_cert(k8s_cluster, controller_kubeconfig, k8s_namespace, tmp_path):
    """The controller serving both halves with a certificate it made, the registrations' caBundle written by it;
    its ServiceAccount holds exactly the chart's rules for that. (controller, registration name)"""
    ns, name, port = k8s_namespace, f"finetune-{k8s_namespace}", free_port()
    rb = "/apis/rbac.authorization.k8s.io/v1"
    k8s_cluster.request("POST", f"{rb}/clusterroles", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name},
        "rules": rbac.WEBHOOK_RULES + rbac.registration_rules(name)})
    k8s_cluster.request("POST", f"{rb}/namespaces/{ns}/roles", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "self"},
        "rules": rbac.self_rules(None, STATE)})
    subject = [{"kind": "ServiceAccount", "name": "finetune-controller", "namespace": "finetune-system"}]
    k8s_cluster.request("POST", f"{rb}/clusterrolebindings", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name}, "subjects": subject})
    k8s_cluster.request("POST", f"{rb}/namespaces/{ns}/rolebindings", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "self"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "self"}, "subjects": subject})
    k8s_cluster.request("PATCH", f"/api/v1/namespaces/{ns}", {"metadata": {"labels": {"finetune-webhook-test": ns}}},
                        content_type="application/merge-patch+json")
    for kind in ("Validating", "Mutating"):
        code, body = k8s_cluster.request(
            "POST", f"/apis/admissionregistration.k8s.io/v1/{kind.lower()}webhookconfigurations",
            _registration(kind, name, ns, port))
        assert code == 201, body
    ctl = Controller(controller_kubeconfig, ns, tmp_path, f"--controller-namespace={ns}", f"--state-secret={STATE}",
                     f"--webhook-service={SERVICE}", "--webhook-host-name=127.0.0.1",
                     f"--webhook-registration=validating/{name}",
                     f"--webhook-registration=mutating/{name}", f"--webhook-port={port}",
                     "--webhook-host=127.0.0.1").start()
    probe = json.dumps(ftj_doc("probe", image="evil.example/x:1")).encode()
    try:
        wait_for(lambda: "denied the request" in raw(k8s_cluster, "POST", ftj_path(ns) + "?dryRun=All", probe)[1],
                 20, what="the API server calling the webhook")
    except AssertionError as e:
        ctl.stop()
        raise AssertionError(f"{e}\n{raw(k8s_cluster, 'POST', ftj_path(ns) + '?dryRun=All', probe)}\n{ctl.log()}")
    try:
        yield ctl, name
    finally:
        for kind in ("validating", "mutating"):
            k8s_cluster.request("DELETE", f"/apis/admissionregistration.k8s.io/v1/{kind}webhookconfigurations/{name}")
        for path in (f"{rb}/clusterroles/{name}", f"{rb}/clusterrolebindings/{name}"):
            k8s_cluster.request("DELETE", path)
        ctl.stop()


def test_the_controller_makes_its_certificate_writes_the_ca_and_the_api_server_trusts_it(
        own_cert, k8s_cluster, kube, k8s_namespace):
    ctl, name = own_cert
    ns = k8s_namespace
    secret = kube.request("GET", f"/api/v1/namespaces/{ns}/secrets/{STATE}")
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    assert set(data) == {"ca.crt", "ca.key", "tls.crt", "tls.key", certs.KEY_ATTRIBUTION}
    served = x509.load_pem_x509_certificate(data["tls.crt"])
    sans = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert f"{SERVICE}.{ns}.svc" in sans.get_values_for_type(x509.DNSName)
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    for kind in ("validating", "mutating"):
        reg = kube.request("GET", f"/apis/admissionregistration.k8s.io/v1/{kind}webhookconfigurations/{name}")
        assert base64.b64decode(reg["webhooks"][0]["clientConfig"]["caBundle"]) == data["ca.crt"]
    # owned by the registration: uninstalling the chart (deleting it) removes the Secret
    [owner] = secret["metadata"]["ownerReferences"]
    assert owner["name"] == name and owner["kind"].endswith("WebhookConfiguration")
    # the certificate served is that one (what the API server checked against the caBundle)
    pem = ssl.get_server_certificate(("127.0.0.1", int(ctl.extra[-2].split("=")[1])))
    assert x509.load_pem_x509_certificate(pem.encode()).serial_number == served.serial_number
    # and the key is not in the log
    assert data["tls.key"].decode().splitlines()[1] not in ctl.log()


def test_a_job_the_webhook_did_not_check_gets_no_secret(own_cert, k8s_cluster, cluster_api, editor, kube):
    """Through the webhook: alice (FineTuneJobs only) is refused a Secret she cannot read, at apply, the message
    naming it; bob's job naming his own Secret is signed and runs. Bypassing the webhook (the namespace taken out of
    its selector, as an admin may do, or a webhook failing open): the same job, or one with bob's annotation copied,
    fails InvalidSpec naming the Secret, and no Job is created."""
    ns = cluster_api.ns
    for secret in ("team-db", "bob-hf"):
        k8s_cluster.request("POST", f"/api/v1/namespaces/{ns}/secrets", {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": secret}, "stringData": {"k": "v"}})
    code, body = create_as(k8s_cluster, editor, ns, ftj_doc("alice", s3SecretRef={"name": "team-db"}))
    assert code == 403 and "spec.s3SecretRef: alice may not get Secret 'team-db'" in body, body
    # an admin (who may read every Secret) through the webhook: signed, and the controller runs it
    assert kube.create(ftj_path(ns), ftj_doc("checked", s3SecretRef={"name": "team-db"}))
    signed = cluster_api.ftj("checked")["metadata"]["annotations"][attribution.ANNOTATION]
    assert wait_for(lambda: cluster_api.jobs("checked"), 20, what="the checked job's Job")
    # a teammate's suspend keeps the signature (bound to the object now)
    kube.merge_patch(ftj_path(ns, "checked"), {"spec": {"suspend": True}})
    assert attribution.verified(_key(kube, ns), cluster_api.ftj("checked")["metadata"],
                                cluster_api.ftj("checked")["spec"])

    # bypass: the namespace out of the webhook's selector
    k8s_cluster.request("PATCH", f"/api/v1/namespaces/{ns}", {"metadata": {"labels": {"finetune-webhook-test": None}}},
                        content_type="application/merge-patch+json")
    wait_for(lambda: create_as(k8s_cluster, editor, ns, ftj_doc("unchecked", s3SecretRef={"name": "team-db"}))[0]
             == 201, 20, what="the webhook bypassed")
    forged = ftj_doc("forged", imagePullSecrets=["team-db"])
    forged["metadata"]["annotations"] = {attribution.ANNOTATION: signed}
    assert create_as(k8s_cluster, editor, ns, forged)[0] == 201
    for job in ("unchecked", "forged"):
        s = cluster_api.wait_phase(job, "Failed", reason="InvalidSpec")
        assert "Secret 'team-db' was not checked at admission" in s["message"], s["message"]
        assert not cluster_api.jobs(job)


def _key(kube, ns) -> bytes:
    return base64.b64decode(kube.request("GET", f"/api/v1/namespaces/{ns}/secrets/{STATE}")["data"][
        certs.KEY_ATTRIBUTION])


def test_rotation_before_expiry_keeps_the_ca_trusted_and_two_keepers_agree(k8s_cluster, k8s_namespace, kube):
    """Keeper on the real API server: created once by two replicas; the serving certificate renewed when a third of
    its life is left (same CA, so no caBundle change); a CA near its end replaced with the old one still in the
    bundle; the attribution key never changes."""
    ns = k8s_namespace
    a = certs.Keeper(kube, ns, STATE, SERVICE)
    b = certs.Keeper(kube, ns, STATE, SERVICE)
    a.ensure()
    b.ensure()
    assert a.state == b.state
    first = a.state
    now = dt.datetime.now(dt.timezone.utc)
    assert not a.ensure(now=now + dt.timedelta(days=200)) and a.state == first  # 165 days left of 365: kept
    a.ensure(now=now + dt.timedelta(days=250))  # 115 < 365/3 days left: renewed
    assert a.state.tls_crt != first.tls_crt and a.state.ca_crt == first.ca_crt
    assert a.state.attribution_key == first.attribution_key
    renewed = x509.load_pem_x509_certificate(a.state.tls_crt)
    ca = x509.load_pem_x509_certificate(first.ca_crt)
    renewed.verify_directly_issued_by(ca)
    b.ensure()
    assert b.state == a.state  # read back, not made again
    a.ensure(now=now + dt.timedelta(days=2500))  # the CA has less than a third left
    cas = x509.load_pem_x509_certificates(a.state.ca_crt)
    assert len(cas) == 2 and cas[1].serial_number == ca.serial_number  # the old CA still trusted meanwhile
    x509.load_pem_x509_certificate(a.state.tls_crt).verify_directly_issued_by(cas[0])
    assert a.state.attribution_key == first.attribution_key
