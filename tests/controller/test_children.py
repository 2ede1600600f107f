"""The runner's Job and identity, as built by controller.children (pure)."""
from __future__ import annotations

import json

from controller import children, naming
from tests.controller.builders import ftj


def _job(**spec):
    f = ftj(**spec)
    return f, children.job(f, 2, f["spec"], image="reg/runner:1", deadline_seconds=100)


def test_job_runs_the_runner_on_the_spec_with_gpus_and_shm():
    f, j = _job(resources={"gpus": 2, "cpu": "8", "memory": "64Gi"})
    assert j["metadata"]["name"] == "demo-2" and j["spec"]["backoffLimit"] == 0
    assert j["spec"]["activeDeadlineSeconds"] == 100
    assert j["metadata"]["ownerReferences"][0] == {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                                                   "name": "demo", "uid": f["metadata"]["uid"], "controller": True,
                                                   "blockOwnerDeletion": True}
    pod = j["spec"]["template"]
    c = pod["spec"]["containers"][0]
    assert c["command"] == ["python", "-m", "runner", "run", "/etc/finetune/job.yaml"]
    assert c["resources"] == {"requests": {"nvidia.com/gpu": "2", "cpu": "8", "memory": "64Gi"},
                              "limits": {"nvidia.com/gpu": "2", "memory": "64Gi"}}
    assert c["terminationMessagePath"] == "/dev/termination-log"
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert vols[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory"}
    item = vols[mounts["/etc/finetune"]]["downwardAPI"]["items"][0]
    assert item["path"] == "job.yaml" and naming.ANNOTATION_SPEC in item["fieldRef"]["fieldPath"]
    manifest = json.loads(pod["metadata"]["annotations"][naming.ANNOTATION_SPEC])
    assert manifest["kind"] == "FineTuneJob" and manifest["spec"] == f["spec"]
    env = {e["name"]: e for e in c["env"]}
    assert env["FINETUNE_JOB_NAME"]["value"] == "demo" and env["FINETUNE_JOB_NAMESPACE"]["value"] == "ns"
    assert env["FINETUNE_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert pod["metadata"]["labels"][naming.LABEL_ATTEMPT] == "2"
    assert pod["metadata"]["labels"][naming.LABEL_JOB_UID] == f["metadata"]["uid"]


def test_pod_security_defaults():
    _, j = _job()
    ps = j["spec"]["template"]["spec"]
    sc = ps["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0 and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    csc = ps["containers"][0]["securityContext"]
    assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"] == {"drop": ["ALL"]}
    assert csc["privileged"] is False
    assert ps["serviceAccountName"] == "demo-runner" and ps["restartPolicy"] == "Never"


def test_root_filesystem_is_read_only_and_everything_the_runner_writes_is_a_volume():
    _, j = _job()
    ps = j["spec"]["template"]["spec"]
    c = ps["containers"][0]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    vols = {v["name"]: v for v in ps["volumes"]}
    writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
    assert all("emptyDir" in vols[m["name"]] for m in c["volumeMounts"] if m["mountPath"] in writable)
    env = {e["name"]: e.get("value") for e in c["env"]}
    for path in (env["HOME"], env["TMPDIR"], env["FINETUNE_WORK_DIR"], "/tmp", "/dev/shm", c["workingDir"]):
        assert any(path == w or path.startswith(w + "/") for w in writable), path
    # the status sink reports with the pod's token: mounted on purpose (its Role allows only this job's status)
    assert ps["automountServiceAccountToken"] is True


def test_credentials_come_from_secret_references_only():
    _, j = _job(hfTokenSecretRef={"name": "hf", "key": "tok"}, s3SecretRef={"name": "aws"},
                env=[{"name": "EXTRA", "value": "1"}])
    env = {e["name"]: e for e in j["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "tok"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "aws", "key": "AWS_SECRET_ACCESS_KEY"}
    assert env["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert env["EXTRA"] == {"name": "EXTRA", "value": "1"}
    assert all("value" not in e for n, e in env.items() if n.startswith(("AWS_", "HF_")))


def test_scheduling_fields_and_queue_label():
    _, j = _job(nodeSelector={"gpu": "a100"}, tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists"}],
                priorityClassName="high", queueName="team-a", imagePullSecrets=["regcred"], image="my/runner:2",
                resources={"gpus": 0})
    ps = j["spec"]["template"]["spec"]
    assert ps["nodeSelector"] == {"gpu": "a100"} and ps["priorityClassName"] == "high"
    assert ps["tolerations"][0]["key"] == "nvidia.com/gpu" and ps["imagePullSecrets"] == [{"name": "regcred"}]
    assert j["metadata"]["labels"][naming.LABEL_KUEUE_QUEUE] == "team-a"
    c = ps["containers"][0]
    assert c["image"] == "my/runner:2" and "nvidia.com/gpu" not in str(c["resources"])


def test_runner_role_allows_only_its_own_status():
    f = ftj()
    r = children.role(f)
    assert r["rules"] == [{"apiGroups": ["finetune.dev"], "resources": ["finetunejobs/status"],
                           "resourceNames": ["demo"], "verbs": ["get", "patch"]}]
    rb = children.role_binding(f)
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": "demo-runner", "namespace": "ns"}]
    assert children.role_binding(ftj(serviceAccountName="mine"))["subjects"][0]["name"] == "mine"
