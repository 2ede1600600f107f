"""The objects a FineTuneJob owns, built as plain dicts (pure functions; the reconciler creates them).

Per job: a ServiceAccount, a Role and a RoleBinding - the runner's identity, allowed only `get` and `patch`
on `finetunejobs/status` of this one FineTuneJob (`resourceNames: [<ftj>]`) - and one batch/v1 Job per
attempt (a JobSet with spec.resources.nodes > 1: controller/jobset.py, with the same pod template). All carry an
owner reference to the FineTuneJob, so deleting it garbage-collects them (and the Jobs' Pods).

The runner pod reads its job file from the downward API: the pod template carries the manifest as the
annotation `finetune.dev/spec`, mounted at /etc/finetune/job.yaml (JSON is YAML). So each attempt's Job holds
exactly the spec it runs, needs no ConfigMap, and is created in one API call.
"""
from __future__ import annotations

import json

from controller import naming
from controller.podtemplate import RunnerPod
from controller.naming import identity_name, job_name, label_value, runner_manifest, spec_hash
from runner.api import names

JOB_FILE_DIR = "/etc/finetune"
JOB_FILE = f"{JOB_FILE_DIR}/job.yaml"
RUNNER_COMMAND = ["python", "-m", "runner", "run", JOB_FILE]
RUNNER_UID = 1000
SCRATCH = "/scratch"  # an emptyDir: the only writable place besides /tmp and /dev/shm
TERMINATION_GRACE_SECONDS = 120  # time to save a checkpoint after SIGTERM (suspend, preemption, delete)
AWS_KEYS = (("AWS_ACCESS_KEY_ID", False), ("AWS_SECRET_ACCESS_KEY", False), ("AWS_SESSION_TOKEN", True),
            ("AWS_DEFAULT_REGION", True), ("AWS_REGION", True), ("AWS_ENDPOINT_URL", True),
            ("AWS_ENDPOINT_URL_S3", True))  # the runner reads either endpoint variable
# spec.gcsSecretRef: the service-account key file, mounted read-only (its contents never in the env).
GCS_KEY_VOLUME = "finetune-gcs-key"
GCS_KEY_DIR = "/var/run/secrets/finetune.dev/gcs"
GCS_KEY_FILE = f"{GCS_KEY_DIR}/key.json"


def owner_reference(ftj: dict) -> dict:
    md = ftj["metadata"]
    return {"apiVersion": names.API_VERSION, "kind": names.KIND, "name": md["name"], "uid": md["uid"],
            "controller": True, "blockOwnerDeletion": True}


def labels(ftj: dict) -> dict:
    md = ftj["metadata"]
    return {
        "app.kubernetes.io/name": "finetune-runner",
        "app.kubernetes.io/managed-by": naming.MANAGED_BY,
        naming.LABEL_JOB: label_value(md["name"]),
        naming.LABEL_JOB_UID: md["uid"],
    }


def _meta(ftj: dict, name: str, extra_labels: dict | None = None) -> dict:
    return {"name": name, "namespace": ftj["metadata"]["namespace"],
            "labels": {**labels(ftj), **(extra_labels or {})},
            "annotations": {naming.ANNOTATION_JOB_NAME: ftj["metadata"]["name"]},
            "ownerReferences": [owner_reference(ftj)]}


# ----------------------------------------------------------------------------------- identity
def service_account(ftj: dict) -> dict:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(ftj, identity_name(ftj["metadata"]["name"]))}


def role(ftj: dict) -> dict:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": _meta(ftj, identity_name(ftj["metadata"]["name"])),
        "rules": [{"apiGroups": [names.GROUP], "resources": [names.STATUS_SUBRESOURCE],
                   "resourceNames": [ftj["metadata"]["name"]], "verbs": ["get", "patch"]}],
    }


def role_binding(ftj: dict) -> dict:
    md = ftj["metadata"]
    sa = (ftj.get("spec") or {}).get("serviceAccountName") or identity_name(md["name"])
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": _meta(ftj, identity_name(md["name"])),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": identity_name(md["name"])},
        "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": md["namespace"]}],
    }


# ---------------------------------------------------------------------------------------- job
def attempt_meta(ftj: dict, name: str, attempt: int, spec: dict) -> dict:
    """Metadata of an attempt's Job or JobSet: the attempt number, the Kueue queue, the hash of the spec."""
    extra = {naming.LABEL_ATTEMPT: str(attempt)}
    if spec.get("queueName"):
        extra[naming.LABEL_KUEUE_QUEUE] = spec["queueName"]
    meta = _meta(ftj, name, extra)
    meta["annotations"][naming.ANNOTATION_SPEC_HASH] = spec_hash(spec)
    return meta


def job(ftj: dict, attempt: int, spec: dict, *, image: str, deadline_seconds: int | None = None,
        runner: RunnerPod | None = None) -> dict:
    """The batch/v1 Job of one attempt on one node. `spec` is the spec to run (the original one on retries).
    Several nodes: controller/jobset.py, with the same pod template."""
    meta = attempt_meta(ftj, job_name(ftj["metadata"]["name"], attempt), attempt, spec)
    job_spec: dict = {"backoffLimit": 0, "template": pod_template(ftj, attempt, spec, image=image, runner=runner)}
    if deadline_seconds:
        job_spec["activeDeadlineSeconds"] = int(deadline_seconds)
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


def pod_template(ftj: dict, attempt: int, spec: dict, *, image: str, env: list[dict] | tuple = (),
                 runner: RunnerPod | None = None) -> dict:
    """The runner pod of an attempt (of each node's pod with several): identity, security, volumes, the job
    file. `env`: variables added before the spec's own (the nodes' rendezvous, controller/jobset.py). `runner`:
    the admin's additions (runner.podTemplate, runner.modelCache; controller/podtemplate.py), merged last, with
    the job's spec.volumes and spec.modelCache."""
    md = ftj["metadata"]
    meta = attempt_meta(ftj, md["name"], attempt, spec)
    manifest = json.dumps(runner_manifest(ftj, spec), sort_keys=True, separators=(",", ":"))
    pod_meta = {"labels": dict(meta["labels"]),
                "annotations": {naming.ANNOTATION_JOB_NAME: md["name"], naming.ANNOTATION_SPEC: manifest}}

    pod_spec: dict = {
        "restartPolicy": "Never",
        "serviceAccountName": spec.get("serviceAccountName") or identity_name(md["name"]),
        # The status sink (runner/report/kube_status.py) patches this job's status with the pod's token; under the
        # controller it always reports, so the token is always mounted - it is allowed nothing else.
        "automountServiceAccountToken": True,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "securityContext": {
            "runAsNonRoot": True, "runAsUser": RUNNER_UID, "runAsGroup": RUNNER_UID, "fsGroup": RUNNER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container(ftj, spec, image, attempt, extra_env=env)],
        "volumes": [
            {"name": "job", "downwardAPI": {"items": [{
                "path": "job.yaml",
                "fieldRef": {"fieldPath": f"metadata.annotations['{naming.ANNOTATION_SPEC}']"}}]}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
            {"name": "scratch", "emptyDir": {}},  # HOME (and so every cache under it), TMPDIR, the work dir
            {"name": "tmp", "emptyDir": {}},  # libraries that write to /tmp whatever TMPDIR says
        ],
    }
    gcs = spec.get("gcsSecretRef")
    if gcs:  # readable by the runner's group only (fsGroup)
        pod_spec["volumes"].append({"name": GCS_KEY_VOLUME, "secret": {
            "secretName": gcs["name"], "defaultMode": 0o440,
            "items": [{"key": gcs.get("key") or "key.json", "path": GCS_KEY_FILE.rsplit("/", 1)[1]}]}})
    if spec.get("imagePullSecrets"):
        pod_spec["imagePullSecrets"] = [{"name": n} for n in spec["imagePullSecrets"]]
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        if spec.get(key):
            pod_spec[key] = spec[key]
    return (runner or RunnerPod()).apply({"metadata": pod_meta, "spec": pod_spec}, spec)


def container(ftj: dict, spec: dict, image: str, attempt: int, *, extra_env: list[dict] | tuple = ()) -> dict:
    md = ftj["metadata"]
    res = spec.get("resources") or {}
    requests: dict = {}
    limits: dict = {}
    gpus = int(res.get("gpus", 1))
    if gpus:
        gpu = res.get("gpuResourceName") or "nvidia.com/gpu"
        requests[gpu] = limits[gpu] = str(gpus)
    if res.get("cpu"):
        requests["cpu"] = str(res["cpu"])
    if res.get("memory"):
        requests["memory"] = limits["memory"] = str(res["memory"])
    env = [
        {"name": names.ENV_JOB_NAME, "value": md["name"]},
        {"name": names.ENV_JOB_NAMESPACE, "value": md["namespace"]},
        {"name": names.ENV_ATTEMPT, "value": str(attempt)},
        {"name": names.ENV_POD_NAME, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": names.ENV_WORK_DIR, "value": f"{SCRATCH}/work"},
        {"name": "HOME", "value": f"{SCRATCH}/home"},  # caches (Hugging Face, Triton, matplotlib) go under it
        {"name": "TMPDIR", "value": SCRATCH},
        *extra_env,
    ]
    hf = spec.get("hfTokenSecretRef")
    if hf:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": hf["name"],
                                                                       "key": hf.get("key") or "token"}}})
    s3 = spec.get("s3SecretRef")
    if s3:
        for key, optional in AWS_KEYS:
            ref: dict = {"name": s3["name"], "key": key}
            if optional:
                ref["optional"] = True
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    mounts = [
        {"name": "job", "mountPath": JOB_FILE_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "scratch", "mountPath": SCRATCH},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if spec.get("gcsSecretRef"):
        env.append({"name": names.ENV_GCS_CREDENTIALS, "value": GCS_KEY_FILE})
        mounts.append({"name": GCS_KEY_VOLUME, "mountPath": GCS_KEY_DIR, "readOnly": True})
    env += list(spec.get("env") or [])
    return {
        "name": naming.RUNNER_CONTAINER,
        "image": spec.get("image") or image,
        "command": list(RUNNER_COMMAND),
        "env": env,
        "resources": {k: v for k, v in (("requests", requests), ("limits", limits)) if v},
        "terminationMessagePath": names.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "workingDir": SCRATCH,  # the image's own directory is read-only
        # Nothing but the volumes below is writable: the image (its code and libraries) stays as built.
        "securityContext": {"allowPrivilegeEscalation": False, "privileged": False, "runAsNonRoot": True,
                            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "volumeMounts": mounts,
    }


def event(ftj: dict, type_: str, reason: str, message: str, now: str, component: str) -> dict:
    md = ftj["metadata"]
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{md['name'][:200]}.", "namespace": md["namespace"]},
        "involvedObject": {"apiVersion": names.API_VERSION, "kind": names.KIND, "name": md["name"],
                           "namespace": md["namespace"], "uid": md["uid"]},
        "type": type_, "reason": reason, "message": message[:1024],
        "source": {"component": component}, "reportingComponent": component,
        "firstTimestamp": now, "lastTimestamp": now, "count": 1,
    }
