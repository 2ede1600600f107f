"""How the controller names and marks what it creates for a FineTuneJob: labels and annotations, the
attempt Jobs' and the runner identity's names, the hash of the spec an attempt runs, and the job file the
runner reads. Pure functions of the FineTuneJob."""
from __future__ import annotations

import hashlib
import json

from runner.api import names
from runner.api.parse import manifest
from runner.api.spec import FineTuneJobSpec
from runner.api.status import MUTABLE_SPEC_FIELDS

# Labels and annotations the controller puts on its children.
LABEL_JOB = f"{names.GROUP}/job"  # the FineTuneJob's name (truncated to 63 characters)
LABEL_JOB_UID = f"{names.GROUP}/job-uid"  # the FineTuneJob's uid: what children are selected by
LABEL_ATTEMPT = f"{names.GROUP}/attempt"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
ANNOTATION_JOB_NAME = f"{names.GROUP}/job-name"  # the full FineTuneJob name (labels are limited to 63)
ANNOTATION_SPEC = f"{names.GROUP}/spec"  # the runner's job file (JSON), mounted through the downward API
ANNOTATION_SPEC_HASH = f"{names.GROUP}/spec-hash"
ANNOTATION_DEFAULT_RESOURCES = f"{names.GROUP}/default-resources"  # what runner.defaultResources gave a pod
MANAGED_BY = "finetune-controller"
RUNNER_CONTAINER = "runner"


def short_hash(text: str, n: int = 6) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def child_name(ftj_name: str, suffix: str, limit: int = 63) -> str:
    """`<ftj>-<suffix>`, deterministic, at most `limit` characters (a hash keeps long names unique)."""
    name = f"{ftj_name}-{suffix}"
    if len(name) <= limit:
        return name
    keep = limit - len(suffix) - 8
    return f"{ftj_name[:keep].rstrip('-.')}-{short_hash(ftj_name)}-{suffix}"


def job_name(ftj_name: str, attempt: int) -> str:
    # Pods get the label job-name=<job>, and label values are limited to 63 characters.
    return child_name(ftj_name, str(attempt), 63)


def identity_name(ftj_name: str) -> str:
    """The runner's ServiceAccount, Role and RoleBinding."""
    return child_name(ftj_name, "runner", 253)


def label_value(name: str) -> str:
    return name if len(name) <= 63 else f"{name[:56].rstrip('-.')}-{short_hash(name)}"


def spec_hash(spec: dict) -> str:
    """Hash of the fields that may not change once the job exists (normalized through the pydantic model)."""
    try:
        doc = FineTuneJobSpec.model_validate(spec).model_dump(by_alias=True, mode="json")
    except Exception:  # an invalid spec still has a hash
        doc = spec
    fixed = {k: v for k, v in doc.items() if k not in MUTABLE_SPEC_FIELDS}
    return hashlib.sha256(json.dumps(fixed, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def runner_manifest(ftj: dict, spec: dict) -> dict:
    """The job file the runner reads: a FineTuneJob manifest (the runner ignores the cluster-only fields)."""
    md = ftj["metadata"]
    return manifest(md["name"], spec, namespace=md.get("namespace"))
