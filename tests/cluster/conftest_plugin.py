"""pytest fixtures for the real test cluster (tests/cluster/cluster.py).

Enable with ``pytest_plugins = ["tests.cluster.conftest_plugin"]`` in tests/conftest.py
(or ``-p tests.cluster.conftest_plugin``).

Fixtures:
    k8s_binaries    session   ClusterBinaries (runs tests/cluster/build.sh once; cached)
    k8s_cluster     session   a started TestCluster with manifests/crds/*.yaml applied
                              and token users alice, bob (group "developers"), carol
    k8s_client      function  admin kubernetes.client.ApiClient
    fake_kubelet    function  FakeKubelet bound to the admin client
    k8s_namespace   function  a fresh namespace name, deleted after the test

Environment:
    FTC_KEEP_CLUSTER_DIR=1   keep the cluster's temp dir (logs, etcd data) after the session
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import pytest

from tests.cluster.cluster import ClusterBinaries, TestCluster, TokenUser, ensure_binaries
from tests.cluster.kubelet import FakeKubelet

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = REPO_ROOT / "manifests" / "crds"
TEST_CRD_DIR = Path(__file__).resolve().parent / "testdata"

# Non-admin token users present in the session cluster (token files are read at startup).
# None has any RBAC grant: tests bind the Roles they need.
TEST_USERS = (
    TokenUser(name="alice", groups=()),
    TokenUser(name="bob", groups=("developers",)),
    TokenUser(name="carol", groups=()),
)


def project_crd_files() -> list[Path]:
    if not CRD_DIR.is_dir():
        return []
    return sorted(p for p in CRD_DIR.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "k8s: needs the real test cluster (etcd + kube-apiserver 1.20)")


@pytest.fixture(scope="session")
def k8s_binaries() -> ClusterBinaries:
    return ensure_binaries()


@pytest.fixture(scope="session")
def k8s_cluster(k8s_binaries: ClusterBinaries):
    crds = project_crd_files() + sorted(TEST_CRD_DIR.glob("*.yaml"))
    cluster = TestCluster(
        crds=crds,
        users=TEST_USERS,
        binaries=k8s_binaries,
        keep_workdir=os.environ.get("FTC_KEEP_CLUSTER_DIR") == "1",
    )
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def k8s_client(k8s_cluster: TestCluster):
    api = k8s_cluster.api_client()
    try:
        yield api
    finally:
        api.close()


@pytest.fixture
def fake_kubelet(k8s_cluster: TestCluster):
    api = k8s_cluster.api_client()
    try:
        yield FakeKubelet(api)
    finally:
        api.close()


@pytest.fixture
def k8s_namespace(k8s_cluster: TestCluster, request: pytest.FixtureRequest):
    """A unique namespace (name returned); deleted after the test, without waiting."""
    from kubernetes import client

    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-") or "t"
    name = f"{base}-{uuid.uuid4().hex[:6]}"
    api = k8s_cluster.api_client()
    core = client.CoreV1Api(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={"ftc-test": "1"})))
    try:
        yield name
    finally:
        try:
            # No kubelet confirms deletions: Pods bound to a node would stay Terminating
            # and hold the namespace; remove them at once, as a kubelet eventually would.
            core.delete_collection_namespaced_pod(name, grace_period_seconds=0)
            core.delete_namespace(name, propagation_policy="Background")
        except Exception:  # the cluster may be gone already; never mask the test's outcome
            pass
        finally:
            api.close()
