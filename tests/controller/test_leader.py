"""Leader election (controller/leader.py) on the real API server's Leases, and two real controller processes of
which only the leader acts: the standby serves /healthz and /readyz, creates nothing, and takes over when the
leader is killed (SIGKILL: no release) within a lease duration and a retry period."""
from __future__ import annotations

import time

import pytest

from controller import rbac
from controller.kube import Kube
from controller.leader import Elector, Timing
from tests.controller.conftest import CONTROLLER_NS, Controller, ftj_doc, wait_for

FAST = Timing(lease_duration=3.0, renew_deadline=2.0, retry_period=0.5)


@pytest.fixture
def lease_name(k8s_cluster, k8s_namespace) -> str:
    """A Lease name of its own per test, and the controller's ServiceAccount allowed exactly the chart's rules on
    it (controller/rbac.py self_rules)."""
    name = f"leader-{k8s_namespace}"[:63]
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": name, "namespace": CONTROLLER_NS}, "rules": rbac.self_rules(name, None)}
    k8s_cluster.request("POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{CONTROLLER_NS}/roles", role)
    k8s_cluster.request("POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{CONTROLLER_NS}/rolebindings", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": "finetune-controller", "namespace": CONTROLLER_NS}]})
    yield name
    for kind in ("roles", "rolebindings"):
        k8s_cluster.request("DELETE", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{CONTROLLER_NS}/{kind}/{name}")
    k8s_cluster.request("DELETE", f"/apis/coordination.k8s.io/v1/namespaces/{CONTROLLER_NS}/leases/{name}")


def test_one_holder_a_dead_one_expires_and_a_released_one_passes_at_once(k8s_cluster, k8s_namespace):
    kube = Kube(k8s_cluster.api_client())
    a = Elector(kube, k8s_namespace, "lease", identity="a", timing=FAST)
    b = Elector(kube, k8s_namespace, "lease", identity="b", timing=FAST)
    assert a.try_acquire_or_renew() and not b.try_acquire_or_renew()
    assert a.try_acquire_or_renew()  # renewing
    lease = kube.request("GET", a.path)["spec"]
    assert lease["holderIdentity"] == "a" and lease["leaseDurationSeconds"] == 3 and lease["leaseTransitions"] == 0
    # a dies (stops renewing): b gets the Lease only once a whole lease duration passed on b's clock
    t0 = time.monotonic()
    b.acquire()
    waited = time.monotonic() - t0
    assert FAST.lease_duration - FAST.retry_period <= waited <= FAST.lease_duration + 3 * FAST.retry_period, waited
    lease = kube.request("GET", a.path)["spec"]
    assert lease["holderIdentity"] == "b" and lease["leaseTransitions"] == 1
    assert not a.try_acquire_or_renew()  # a, back, is a standby
    # a clean stop: the Lease is free at once
    b.release()
    t0 = time.monotonic()
    a.acquire()
    assert time.monotonic() - t0 < FAST.retry_period * 2
    assert kube.request("GET", a.path)["spec"]["holderIdentity"] == "a"


def test_keep_returns_when_the_lease_is_taken(k8s_cluster, k8s_namespace):
    """A holder that finds another identity in the Lease (it was partitioned away too long) stops at once."""
    kube = Kube(k8s_cluster.api_client())
    a = Elector(kube, k8s_namespace, "lease", identity="a", timing=FAST)
    assert a.try_acquire_or_renew()
    lease = kube.request("GET", a.path)
    lease["spec"]["holderIdentity"] = "usurper"
    kube.request("PUT", a.path, lease)
    t0 = time.monotonic()
    a.keep()
    assert time.monotonic() - t0 < FAST.renew_deadline + FAST.retry_period


# Short enough for a quick test, long enough that a loaded machine's late renewal does not pass the Lease on
LEASE_S, RENEW_S, RETRY_S = 6, 4, 1


def _controller(kubeconfig, ns, tmp_path, lease, tag):
    d = tmp_path / tag
    d.mkdir()
    return Controller(kubeconfig, ns, d, "--leader-elect", f"--lease-name={lease}",
                      f"--controller-namespace={CONTROLLER_NS}", f"--lease-duration={LEASE_S}",
                      f"--renew-deadline={RENEW_S}", f"--retry-period={RETRY_S}").start()


def _holder(kube, lease_path: str) -> str | None:
    """The Lease's holder; None before the first controller has created it."""
    from kubernetes.client.exceptions import ApiException

    try:
        return kube.request("GET", lease_path)["spec"].get("holderIdentity")
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def test_two_controllers_one_acts_and_the_standby_takes_over_when_the_leader_is_killed(
        k8s_cluster, controller_kubeconfig, k8s_namespace, cluster_api, lease_name, tmp_path):
    kube = Kube(k8s_cluster.api_client())
    lease_path = f"/apis/coordination.k8s.io/v1/namespaces/{CONTROLLER_NS}/leases/{lease_name}"
    first = _controller(controller_kubeconfig, k8s_namespace, tmp_path, lease_name, "first")
    # a controller starting on a loaded machine creates the Lease when it gets there: waited for, not assumed
    holder = wait_for(lambda: _holder(kube, lease_path), 60, what="a leader")
    second = _controller(controller_kubeconfig, k8s_namespace, tmp_path, lease_name, "second")
    try:
        for c in (first, second):  # both serve health and metrics; the standby is ready too (it serves the webhook)
            assert c.http("/healthz")[0] == 200 and c.http("/readyz")[0] == 200 and c.http("/metrics")[0] == 200
        cluster_api.create_ftj(ftj_doc("before"))
        wait_for(lambda: cluster_api.jobs("before"), 20, what="the leader to create the Job")
        time.sleep(1.0)
        assert "became the leader" in first.log() and "became the leader" not in second.log(), second.log()
        assert kube.request("GET", lease_path)["spec"]["holderIdentity"] == holder

        first.kill()  # SIGKILL: the Lease is not released; the standby waits for it to expire
        t0 = time.monotonic()
        wait_for(lambda: _holder(kube, lease_path) != holder, 30,
                 interval=0.1, what="the standby to take the Lease")
        took = time.monotonic() - t0
        assert took <= LEASE_S + 3 * RETRY_S, took  # it waited for the Lease to expire, then took it
        cluster_api.create_ftj(ftj_doc("after"))
        wait_for(lambda: cluster_api.jobs("after"), 20, what="the new leader to create the Job")
        time.sleep(1.0)
        assert len(cluster_api.jobs("after")) == 1 and len(cluster_api.jobs("before")) == 1  # no duplicate
        assert "became the leader" in second.log()
    finally:
        first.stop()
        second.stop()
