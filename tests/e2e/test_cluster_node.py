"""The real node's own promise (tests/cluster/node.py): started and stopped, it leaves the machine as it found it.
This file sorts before the tests that start the session's node: one kubelet per machine."""
from __future__ import annotations

import json
from pathlib import Path

from tests.cluster.cluster import wait_for
from tests.cluster.node import FIXED_PATHS, NODE_NAME, RealNode, leftovers, read_sysctls


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
