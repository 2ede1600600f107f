"""The real node's own promise (tests/cluster/node.py): started and stopped, it leaves the machine as it found it.
This file sorts before the tests that start the session's node: one kubelet per machine."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.cluster.cluster import wait_for
from tests.cluster.node import FIXED_PATHS, NODE_NAME, RealNode, leftovers, read_sysctls
from tests.conftest import ROOT
from tests.e2e.conftest import README_REGISTRY, readme_install


def test_a_node_starts_runs_a_pod_and_leaves_nothing_behind(dockerd, built_images):
    before_sysctls = read_sysctls()
    before = set(leftovers())
    existed = {p for p in FIXED_PATHS if p.exists()}
    node = RealNode(dockerd=dockerd)
    node.start()
    try:
        nodes = json.loads(node.kubectl("get", "nodes", "-o", "json").stdout)["items"]
        assert [n["metadata"]["name"] for n in nodes] == [NODE_NAME]
        node.kubectl("run", "hello", "--image=finetune-controller:e2e", "--restart=Never",
                     "--overrides", json.dumps({"spec": {"hostNetwork": True}}), "--command", "--",
                     "python", "-c", "print('hello from a pod')")
        def phase():
            p = node.kubectl("get", "pod", "hello", "-o", "jsonpath={.status.phase}").stdout
            return p if p in ("Succeeded", "Failed") else None
        assert wait_for(phase, timeout=120, interval=0.5, what="the pod to finish") == "Succeeded", node.log_tail()
        assert node.kubectl("logs", "hello").stdout.strip() == "hello from a pod"
        pids = set(node.pids.values())
    finally:
        node.stop()
    alive = [p for p in pids if Path(f"/proc/{p}/stat").exists()
             and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"]
    assert not alive, alive
    assert set(leftovers()) <= before, set(leftovers()) - before
    assert read_sysctls() == before_sysctls
    assert {p for p in FIXED_PATHS if p.exists()} <= existed
    containers = dockerd.run("ps", "-aq", "--filter", "name=k8s_").stdout.split()
    assert containers == [], containers
    print(f"\nnode: ready in {node.timings['ready']} s (control plane {node.timings['control plane']:.1f} s), "
          f"stopped in {node.timings['stop']} s")


def test_node_up_leaves_the_crd_to_the_readme_helm_install(k8s_binaries):
    """`python -m tests.cluster.node up` (by hand) then the README's `helm install` as written: the node applies no
    CRD of its own (helm would refuse to take over one it does not own), and the chart installs on its 1.20.2 API
    server without any flag turning validation off. Its own Docker daemon (FTC_DOCKER_HOME): the session's is busy."""
    home = Path(tempfile.mkdtemp(prefix="ftc-up-"))  # short: the daemon's socket path is limited to 108 bytes
    env = {**os.environ, "FTC_DOCKER_HOME": str(home)}
    up = subprocess.Popen([sys.executable, "-m", "tests.cluster.node", "up"], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    out: list[str] = []
    try:
        t0 = time.monotonic()
        while not any(line.startswith("KUBECONFIG=") for line in out):
            line = up.stdout.readline()
            assert line or up.poll() is None, "".join(out)
            out.append(line)
            assert time.monotonic() - t0 < 180, "".join(out)
        kubeconfig = next(line for line in out if line.startswith("KUBECONFIG=")).strip().split("=", 1)[1]
        kenv = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")} | {
            "KUBECONFIG": kubeconfig, "HELM_CACHE_HOME": str(home / "helm"), "HELM_CONFIG_HOME": str(home / "helm"),
            "HELM_DATA_HOME": str(home / "helm")}
        tools = {"helm": k8s_binaries.helm, "kubectl": k8s_binaries.kubectl}

        def run(argv):
            return subprocess.run([tools[argv[0]], *argv[1:]], env=kenv, cwd=ROOT, capture_output=True, text=True,
                                  timeout=120, stdin=subprocess.DEVNULL)
        crds = run(["kubectl", "get", "crd", "-o", "name"])
        assert crds.returncode == 0 and "finetunejobs" not in crds.stdout, crds
        install = readme_install()[0]  # as written (the images need not exist: the release, not the pod, matters)
        assert install[:2] == ["helm", "install"] and any(a.startswith(f"image.repository={README_REGISTRY}")
                                                          for a in install), install
        r = run(install)
        assert r.returncode == 0, r.stderr
        crd = json.loads(run(["kubectl", "get", "crd", "finetunejobs.finetune.dev", "-o", "json"]).stdout)
        assert crd["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"  # the release's own
        spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        assert "x-kubernetes-validations" not in spec  # left out before 1.25 (this server would refuse them)
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            rest, _ = up.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            up.kill()
            rest, _ = up.communicate()
        shutil.rmtree(home, ignore_errors=True)
    assert up.returncode == 0 and "stopped in" in rest, "".join(out) + rest
