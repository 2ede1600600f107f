import pytest
from tests.controller.conftest import Controller
from tests.controller.test_jobset import FakeJobSetController, ftj_doc, no_jobset_crd  # noqa
from tests.controller.test_jobset import _install_crd, _jobset_crd_removed_after  # noqa


@pytest.mark.parametrize("i", range(6))
def test_later(i, no_jobset_crd, _jobset_crd_removed_after, controller_kubeconfig, k8s_namespace, tmp_path, cluster_api, fake_kubelet, kube, k8s_cluster):
    c = Controller(controller_kubeconfig, k8s_namespace, tmp_path, "--verbose").start()
    try:
        _install_crd(k8s_cluster)
        cluster_api.create_ftj(ftj_doc("later", resources={"nodes": 2}))
        fake = FakeJobSetController(kube, cluster_api.ns)
        for p in fake.start(fake.wait("later-1"), fake_kubelet):
            fake_kubelet.running(p)
        try:
            cluster_api.wait_phase("later", "Running")
        finally:
            import re
            print("\n".join(l for l in c.log_path.read_text().splitlines() if re.search("jobset|JobSet|later|Unresolved|resource", l))[-8000:])
    finally:
        c.stop()
