"""Benchmark: apply many FineTuneJobs at once; how long until every Job exists and every status is Pending?

    .venv/bin/python -m bench controller --jobs 1000    # or: python -m bench.controller.bench --jobs 1000

Starts the project's test cluster (tests/cluster: etcd + kube-apiserver + kube-controller-manager 1.20,
built and cached by tests/cluster/build.sh) unless --kubeconfig names a running one, starts the controller
as a subprocess (`python -m controller --namespace <ns>`), creates the FineTuneJobs from a thread pool, and
polls. Prints one JSON object: jobs/s, seconds to all Jobs, seconds to all Pending, the controller's peak
RSS and CPU seconds. Not a test: nothing here asserts; compare the figures with the targets by eye
(1,000 jobs in under 60 s, controller RSS under 200 MB on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from controller import naming  # noqa: E402
from runner.api import names, status as contract  # noqa: E402
from controller.kube import Kube, load_configuration, ns_path  # noqa: E402


def ftj(name: str) -> dict:
    return {"apiVersion": names.API_VERSION, "kind": names.KIND, "metadata": {"name": name},
            "spec": {"model": {"source": "hf://org/base-model"}, "dataset": {"source": "s3://data/train.jsonl"},
                     "output": {"destination": "s3://models/" + name}, "resources": {"gpus": 1, "memory": "64Gi"}}}


class Sampler(threading.Thread):
    """Peak RSS and CPU time of a process, sampled every 0.2 s."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak_rss = 0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.2)

    def cpu_seconds(self) -> float:
        t = self.proc.cpu_times()
        return t.user + t.system


def count(kube: Kube, path: str, label: str | None, pred=None) -> int:
    q = [("labelSelector", label)] if label else []
    items = kube.request("GET", path, query=q).get("items", [])
    return sum(1 for i in items if pred is None or pred(i))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--kubeconfig", help="use this running cluster instead of starting the test cluster")
    p.add_argument("--workers", type=int, default=None, help="controller --workers (default: its own)")
    p.add_argument("--clients", type=int, default=8, help="threads creating FineTuneJobs")
    p.add_argument("--timeout", type=float, default=300)
    args = p.parse_args()

    cluster = None
    if args.kubeconfig:
        kubeconfig = args.kubeconfig
    else:
        from tests.cluster.cluster import TestCluster

        cluster = TestCluster(crds=[ROOT / "manifests" / "crds" / f"{names.CRD_NAME}.yaml"]).start()
        kubeconfig = cluster.kubeconfig
    kube = Kube.from_config(load_configuration(kubeconfig, pool_size=args.clients + 2))
    ns = f"bench-{uuid.uuid4().hex[:6]}"
    kube.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    env = {**os.environ, "KUBECONFIG": kubeconfig, "PYTHONPATH": str(ROOT)}
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"controller-{ns}.log", "w")
    ctl = subprocess.Popen([sys.executable, "-m", "controller", "--namespace", ns, "--http-port", "0",
                            *(["--workers", str(args.workers)] if args.workers else [])], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    sampler = Sampler(ctl.pid)
    sampler.start()
    try:
        time.sleep(3)  # controller start-up (imports, first list)
        idle_rss = psutil.Process(ctl.pid).memory_info().rss
        cpu0 = sampler.cpu_seconds()
        path = ns_path(names.API_VERSION, ns, names.PLURAL)
        t0 = time.monotonic()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(lambda i: kube.create(path, ftj(f"job-{i:05d}")), range(args.jobs)))
        t_applied = time.monotonic() - t0
        t_jobs = t_pending = None
        deadline = t0 + args.timeout
        while time.monotonic() < deadline and (t_jobs is None or t_pending is None):
            if t_jobs is None and count(kube, ns_path("batch/v1", ns, "jobs"), naming.LABEL_JOB_UID) >= args.jobs:
                t_jobs = time.monotonic() - t0
            if t_pending is None and count(kube, path, None, lambda o: (o.get("status") or {}).get("phase")
                                           == contract.PENDING) >= args.jobs:
                t_pending = time.monotonic() - t0
            time.sleep(0.5)
        result = {
            "jobs": args.jobs,
            "seconds_to_apply": round(t_applied, 1),
            "seconds_to_all_jobs": round(t_jobs, 1) if t_jobs else None,
            "seconds_to_all_pending": round(t_pending, 1) if t_pending else None,
            "jobs_per_second": round(args.jobs / t_pending, 1) if t_pending else None,
            "controller_idle_rss_mb": round(idle_rss / 2**20, 1),
            "controller_peak_rss_mb": round(sampler.peak_rss / 2**20, 1),
            "controller_cpu_seconds": round(sampler.cpu_seconds() - cpu0, 1),
            "cpus": os.cpu_count(),
        }
        print(json.dumps(result, indent=2))
        return 0 if t_pending else 1
    finally:
        sampler.stop.set()
        ctl.terminate()
        try:
            ctl.wait(10)
        except subprocess.TimeoutExpired:
            ctl.kill()
        try:
            kube.request("DELETE", f"/api/v1/namespaces/{ns}")
        except Exception:
            pass
        if cluster is not None:
            cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
