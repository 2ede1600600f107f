"""The controller as a subprocess against the real API server, with FakeKubelet playing the kubelet."""
from __future__ import annotations

import json
import time

from controller import naming
from runner.api import names
from tests.controller.conftest import Controller, ftj_doc, pod_of, wait_for

def result(reason=None, code=0, **fields):
    r = {"event": "result", "phase": "Succeeded" if code == 0 else "Failed", "exitCode": code}
    if reason:
        r.update(reason=reason, message=f"{reason}: detail from the runner")
    r.update(fields)
    return json.dumps(r)


def test_runs_a_job_and_reports_success(controller, cluster_api, fake_kubelet, k8s_cluster):
    ns = cluster_api.ns
    cluster_api.create_ftj(ftj_doc("ok", resources={"gpus": 1, "memory": "8Gi"},
                                   hfTokenSecretRef={"name": "hf"}))
    s = cluster_api.wait_phase("ok", "Pending")
    assert (s["attempt"], s["jobName"]) == (1, "ok-1")
    # status is written before the Job is created (a stale cache then conflicts instead of acting twice)
    job = wait_for(lambda: cluster_api.jobs("ok"), 20, what="Job ok-1")[0]
    owner = job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("FineTuneJob", "ok", True)
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/finetune-runner:test"
    assert {r["metadata"]["name"] for r in cluster_api.list("rbac.authorization.k8s.io/v1", "rolebindings")} == {
        "ok-runner"}

    pod = pod_of(fake_kubelet, ns, "ok-1")
    fake_kubelet.running(pod)
    cluster_api.wait_phase("ok", "Running")
    fake_kubelet.succeeded(pod, message=result(output="s3://models/ok", metrics={"train_loss": 0.5}))
    s = cluster_api.wait_phase("ok", "Succeeded")
    assert s["output"] == "s3://models/ok" and s["metrics"] == {"train_loss": 0.5} and s["completionTime"]
    assert {c["type"]: c["status"] for c in s["conditions"]} == {"Succeeded": "True", "Failed": "False",
                                                                  "Running": "False", "Suspended": "False"}
    r = k8s_cluster.kubectl_run("wait", "--for=condition=Succeeded", "ftj/ok", "-n", ns, "--timeout=10s")
    assert "condition met" in r.stdout
    reasons = cluster_api.event_reasons("ok", "Succeeded")
    assert sorted(reasons) == ["Pending", "Running", "Succeeded"], reasons  # one Event per phase change
    # the runner's identity is revoked once the job is done
    wait_for(lambda: not cluster_api.list("rbac.authorization.k8s.io/v1", "rolebindings"), 10,
             what="runner RoleBinding removed")
    assert len(cluster_api.jobs("ok")) == 1
    code, text = controller.http("/metrics")
    assert code == 200 and 'finetune_jobs{phase="Succeeded"} 1.0' in text
    assert 'finetune_phase_transitions_total{phase="Succeeded"}' in text
    assert "finetune_reconcile_duration_seconds_count" in text and "finetune_workqueue_depth" in text
    assert controller.http("/healthz")[0] == 200


def test_each_failure_reason(controller, cluster_api, fake_kubelet):
    """One FineTuneJob per failure, driven side by side."""
    ns = cluster_api.ns
    exits = {"dl": ("DownloadFailed", 2), "tr": ("TrainingFailed", 2), "mg": ("MergeFailed", 2),
             "up": ("UploadFailed", 2), "spec": ("InvalidSpec", 2), "cuda": ("OutOfMemory", 3)}
    extras = {
        "late": {"activeDeadlineSeconds": 2},
        "hub": {"output": {"destination": "hf://org/model"}},  # the schema allows it, the runner's rules do not
        "tol": {"tolerations": [{"key": "gpu", "operator": "Sometimes"}]},  # refused by the default policy
    }
    for name in [*exits, "oom", "pull", "sched", "late", "hub", "tol"]:
        cluster_api.create_ftj(ftj_doc(name, **extras.get(name, {})))
    pods = {name: pod_of(fake_kubelet, ns, f"{name}-1") for name in [*exits, "oom", "pull", "sched", "late"]}
    for name, (reason, code) in exits.items():
        fake_kubelet.running(pods[name])
        fake_kubelet.failed(pods[name], exit_code=code, message=result(reason, code))
    fake_kubelet.running(pods["oom"])
    fake_kubelet.oom_killed(pods["oom"])
    fake_kubelet.image_pull_error(pods["pull"])
    fake_kubelet.unschedulable(pods["sched"])
    fake_kubelet.running(pods["late"])

    for name, (reason, _) in exits.items():
        s = cluster_api.wait_phase(name, "Failed", reason=reason)
        assert "detail from the runner" in s["message"]
    cluster_api.wait_phase("oom", "Failed", reason="OutOfMemory")
    s = cluster_api.wait_phase("pull", "Pending", reason="ImagePullFailed", timeout=5)
    assert "ErrImagePull" in s["message"]
    cluster_api.wait_phase("pull", "Failed", reason="ImagePullFailed")  # after --image-pull-timeout 2
    s = cluster_api.wait_phase("sched", "Pending", reason="Unschedulable")
    assert "Insufficient nvidia.com/gpu" in s["message"]
    cluster_api.wait_phase("late", "Failed", reason="DeadlineExceeded")
    s = cluster_api.wait_phase("hub", "Failed", reason="InvalidSpec")
    assert "output.checkpoints" in s["message"]
    s = cluster_api.wait_phase("tol", "Failed", reason="InvalidSpec")
    assert "spec.tolerations[0].key" in s["message"] and "policy.tolerationKeys" in s["message"], s["message"]
    # (allowed by a policy, the API server refuses the Job instead: test_security.py)

    time.sleep(1.5)  # longer than the retry back-off: a retry would have started by now
    assert not cluster_api.jobs("hub") and not cluster_api.jobs("tol")
    for name in [*exits, "oom"]:
        assert [j["metadata"]["name"] for j in cluster_api.jobs(name)] == [f"{name}-1"], name
        assert cluster_api.status(name)["attempt"] == 1
    # a stopped attempt's Job is deleted (its pod stops)
    assert not cluster_api.jobs("pull") and not cluster_api.jobs("late")
    assert cluster_api.status("sched")["phase"] == "Pending"
    warnings = {e["reason"] for e in cluster_api.events("oom") if e["type"] == "Warning"}
    assert "OutOfMemory" in warnings


def test_retries_then_succeeds_and_gives_up_after_backoff_limit(controller, cluster_api, fake_kubelet):
    ns = cluster_api.ns
    cluster_api.create_ftj(ftj_doc("flaky", backoffLimit=2))
    cluster_api.create_ftj(ftj_doc("broken", backoffLimit=1))
    for n in (1, 2):
        p = pod_of(fake_kubelet, ns, f"flaky-{n}")
        fake_kubelet.running(p)
        fake_kubelet.failed(p, exit_code=75, message=result("DownloadFailed", 75))
        if n == 1:
            s = wait_for(lambda: cluster_api.status("flaky").get("failedAttempts") == 1 and cluster_api.status(
                "flaky"), 10, what="first failure recorded")
            assert s["phase"] == "Pending"
    p = pod_of(fake_kubelet, ns, "flaky-3")
    job = cluster_api.jobs("flaky")[-1]
    first = cluster_api.jobs("flaky")[0]
    # the retry runs the same spec, so the runner resumes from the same checkpoints
    key = naming.ANNOTATION_SPEC
    assert (job["spec"]["template"]["metadata"]["annotations"][key]
            == first["spec"]["template"]["metadata"]["annotations"][key])
    fake_kubelet.running(p)
    fake_kubelet.succeeded(p, message=result(output="s3://models/flaky"))
    s = cluster_api.wait_phase("flaky", "Succeeded")
    assert (s["attempt"], s["failedAttempts"]) == (3, 2)
    assert cluster_api.event_reasons("flaky", "AttemptFailed", "AttemptFailed").count("AttemptFailed") == 2

    for n in (1, 2):
        p = pod_of(fake_kubelet, ns, f"broken-{n}")
        fake_kubelet.failed(p, exit_code=1, message="Traceback: boom (not JSON: the runner crashed)")
    s = cluster_api.wait_phase("broken", "Failed", reason="BackoffLimitExceeded")
    assert "2 attempts failed" in s["message"] and "boom" in s["message"]
    time.sleep(1.5)
    assert len(cluster_api.jobs("broken")) == 2


def test_delete_removes_pods_and_identity(controller, cluster_api, fake_kubelet):
    ns = cluster_api.ns
    cluster_api.create_ftj(ftj_doc("gone"))
    pod = pod_of(fake_kubelet, ns, "gone-1")
    fake_kubelet.running(pod)
    cluster_api.wait_phase("gone", "Running")
    cluster_api.delete_ftj("gone")
    wait_for(lambda: all(p["metadata"].get("deletionTimestamp") for p in fake_kubelet.pods(ns)), 30,
             what="runner pod to be stopped")
    fake_kubelet.process_deletions(ns)
    wait_for(lambda: not fake_kubelet.pods(ns) and not cluster_api.jobs(), 30, what="pods and Jobs gone")
    wait_for(lambda: not cluster_api.list("rbac.authorization.k8s.io/v1", "rolebindings")
             and not cluster_api.list("rbac.authorization.k8s.io/v1", "roles")
             and not [s for s in cluster_api.list("v1", "serviceaccounts") if s["metadata"]["name"] == "gone-runner"],
             30, what="runner identity gone")


def test_suspend_then_resume(controller, cluster_api, fake_kubelet):
    ns = cluster_api.ns
    cluster_api.create_ftj(ftj_doc("pause"))
    pod = pod_of(fake_kubelet, ns, "pause-1")
    fake_kubelet.running(pod)
    cluster_api.wait_phase("pause", "Running")
    cluster_api.patch_spec("pause", {"suspend": True})
    wait_for(lambda: fake_kubelet.get(pod)["metadata"].get("deletionTimestamp"), 20, what="pod to get SIGTERM")
    s = cluster_api.wait_phase("pause", "Suspended")
    assert "stopping" in s["message"]
    fake_kubelet.process_deletions(ns)  # the runner saved a checkpoint and exited
    wait_for(lambda: "set spec.suspend to false" in (cluster_api.status("pause").get("message") or ""), 20,
             what="suspended with nothing running")
    assert not cluster_api.jobs("pause")
    cluster_api.patch_spec("pause", {"suspend": False})
    pod2 = pod_of(fake_kubelet, ns, "pause-1")  # the same attempt continues from the checkpoint
    assert pod2["metadata"]["uid"] != pod["metadata"]["uid"]
    fake_kubelet.running(pod2)
    s = cluster_api.wait_phase("pause", "Running")
    assert s["failedAttempts"] == 0 and s["attempt"] == 1
    assert {"Suspended", "Pending", "Running"} <= set(cluster_api.event_reasons("pause", "Suspended", "Pending", "Running"))


def test_ttl_cleans_up_children_and_keeps_the_status(controller, cluster_api, fake_kubelet):
    ns = cluster_api.ns
    cluster_api.create_ftj(ftj_doc("ttl", ttlSecondsAfterFinished=1))
    pod = pod_of(fake_kubelet, ns, "ttl-1")
    fake_kubelet.succeeded(pod, message=result(output="s3://models/ttl"))
    cluster_api.wait_phase("ttl", "Succeeded")
    wait_for(lambda: not cluster_api.jobs("ttl"), 20, what="Jobs removed after ttlSecondsAfterFinished")
    time.sleep(0.5)
    s = cluster_api.status("ttl")
    assert (s["phase"], s["output"]) == ("Succeeded", "s3://models/ttl")


def test_spec_change_after_start_is_ignored_with_an_event(controller, cluster_api, fake_kubelet):
    cluster_api.create_ftj(ftj_doc("fixed"))
    cluster_api.wait_phase("fixed", "Pending")
    job = wait_for(lambda: cluster_api.jobs("fixed"), 20, what="Job fixed-1")[0]
    cluster_api.patch_spec("fixed", {"lora": {"r": 64}})  # 1.20 does not enforce the CEL rule
    ev = wait_for(lambda: [e for e in cluster_api.events("fixed") if e["reason"] == "SpecChangeIgnored"], 10,
                  what="SpecChangeIgnored event")
    assert ev[0]["type"] == "Warning" and "spec" in ev[0]["message"]
    assert cluster_api.jobs("fixed")[0]["metadata"]["uid"] == job["metadata"]["uid"]
    time.sleep(0.5)
    assert [e["reason"] for e in cluster_api.events("fixed")].count("SpecChangeIgnored") == 1


def test_controller_restart_changes_nothing(controller_kubeconfig, k8s_namespace, cluster_api, fake_kubelet,
                                            tmp_path):
    ns = cluster_api.ns
    ctl = Controller(controller_kubeconfig, ns, tmp_path).start()
    try:
        cluster_api.create_ftj(ftj_doc("steady"))
        cluster_api.create_ftj(ftj_doc("moving"))
        steady, moving = pod_of(fake_kubelet, ns, "steady-1"), pod_of(fake_kubelet, ns, "moving-1")
        fake_kubelet.running(steady)
        fake_kubelet.running(moving)
        cluster_api.wait_phase("steady", "Running")
        cluster_api.wait_phase("moving", "Running")
        time.sleep(0.5)
        before = cluster_api.ftj("steady")
        ctl.kill()  # SIGKILL mid-job
        fake_kubelet.failed(moving, exit_code=75, message=result("UploadFailed", 75))  # happens while it is down
        ctl.start()
        wait_for(lambda: len(cluster_api.jobs("moving")) == 2, 20, what="attempt 2 after the restart")
        time.sleep(1.5)  # several passes after the restart
        assert [j["metadata"]["name"] for j in cluster_api.jobs("moving")] == ["moving-1", "moving-2"]
        assert [j["metadata"]["name"] for j in cluster_api.jobs("steady")] == ["steady-1"]
        after = cluster_api.ftj("steady")
        assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]  # not even rewritten
        assert cluster_api.event_reasons("steady").count("Running") == 1
        s = cluster_api.status("moving")
        assert (s["attempt"], s["failedAttempts"], s["phase"]) == (2, 1, "Pending")
        ctl.kill()
        ctl.start()
        time.sleep(1.5)
        assert len(cluster_api.jobs("moving")) == 2
    finally:
        ctl.stop()


def test_runner_identity_is_limited_to_its_own_job(controller, cluster_api, k8s_cluster):
    ns = cluster_api.ns
    for name in ("mine", "other"):
        cluster_api.create_ftj(ftj_doc(name))
        cluster_api.wait_phase(name, "Pending")
    token = k8s_cluster.service_account_token(ns, "mine-runner", create=False)
    path = f"/apis/{names.API_VERSION}/namespaces/{ns}/{names.PLURAL}"
    patch = {"status": {"progress": {"step": 1, "totalSteps": 10}}}

    def call(method, p, body=None):
        return k8s_cluster.request(method, p, body, token=token, content_type="application/merge-patch+json")[0]

    assert wait_for(lambda: call("PATCH", f"{path}/mine/status", patch) == 200, 10, what="own status patch")
    assert cluster_api.status("mine")["progress"] == {"step": 1, "totalSteps": 10}
    assert call("PATCH", f"{path}/other/status", patch) == 403
    assert call("GET", f"{path}/other/status") == 403
    assert call("PATCH", f"{path}/mine", {"spec": {"suspend": True}}) == 403
    assert call("DELETE", f"{path}/other") == 403
    assert call("GET", path) == 403
    assert call("GET", f"/apis/batch/v1/namespaces/{ns}/jobs") == 403
    assert "progress" not in cluster_api.status("other")


def test_all_namespaces_mode(controller_kubeconfig, cluster_api, fake_kubelet, tmp_path):
    """Without --namespace the controller watches every namespace (with the same ClusterRole)."""
    ctl = Controller(controller_kubeconfig, None, tmp_path).start()
    try:
        cluster_api.create_ftj(ftj_doc("anywhere"))
        pod = pod_of(fake_kubelet, cluster_api.ns, "anywhere-1")
        fake_kubelet.running(pod)
        cluster_api.wait_phase("anywhere", "Running")
    finally:
        ctl.stop()


def test_a_pending_job_shows_its_cost_estimate_in_kubectl_get(controller, cluster_api, k8s_cluster):
    ns = cluster_api.ns
    cluster_api.create_ftj(ftj_doc("est", model={"source": "hf://meta-llama/Meta-Llama-3-8B-Instruct"},
                                   training={"maxSteps": 600}))
    s = cluster_api.wait_phase("est", "Pending")
    e = s["estimate"]
    assert (e["gpu"], e["steps"], e["row"]) == ("h100", 600, "h100-8b-packed") and e["summary"].endswith("h100-hours")
    lines = k8s_cluster.kubectl_run("get", "ftj", "est", "-n", ns).stdout.splitlines()
    header = lines[0].split()
    at = lines[1].index(e["summary"])  # EST shows the summary, under its header
    assert "EST" in header and lines[0].index("EST") == at
