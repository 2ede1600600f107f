"""Plain-dict FineTuneJobs, Jobs and Pods as the API server returns them, for the pure status tests."""
from __future__ import annotations

import json

from controller import naming
from runner.api import names
from controller.attempts import format_time

T0 = 1_800_000_000.0  # a fixed "now" for the pure tests
UID = "ftj-uid-1"


def ts(offset: float = 0.0) -> str:
    return format_time(T0 + offset)


def spec(**overrides) -> dict:
    s = {"model": {"source": "hf://org/base"}, "dataset": {"source": "s3://data/train.jsonl"},
         "output": {"destination": "s3://models/out"}, "backoffLimit": 3}
    s.update(overrides)
    return s


def ftj(name: str = "demo", status: dict | None = None, generation: int = 1, **spec_overrides) -> dict:
    return {"apiVersion": names.API_VERSION, "kind": names.KIND,
            "metadata": {"name": name, "namespace": "ns", "uid": UID, "generation": generation,
                         "creationTimestamp": ts(-100)},
            "spec": spec(**spec_overrides), "status": status or {}}


def job(attempt: int = 1, *, complete: bool = False, failed: str | None = None, created: float = -60,
        spec_doc: dict | None = None, name: str = "demo", deleting: bool = False) -> dict:
    from controller.naming import job_name, spec_hash

    conds = []
    if complete:
        conds.append({"type": "Complete", "status": "True", "lastTransitionTime": ts(-1)})
    if failed:
        conds.append({"type": "Failed", "status": "True", "reason": failed, "message": failed,
                      "lastTransitionTime": ts(-1)})
    sd = spec_doc or spec()
    md = {"name": job_name(name, attempt), "namespace": "ns", "uid": f"job-uid-{attempt}",
          "creationTimestamp": ts(created), "labels": {naming.LABEL_ATTEMPT: str(attempt), naming.LABEL_JOB_UID: UID},
          "annotations": {naming.ANNOTATION_SPEC_HASH: spec_hash(sd)},
          "ownerReferences": [{"kind": names.KIND, "uid": UID, "controller": True, "name": name}]}
    if deleting:
        md["deletionTimestamp"] = ts(-1)
    manifest = {"apiVersion": names.API_VERSION, "kind": names.KIND, "metadata": {"name": name}, "spec": sd}
    return {"metadata": md,
            "spec": {"template": {"metadata": {"annotations": {naming.ANNOTATION_SPEC: json.dumps(manifest)}}}},
            "status": {"conditions": conds, "startTime": ts(created)}}


def pod(attempt: int = 1, phase: str = "Pending", *, name: str | None = None, exit_code: int | None = None,
        reason: str | None = None, message: str | dict | None = None, waiting: str | None = None,
        unschedulable: bool = False, pod_reason: str | None = None, started: float = -50,
        finished: float = -2, deleting: bool = False, owner_uid: str | None = None) -> dict:
    cs: dict = {"name": naming.RUNNER_CONTAINER, "state": {}}
    if phase == "Running":
        cs["state"] = {"running": {"startedAt": ts(started)}}
    if exit_code is not None:
        term = {"exitCode": exit_code, "reason": reason or ("Completed" if exit_code == 0 else "Error"),
                "startedAt": ts(started), "finishedAt": ts(finished)}
        if message is not None:
            term["message"] = message if isinstance(message, str) else json.dumps(message)
        cs["state"] = {"terminated": term}
    if waiting:
        cs["state"] = {"waiting": {"reason": waiting, "message": f"{waiting} for image x"}}
    conds = []
    if unschedulable:
        conds.append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                      "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."})
    md = {"name": name or f"demo-{attempt}-abcde", "namespace": "ns", "creationTimestamp": ts(started - 1),
          "labels": {naming.LABEL_JOB_UID: UID},
          "ownerReferences": [{"kind": "Job", "uid": owner_uid or f"job-uid-{attempt}", "controller": True}]}
    if deleting:
        md["deletionTimestamp"] = ts(-1)
    st = {"phase": phase, "conditions": conds, "startTime": ts(started)}
    if cs["state"]:
        st["containerStatuses"] = [cs]
    if pod_reason:
        st["reason"] = pod_reason
    return {"metadata": md, "status": st}


def result(reason: str | None = None, exit_code: int = 0, **fields) -> dict:
    r = {"event": "result", "phase": "Succeeded" if exit_code == 0 else "Failed", "exitCode": exit_code}
    if reason:
        r.update(reason=reason, message=f"{reason} happened", retryable=exit_code not in (2, 3))
    r.update(fields)
    return r
