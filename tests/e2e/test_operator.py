"""The operator installed with `helm install` from charts/, running its own image as a real pod, and FineTuneJobs
run by the real runner image in real pods on a real kubelet (CPU jobs, `resources.gpus: 0`; data, model and
outputs in a real S3 server on loopback)."""
from __future__ import annotations

import json
import time

from runner.api import status as st
from tests.cluster.cluster import wait_for
from tests.e2e.conftest import HELD_STEP, OPERATOR_NS, apply, ftj, status, wait_status


def _controller_pods(node) -> list[dict]:
    pods = json.loads(node.kubectl("get", "pods", "-n", OPERATOR_NS, "-o", "json").stdout)["items"]
    assert len(pods) == 2, [p["metadata"]["name"] for p in pods]  # the chart's replicaCount: a leader, a standby
    return pods


def _runner_pods(node, ns: str, job: str) -> list[dict]:
    pods = json.loads(node.kubectl("get", "pods", "-n", ns, "-o", "json").stdout)["items"]
    return sorted((p for p in pods if p["metadata"]["name"].startswith(f"{job}-")),
                  key=lambda p: p["metadata"]["creationTimestamp"])


def test_controller_pod_is_ready_non_root_and_read_only(node, operator):
    t0 = time.monotonic()
    for pod in _controller_pods(node):
        ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
        assert ready["Ready"] == "True"  # its readiness probe (/readyz) answers, the standby's too
        name = pod["metadata"]["name"]
        uid = node.kubectl("exec", "-n", OPERATOR_NS, name, "--", "python", "-c", "import os; print(os.getuid())")
        assert uid.stdout.strip() == "1000"
        r = node.kubectl("exec", "-n", OPERATOR_NS, name, "--", "python", "-c", "open('/opt/x', 'w')", check=False)
        assert r.returncode != 0 and "Read-only file system" in r.stderr
        # it talks to the API server with its own in-cluster ServiceAccount token (no kubeconfig in the image)
        sa = pod["spec"]["serviceAccountName"]
        assert sa and sa != "default"
        logs = node.kubectl("logs", "-n", OPERATOR_NS, name).stdout
        assert "Traceback" not in logs, logs[-3000:]
    print(f"\ncontroller pod checks: {time.monotonic() - t0:.1f} s")


def test_job_runs_in_a_real_pod_and_publishes_to_s3(node, namespace, s3, tmp_path):
    t0 = time.monotonic()
    doc = ftj("happy", s3)
    apply(node, namespace, doc)
    seen: list[str] = []

    def succeeded():
        s = status(node, namespace, "happy")
        if s.get("phase") and (not seen or seen[-1] != s["phase"]):
            seen.append(s["phase"])
        if s.get("phase") == st.FAILED:
            raise AssertionError(f"job failed: {s.get('reason')}: {s.get('message')}")
        return s.get("phase") == st.SUCCEEDED
    wait_for(succeeded, timeout=600, interval=0.3, what="the job to succeed")
    r = node.kubectl("wait", "--for=condition=Succeeded", "ftj/happy", "-n", namespace, "--timeout=30s")
    assert "condition met" in r.stdout
    s = status(node, namespace, "happy")
    assert s["attempt"] == 1 and s["output"] == doc["spec"]["output"]["destination"]
    assert s["progress"]["step"] == s["progress"]["totalSteps"] == 6
    assert s["runner"]["pod"] == _runner_pods(node, namespace, "happy")[-1]["metadata"]["name"]
    order = [st.PENDING, st.RUNNING, st.DOWNLOADING, st.TRAINING, st.MERGING, st.UPLOADING, st.SUCCEEDED]
    assert st.TRAINING in seen and [order.index(p) for p in seen] == sorted(order.index(p) for p in seen), seen
    pod = _runner_pods(node, namespace, "happy")[-1]
    assert pod["spec"]["hostNetwork"] is True  # the admin's runner.podTemplate, merged by the controller
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 0 and json.loads(term["message"])["phase"] == st.SUCCEEDED
    # the published model loads
    prefix = doc["spec"]["output"]["destination"].split("/", 3)[3]
    out = s3.download_dir(prefix, tmp_path / "out")
    assert (out / "finetune-manifest.json").exists()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).num_parameters() > 0
    # no credential in the published files, the status or the pod's log
    secret = s3.env["AWS_SECRET_ACCESS_KEY"]
    log = node.kubectl("logs", "-n", namespace, pod["metadata"]["name"]).stdout
    assert secret not in log and secret not in json.dumps(s)
    assert not [f for f in out.rglob("*") if f.is_file() and secret.encode() in f.read_bytes()]
    print(f"\nhappy path: {time.monotonic() - t0:.1f} s; phases {seen}")


def test_wrong_s3_credentials_fail_once_naming_the_keys(node, namespace, s3):
    """The S3 server checks every signature (moto's IAM auth, tests/e2e/conftest.py): a Secret with a wrong secret
    key fails the job in its first pod, at Validating, permanently (no retry), with a message naming the keys to
    fix and never showing them."""
    t0 = time.monotonic()
    wrong = {**s3.env, "AWS_SECRET_ACCESS_KEY": "wrong-" + s3.env["AWS_SECRET_ACCESS_KEY"][6:]}
    node.kubectl("create", "secret", "generic", "wrong-creds", "-n", namespace,
                 *[f"--from-literal={k}={v}" for k, v in wrong.items()])
    apply(node, namespace, ftj("wrongkeys", s3, s3SecretRef={"name": "wrong-creds"}))
    s = wait_status(node, namespace, "wrongkeys", lambda s: s.get("phase") == st.FAILED, 300, "the job to fail")
    assert s["attempt"] == 1 and s["failedAttempts"] == 1, s  # its one attempt; permanent: not retried
    assert s["reason"] == st.INVALID_SPEC, s  # found at Validating, before any download
    assert "AWS_ACCESS_KEY_ID" in s["message"] and "AWS_SECRET_ACCESS_KEY" in s["message"], s["message"]
    assert wrong["AWS_SECRET_ACCESS_KEY"] not in json.dumps(s) and s3.env["AWS_SECRET_ACCESS_KEY"] not in json.dumps(s)
    pods = _runner_pods(node, namespace, "wrongkeys")
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    term = pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 2 and json.loads(term["message"])["failedPhase"] == st.VALIDATING, term
    time.sleep(3)  # and no second pod or attempt comes
    assert len(_runner_pods(node, namespace, "wrongkeys")) == 1 and status(node, namespace, "wrongkeys")["attempt"] == 1
    print(f"\nwrong credentials: {time.monotonic() - t0:.1f} s: {s['message'][:200]}")


def test_a_job_without_resources_gets_the_charts_default_resources(node, namespace, s3):
    """A CPU job that sets no resources.memory (nor cpu): its runner pod gets the chart's runner.defaultResources
    (the README's install, default values), and `kubectl describe pod` says what was applied."""
    doc = ftj("defaults", s3)
    doc["spec"]["resources"] = {"gpus": 0}
    apply(node, namespace, doc)
    wait_for(lambda: _runner_pods(node, namespace, "defaults"), 120, interval=0.5, what="the runner pod")
    pod = _runner_pods(node, namespace, "defaults")[-1]
    resources = pod["spec"]["containers"][0]["resources"]
    assert resources == {"requests": {"cpu": "500m", "memory": "4Gi"}, "limits": {"memory": "32Gi"}}, resources
    described = node.kubectl("describe", "pod", pod["metadata"]["name"], "-n", namespace).stdout
    flat = " ".join(described.split())  # describe wraps long annotations onto the next line
    assert ("finetune.dev/default-resources: requests.cpu=500m requests.memory=4Gi limits.memory=32Gi "
            "(runner.defaultResources" in flat), described
    assert "Limits: memory: 32Gi Requests: cpu: 500m memory: 4Gi" in flat, described
    s = wait_status(node, namespace, "defaults", lambda s: s.get("phase") in (st.SUCCEEDED, st.FAILED), 600,
                    "the job to finish")
    assert s["phase"] == st.SUCCEEDED, s


def test_too_little_memory_is_really_oomkilled(node, namespace, s3):
    t0 = time.monotonic()
    apply(node, namespace, ftj("oom", s3, resources={"gpus": 0, "memory": "160Mi"}))
    s = wait_status(node, namespace, "oom", lambda s: s.get("phase") == st.FAILED, 300, "the OOM job to fail")
    assert s["reason"] == st.OUT_OF_MEMORY, s
    assert "resources.memory" in s["message"], s["message"]
    pod = _runner_pods(node, namespace, "oom")[-1]
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["reason"] == "OOMKilled" and term["exitCode"] == 137, term
    print(f"\nOOM: {time.monotonic() - t0:.1f} s")


# The long jobs: held in the save of checkpoint-HELD_STEP (HeldRunner) while the test stops them, so the stop lands
# mid-training whatever the machine's speed; the SIGTERM, pending while the runner is held, makes it save the step
# it trains next and stop: STOP_STEP, which no saveSteps checkpoint is (those come every HELD_STEP steps).
LONG_STEPS = 12
STOP_STEP = HELD_STEP + 1


def _resumed_and_succeeded(node, ns, name, stopped_pod: str) -> dict:
    """The job succeeds in a new pod that resumed from the checkpoint the stopped pod saved on SIGTERM."""
    s = wait_status(node, ns, name, lambda s: s.get("phase") in (st.SUCCEEDED, st.FAILED), 600, f"{name} to finish")
    assert s["phase"] == st.SUCCEEDED, s
    assert s["runner"]["pod"] != stopped_pod, s["runner"]
    resumed = s["runner"]["resumedFrom"]
    assert resumed["step"] >= 3 and resumed["name"] == f"checkpoint-{resumed['step']}", resumed
    log = node.kubectl("logs", "-n", ns, s["runner"]["pod"]).stdout
    steps = [json.loads(line)["step"] for line in log.splitlines() if line.startswith("{") and '"progress"' in line]
    assert resumed["step"] < LONG_STEPS, f"stopped only after the last step: {resumed}"  # else nothing to test
    assert steps[0] == resumed["step"] + 1 and steps[-1] == LONG_STEPS, (steps[:3], resumed)  # went on from there
    return s


def _stopped_with_a_checkpoint(node, ns, name, pod: str, step: int) -> int:
    """The stopped pod's runner exited 75 (retryable) after saving checkpoint-`step`: its termination message says
    so. (A deleted pod may be gone by then: the new pod's resumedFrom says which checkpoint it saved.)"""
    def terminated():
        pods = [p for p in _runner_pods(node, ns, name) if p["metadata"]["name"] == pod]
        if not pods:
            return {"gone": True}
        state = pods[0]["status"]["containerStatuses"][0]["state"]
        return state.get("terminated")
    term = wait_for(terminated, timeout=150, interval=0.5, what=f"{pod} to stop")
    if "exitCode" in term:
        assert term["exitCode"] == 75, term
        assert f"resumes from step {step}" in json.loads(term["message"])["message"], term
    return step


def test_deleted_pod_checkpoints_on_sigterm_and_a_new_pod_resumes(node, namespace, held):
    """`kubectl delete pod` mid-training (the runner held at a known step meanwhile: HeldRunner): a real SIGTERM; the
    runner saves a checkpoint within the grace period and exits 75; the pod that replaces it resumes from that
    checkpoint. (On this 1.20 node the attempt's Job replaces a deleted pod itself, so the new pod is the same
    attempt's; where the Job counts a deleted pod as failed, the controller starts attempt 2, which resumes the same
    way.)"""
    t0 = time.monotonic()
    apply(node, namespace, held.job("preempted", LONG_STEPS))
    pod = held.wait("preempted")
    held.freeze(pod)
    node.kubectl("delete", "pod", pod, "-n", namespace, "--wait=false")  # a real SIGTERM, grace period honoured
    held.wait_sigterm()
    held.thaw()
    seen: list[dict] = []

    def replaced():  # every status written meanwhile, until the new pod's runner reports
        s = status(node, namespace, "preempted")
        if not seen or seen[-1] != s:
            seen.append(s)
        runner = s.get("runner") or {}
        return s.get("attempt", 1) > 1 or (runner.get("pod") not in (None, pod) and runner.get("phase"))
    wait_for(replaced, timeout=300, interval=0.3, what="the new pod's runner to report")
    step = _stopped_with_a_checkpoint(node, namespace, "preempted", pod, STOP_STEP)
    s = _resumed_and_succeeded(node, namespace, "preempted", pod)
    assert s["runner"]["resumedFrom"]["step"] == step
    events = _events(node, namespace, "preempted")
    if s["attempt"] == 1:  # the Job replaced the pod itself: a deleted pod, not a failed attempt
        assert st.EVENT_ATTEMPT_FAILED not in [e["reason"] for e in events], events
        assert s["failedAttempts"] == 0, s
        assert not [x for x in seen if x.get("phase") in (st.PENDING, st.FAILED) and "attempt 2" in
                    (x.get("message") or "")], seen
        [note] = [e for e in events if e["reason"] == st.EVENT_POD_REPLACED]
        assert note["type"] == "Normal" and f"pod {pod} was deleted and replaced by pod" in note["message"], note
        assert "resumes from the checkpoint of step" in note["message"] or "starts over" in note["message"], note
    else:  # where the Job counts the deleted pod as failed: attempt 2, announced as such
        assert st.EVENT_ATTEMPT_FAILED in [e["reason"] for e in events], events
    print(f"\ndelete pod -> resume: {time.monotonic() - t0:.1f} s; attempt {s['attempt']}, resumed from "
          f"{s['runner']['resumedFrom']}")


def _events(node, ns: str, name: str) -> list[dict]:
    items = json.loads(node.kubectl("get", "events", "-n", ns, "-o", "json").stdout)["items"]
    return [{"type": e["type"], "reason": e["reason"], "message": e.get("message", "")} for e in items
            if e["involvedObject"].get("kind") == "FineTuneJob" and e["involvedObject"]["name"] == name]


def test_suspend_then_resume_goes_on_from_the_checkpoint(node, namespace, held):
    t0 = time.monotonic()
    apply(node, namespace, held.job("paused", LONG_STEPS))
    pod = held.wait("paused")
    held.freeze(pod)
    node.kubectl("patch", "ftj", "paused", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    wait_status(node, namespace, "paused", lambda s: s.get("phase") == st.SUSPENDED, 60, "Suspended")
    held.wait_sigterm()  # the suspended job's pod is stopped
    held.thaw()
    step = _stopped_with_a_checkpoint(node, namespace, "paused", pod, STOP_STEP)
    wait_for(lambda: not [p for p in _runner_pods(node, namespace, "paused")
                          if p["status"].get("phase") in ("Pending", "Running")], 150, what="no runner pod")
    assert status(node, namespace, "paused")["phase"] == st.SUSPENDED
    node.kubectl("patch", "ftj", "paused", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    s = _resumed_and_succeeded(node, namespace, "paused", pod)
    assert s["runner"]["resumedFrom"]["step"] == step and s["failedAttempts"] == 0, s  # a pause is no failure
    print(f"\nsuspend -> resume: {time.monotonic() - t0:.1f} s; resumed from {s['runner']['resumedFrom']}")


def test_an_image_that_cannot_be_pulled_fails_with_a_reason(node, namespace, s3):
    t0 = time.monotonic()
    # spec.image must be allowed by the admin policy: the operator's own runner repository with another tag is
    doc = ftj("badimage", s3)
    doc["spec"]["image"] = "finetune-runner:no-such-tag"
    apply(node, namespace, doc)
    s = wait_status(node, namespace, "badimage", lambda s: s.get("phase") == st.FAILED, 240, "ImagePullFailed")
    assert s["reason"] == st.IMAGE_PULL_FAILED, s
    assert "finetune-runner:no-such-tag" in s["message"], s["message"]
    print(f"\nbad image: {time.monotonic() - t0:.1f} s: {s['message'][:200]}")
