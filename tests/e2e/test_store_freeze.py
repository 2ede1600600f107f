"""A store that freezes mid-download does not hold a runner pod: a real moto S3 server in its own process, stopped
with SIGSTOP as the runner pod asks it for the model's weights. The pod exits 75 naming the endpoint, the
controller starts attempt 2, the store thaws (SIGCONT), and the job succeeds. The job tightens the cluster's
store limits with spec.storeTimeouts (the chart's runner.storeTimeouts is the ceiling), so this runs in seconds;
the defaults' freeze-to-exit times are measured in tests/runner/store/test_timeouts.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone

import pytest

from runner.api import status as st
from tests.cluster.cluster import free_port, wait_for
from tests.conftest import QA_ROWS, write_jsonl
from tests.e2e.conftest import BUCKET, S3, InterceptingProxy, apply, ftj, status, wait_status

WEIGHTS = b"model.safetensors"


@pytest.fixture
def frozen_store(tiny_llama, tmp_path):
    """(S3 through the proxy, moto process, proxy, freeze times): moto in a process of its own (SIGSTOP-able), with
    the tiny model and the data, behind a proxy that freezes it when the weights are asked for."""
    port = free_port()
    moto = subprocess.Popen([sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1", "-p",
                             str(port)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def answers():
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}", timeout=2).close()
            return True
        except OSError as e:
            return getattr(e, "code", None) is not None
    wait_for(answers, timeout=60, interval=0.1, what="the moto server to start")
    frozen_at: list[float] = []

    def freeze():
        os.kill(moto.pid, signal.SIGSTOP)
        frozen_at.append(time.time())
    direct = S3(f"http://127.0.0.1:{port}", "AKIAFROZENSTORE00001", "frozen-store-secret")
    direct.model = direct.upload_dir(tiny_llama, "models/tiny-llama")
    direct.client.upload_file(str(write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)), BUCKET, "data/qa.jsonl")
    direct.data = f"s3://{BUCKET}/data/qa.jsonl"
    proxy = InterceptingProxy(port, WEIGHTS, freeze)  # the store frozen as the runner asks for the weights
    through = S3.__new__(S3)
    through.endpoint, through.client, through.model, through.data = proxy.url, direct.client, direct.model, direct.data
    through.env = {**direct.env, "AWS_ENDPOINT_URL_S3": proxy.url}
    yield through, moto, proxy, frozen_at
    proxy.close()
    os.kill(moto.pid, signal.SIGCONT)
    moto.kill()
    moto.wait(timeout=30)


def _runner_pods(node, ns: str, job: str) -> list[dict]:
    pods = json.loads(node.kubectl("get", "pods", "-n", ns, "-o", "json").stdout)["items"]
    return sorted((p for p in pods if p["metadata"]["name"].startswith(f"{job}-")),
                  key=lambda p: p["metadata"]["creationTimestamp"])


def _terminated(pod: dict) -> dict | None:
    for c in (pod.get("status") or {}).get("containerStatuses") or []:
        if c.get("state", {}).get("terminated"):
            return c["state"]["terminated"]
    return None


def test_a_store_frozen_mid_download_ends_the_attempt_and_the_next_one_succeeds(node, namespace, frozen_store):
    store, moto, proxy, frozen_at = frozen_store
    node.kubectl("create", "secret", "generic", "frozen-s3", "-n", namespace,
                 *[f"--from-literal={k}={v}" for k, v in store.env.items()])
    doc = ftj("frozen", store, s3SecretRef={"name": "frozen-s3"}, storeTimeouts={"read": 5, "stall": 15})
    apply(node, namespace, doc)

    def first_exit():
        pods = _runner_pods(node, namespace, "frozen")
        return _terminated(pods[0]) if pods else None
    term = wait_for(first_exit, timeout=300, interval=0.5, what="attempt 1 to end")
    assert frozen_at, "the store was never frozen: the runner did not ask for the weights"
    finished = datetime.strptime(term["finishedAt"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    print(f"\nfreeze-to-exit of the runner pod (download, read=5, stall=15): {finished - frozen_at[0]:.0f} s")
    assert term["exitCode"] == 75, term
    message = json.loads(term["message"])["message"]
    assert proxy.url in message and "stall=15" in message, message
    os.kill(moto.pid, signal.SIGCONT)  # the store thaws; the controller's next attempt finds it answering

    s = wait_status(node, namespace, "frozen", lambda s: s.get("phase") in (st.SUCCEEDED, st.FAILED), timeout=420,
                    what="the job to end")
    assert s["phase"] == st.SUCCEEDED and s["attempt"] == 2, s
    pods = _runner_pods(node, namespace, "frozen")
    assert len(pods) == 2 and _terminated(pods[1])["exitCode"] == 0
    assert store.keys(doc["spec"]["output"]["destination"].split("/", 3)[3] + "/finetune-manifest.json")
