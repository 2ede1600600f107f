"""The real runner process (tiny model, CPU) reporting into the real API server under its per-job identity.

FakeKubelet plays the pod's lifecycle; the runner runs here as `python -m runner run
<job file>` where the job file is the one the controller put in the pod (the pod's `finetune.dev/spec`
annotation, which the real pod mounts through the downward API), with the pod's env and the token of the
per-job ServiceAccount. Its termination-log file becomes the pod's termination message.
"""
from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from controller import naming
from runner.api import names
from tests.conftest import job_doc
from tests.controller.conftest import ROOT, Controller, pod_of, wait_for
from tests.runner.store.test_cache import SlowProxy
from tests.runner.store.gcs_server import service_account_key


class RunnerProcess:
    def __init__(self, k8s_cluster, ns: str, ftj: str, pod: dict, workdir: Path):
        annotations = pod["metadata"]["annotations"]
        self.job_file = workdir / f"{pod['metadata']['name']}.yaml"
        self.job_file.write_text(annotations[naming.ANNOTATION_SPEC])  # what the downward API mounts
        self.term = workdir / f"{pod['metadata']['name']}.term"
        token = k8s_cluster.service_account_token(ns, f"{ftj}-runner", create=False)
        env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
        container = pod["spec"]["containers"][0]
        for e in container["env"]:  # the pod's env, as the kubelet would set it
            if "value" in e:
                env[e["name"]] = e["value"]
        env.update(FINETUNE_POD_NAME=pod["metadata"]["name"], FINETUNE_STATUS_INTERVAL="0",
                   KUBECONFIG=k8s_cluster.kubeconfig_for(token=token), PYTHONPATH=str(ROOT),
                   FINETUNE_WORK_DIR=str(workdir / "work"), HOME=str(workdir), TMPDIR=str(workdir))
        if names.ENV_MODEL_CACHE in env:  # the pod's model cache volume: a host directory stands in for the PVC
            env[names.ENV_MODEL_CACHE] = str(workdir / "model-cache")
        for mount in container["volumeMounts"]:  # the pod's Secret volumes, written here as the kubelet would
            volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
            if "secret" in volume:
                here = self.mount_secret(k8s_cluster, ns, volume["secret"],
                                         workdir / f"{pod['metadata']['name']}-{mount['name']}")
                env = {k: str(here) + v[len(mount["mountPath"]):] if v.startswith(mount["mountPath"] + "/") else v
                       for k, v in env.items()}
        assert container["command"][-1] == "/etc/finetune/job.yaml"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runner", "run", str(self.job_file),
             "--termination-log", str(self.term)],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    @staticmethod
    def mount_secret(k8s_cluster, ns: str, source: dict, root: Path) -> Path:
        code, secret = k8s_cluster.request("GET", f"/api/v1/namespaces/{ns}/secrets/{source['secretName']}")
        assert code == 200, secret
        root.mkdir(parents=True, exist_ok=True)
        for item in source["items"]:
            target = root / item["path"]
            target.write_bytes(base64.b64decode(secret["data"][item["key"]]))
            target.chmod(source.get("defaultMode", 0o644))
        return root

    def wait(self, timeout: float = 180) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err


class PhaseRecorder(threading.Thread):
    """Every status.phase the FineTuneJob shows while the runner runs."""

    def __init__(self, cluster_api, name: str):
        super().__init__(daemon=True)
        self.api, self.name, self.seen, self.progress = cluster_api, name, [], []
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            s = self.api.status(self.name)
            if s.get("phase") and (not self.seen or self.seen[-1] != s["phase"]):
                self.seen.append(s["phase"])
            if s.get("progress"):
                self.progress.append(s["progress"])
            time.sleep(0.03)


def test_happy_path_real_runner_reports_progress(controller, cluster_api, fake_kubelet, k8s_cluster, tiny_llama,
                                                 qa_jsonl, tmp_path):
    ns = cluster_api.ns
    out = tmp_path / "model-out"
    doc = job_doc(tiny_llama, qa_jsonl, out, resources={"gpus": 0})
    doc["metadata"]["name"] = "real"
    cluster_api.create_ftj(doc)
    pod = pod_of(fake_kubelet, ns, "real-1")
    fake_kubelet.running(pod)
    cluster_api.wait_phase("real", "Running")
    rec = PhaseRecorder(cluster_api, "real")
    rec.start()
    runner = RunnerProcess(k8s_cluster, ns, "real", pod, tmp_path)
    code, stdout, stderr = runner.wait()
    assert code == 0, stderr[-3000:]
    assert "status sink failed" not in stderr, stderr[-2000:]
    s = cluster_api.status("real")
    # the runner's own reports, through its per-job identity
    assert s["runner"]["pod"] == pod["metadata"]["name"] and s["runner"]["attempt"] == 1
    assert s["progress"]["step"] == 6 and s["progress"]["totalSteps"] == 6
    assert s["progress"]["summary"] == "6/6 (100%)" and isinstance(s["progress"]["loss"], float)
    assert s["lastCheckpoint"]["name"].startswith("checkpoint-") and s["lastCheckpoint"]["step"] == 6
    fake_kubelet.succeeded(pod, message=runner.term.read_text())
    s = cluster_api.wait_phase("real", "Succeeded")
    rec.halt.set()
    rec.join()
    assert s["output"] == str(out) and (out / "config.json").exists()
    order = ["Pending", "Running", "Downloading", "Training", "Merging", "Uploading", "Succeeded"]
    assert "Training" in rec.seen and "Uploading" in rec.seen, rec.seen
    assert [order.index(p) for p in rec.seen] == sorted({order.index(p) for p in rec.seen}), rec.seen  # in order
    steps = [p["step"] for p in rec.progress]
    assert steps == sorted(steps) and steps[-1] == 6
    reasons = cluster_api.event_reasons("real", "Succeeded")
    assert {"Pending", "Running", "Training", "Succeeded"} <= set(reasons), reasons
    out_lines = k8s_cluster.kubectl_run("get", "ftj", "real", "-n", ns).stdout.splitlines()
    assert out_lines[1].split()[1:4] == ["Succeeded", "6/6", "(100%)"], out_lines


# Enough steps that the SIGTERM sent at step 2 lands mid-training (the tiny model trains at ~50 steps/s on CPU).
PREEMPTED_STEPS = 60


def test_retry_resumes_from_the_checkpoint(controller, cluster_api, fake_kubelet, k8s_cluster, tiny_llama,
                                           qa_jsonl, tmp_path):
    """Attempt 1 is preempted (SIGTERM: checkpoint, exit 75); attempt 2 resumes from it and finishes."""
    ns = cluster_api.ns
    out = tmp_path / "model-out"
    doc = job_doc(tiny_llama, qa_jsonl, out, resources={"gpus": 0}, merge={"enabled": False},
                  training={"maxSteps": PREEMPTED_STEPS, "saveSteps": 1000, "loggingSteps": 1})
    doc["metadata"]["name"] = "resume"
    cluster_api.create_ftj(doc)
    pod1 = pod_of(fake_kubelet, ns, "resume-1")
    fake_kubelet.running(pod1)
    first = RunnerProcess(k8s_cluster, ns, "resume", pod1, tmp_path)
    wait_for(lambda: (cluster_api.status("resume").get("progress") or {}).get("step", 0) >= 2, 120, interval=0.02,
             what="attempt 1 training")
    first.proc.send_signal(signal.SIGTERM)  # what the kubelet does on preemption
    code, _, err = first.wait()
    assert code == 75, err[-2000:]
    saved = json.loads(first.term.read_text())
    fake_kubelet.failed(pod1, exit_code=code, message=first.term.read_text())
    s = wait_for(lambda: cluster_api.status("resume").get("attempt") == 2 and cluster_api.status("resume"), 20,
                 what="attempt 2")
    assert s["failedAttempts"] == 1 and saved["retryable"] is True
    checkpoint = cluster_api.status("resume")["lastCheckpoint"]
    assert checkpoint["name"].startswith("checkpoint-")

    pod2 = pod_of(fake_kubelet, ns, "resume-2")
    fake_kubelet.running(pod2)
    second = RunnerProcess(k8s_cluster, ns, "resume", pod2, tmp_path)
    code, stdout, err = second.wait()
    assert code == 0, err[-3000:]
    assert f"resuming from {checkpoint['name']}" in err
    steps = [json.loads(line)["step"] for line in stdout.splitlines() if '"progress"' in line]
    assert steps[0] == checkpoint["step"] + 1 and steps[-1] == PREEMPTED_STEPS
    fake_kubelet.succeeded(pod2, message=second.term.read_text())
    s = cluster_api.wait_phase("resume", "Succeeded")
    assert (s["attempt"], s["output"]) == (2, str(out))
    assert cluster_api.status("resume")["runner"]["pod"] == pod2["metadata"]["name"]


def test_a_second_attempt_reads_the_base_model_from_the_cache(controller_kubeconfig, cluster_api, fake_kubelet,
                                                              k8s_cluster, tiny_llama, qa_jsonl, s3_server, tmp_path,
                                                              monkeypatch):
    """runner.modelCache set: attempt 1 downloads the base from S3 into the cache volume and is preempted;
    attempt 2 reads the base from the cache - no model bytes come from S3 - and resumes."""
    ns, bucket = cluster_api.ns, s3_server.bucket
    proxy = SlowProxy(s3_server.endpoint, rate=None)  # counts what S3 sends
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
    files = [f for f in tiny_llama.rglob("*") if f.is_file()]
    for f in files:
        s3_server.client.upload_file(str(f), bucket, f"bases/tiny-llama/{f.relative_to(tiny_llama)}")
    model_bytes = sum(f.stat().st_size for f in files)
    ctl = Controller(controller_kubeconfig, ns, tmp_path, '--runner-pod={"modelCache": {"claimName": "model-cache"}}')
    ctl.start()
    try:
        doc = job_doc(f"s3://{bucket}/bases/tiny-llama", qa_jsonl, tmp_path / "model-out", resources={"gpus": 0},
                      merge={"enabled": False},
                      training={"maxSteps": PREEMPTED_STEPS, "saveSteps": 1000, "loggingSteps": 1})
        doc["metadata"]["name"] = "cached"
        cluster_api.create_ftj(doc)
        pod1 = pod_of(fake_kubelet, ns, "cached-1")
        vols = {v["name"]: v for v in pod1["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in pod1["spec"]["containers"][0]["volumeMounts"]}
        assert vols[mounts["/model-cache"]]["persistentVolumeClaim"] == {"claimName": "model-cache"}
        fake_kubelet.running(pod1)
        first = RunnerProcess(k8s_cluster, ns, "cached", pod1, tmp_path)
        wait_for(lambda: (cluster_api.status("cached").get("progress") or {}).get("step", 0) >= 2, 120,
                 interval=0.02, what="attempt 1 training")
        first.proc.send_signal(signal.SIGTERM)
        code, _, err1 = first.wait()
        assert code == 75, err1[-2000:]
        assert f"model cache miss: s3://{bucket}/bases/tiny-llama" in err1, err1[-2000:]
        first_bytes = proxy.sent
        assert first_bytes >= model_bytes
        fake_kubelet.failed(pod1, exit_code=code, message=first.term.read_text())
        wait_for(lambda: cluster_api.status("cached").get("attempt") == 2, 20, what="attempt 2")

        pod2 = pod_of(fake_kubelet, ns, "cached-2")
        fake_kubelet.running(pod2)
        second = RunnerProcess(k8s_cluster, ns, "cached", pod2, tmp_path)
        code, _, err2 = second.wait()
        assert code == 0, err2[-3000:]
        hit = next(line for line in err2.splitlines() if "model cache hit" in line)
        assert hit.endswith("downloaded 0 bytes") and f"s3://{bucket}/bases/tiny-llama" in hit
        assert "resuming from checkpoint-" in err2
        second_bytes = proxy.sent - first_bytes  # the listing that keys the cache, the source check: no model
        print(f"\nS3 bytes sent: attempt 1 {first_bytes}, attempt 2 {second_bytes} (model {model_bytes})")
        assert second_bytes < model_bytes / 10
        fake_kubelet.succeeded(pod2, message=second.term.read_text())
        assert cluster_api.wait_phase("cached", "Succeeded")["attempt"] == 2
    finally:
        ctl.stop()
        proxy.close()


def test_a_gcs_job_reads_its_key_from_the_secret_gcs_secret_ref_names(controller, cluster_api, fake_kubelet,
                                                                     k8s_cluster, tiny_llama, qa_jsonl, gcs_server,
                                                                     tmp_path):
    """gs:// model, data, checkpoints and destination; spec.gcsSecretRef names a Secret holding a service-account
    key. The pod mounts it as a file (here written as the kubelet would) and the runner reads it: the job
    succeeds with its output under gs://. A Secret holding no usable key fails the job, naming the variable and
    the field, never the Secret's contents."""
    ns, gs = cluster_api.ns, f"gs://{gcs_server.bucket}"
    bucket = gcs_server.client().bucket(gcs_server.bucket)
    for f in (f for f in tiny_llama.rglob("*") if f.is_file()):
        bucket.blob(f"bases/tiny-llama/{f.relative_to(tiny_llama).as_posix()}").upload_from_filename(str(f))
    bucket.blob("data/qa.jsonl").upload_from_filename(str(qa_jsonl))
    key = service_account_key(tmp_path / "sa.json").read_text()
    for name, value in (("gcs-key", key), ("gcs-broken", key.replace('"private_key"', '"private_kee"'))):
        code, body = k8s_cluster.request("POST", f"/api/v1/namespaces/{ns}/secrets", {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": {"key.json": value}})
        assert code == 201, body

    def job(name: str, secret: str) -> tuple[dict, RunnerProcess]:
        doc = job_doc(f"{gs}/bases/tiny-llama", f"{gs}/data/qa.jsonl", f"{gs}/models/{name}", resources={"gpus": 0},
                      output={"checkpoints": f"{gs}/checkpoints/{name}"}, gcsSecretRef={"name": secret})
        doc["metadata"]["name"] = name
        cluster_api.create_ftj(doc)
        pod = pod_of(fake_kubelet, ns, f"{name}-1")
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        assert env["GOOGLE_APPLICATION_CREDENTIALS"]["value"].endswith("/key.json")  # a path; the key is a file
        assert not [e for e in env.values() if secret in json.dumps(e.get("valueFrom"))]
        fake_kubelet.running(pod)
        return pod, RunnerProcess(k8s_cluster, ns, name, pod, tmp_path)

    pod, runner = job("gcs", "gcs-key")
    code, _, stderr = runner.wait()
    assert code == 0, stderr[-3000:]
    fake_kubelet.succeeded(pod, message=runner.term.read_text())
    s = cluster_api.wait_phase("gcs", "Succeeded")
    assert s["output"] == f"{gs}/models/gcs"
    assert bucket.blob("models/gcs/finetune-manifest.json").exists()
    assert bucket.blob("models/gcs/model.safetensors").exists()

    pod, runner = job("gcs-bad", "gcs-broken")
    code, _, stderr = runner.wait()
    assert code == 2, stderr[-3000:]
    fake_kubelet.failed(pod, exit_code=code, message=runner.term.read_text())
    s = cluster_api.wait_phase("gcs-bad", "Failed")
    assert "GOOGLE_APPLICATION_CREDENTIALS" in s["message"] and "spec.gcsSecretRef" in s["message"], s["message"]
    assert "BEGIN PRIVATE KEY" not in json.dumps(cluster_api.ftj("gcs-bad"))
