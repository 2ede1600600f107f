"""The FineTuneJob fields only a cluster acts on: Secrets, volumes, the model cache, resources, scheduling and
the retry policy. The runner ignores them (standalone); the controller turns them into the runner pod.

Also the base of every spec model (Section): camelCase aliases, unknown fields refused, frozen values.
"""
from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel


class Section(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


# -------------------------------------------------------------------------------- cluster-only fields
class SecretKeyRef(Section):
    name: str = Field(description="Secret name in the job's namespace.")
    key: str = Field("token", description="Key inside the Secret.")


class SecretRef(Section):
    name: str = Field(description="Secret name in the job's namespace (standard AWS_* keys).")


class ServiceAccountKeyRef(Section):
    name: str = Field(description="Secret name in the job's namespace.")
    key: str = Field("key.json", pattern=r"^[-._a-zA-Z0-9]+$",
                     description="Key inside the Secret whose value is the service-account JSON key file "
                     "(`kubectl create secret generic gcs-key --from-file=key.json=<the key file>`).")


class VolumeSpec(Section):
    claim_name: str = Field(description="PersistentVolumeClaim in the job's namespace; only one the operator's "
                            "policy allows (policy.volumeClaims).")
    mount_path: str = Field(description="Absolute path in the runner pod, e.g. `/mnt/checkpoints` (then "
                            "`output.checkpoints: /mnt/checkpoints/run-1`); not a system or runner directory.")
    read_only: bool = Field(False, description="Mount it read-only.")
    sub_path: str | None = Field(None, description="A relative path inside the volume to mount instead of its root.")


class ModelCacheSpec(Section):
    claim_name: str = Field(description="PersistentVolumeClaim (in the job's namespace) holding the shared model "
                            "cache for this job, instead of the operator's (chart values runner.modelCache); only "
                            "one the operator's policy allows (policy.modelCacheClaims).")


# An extended resource (what a device plugin advertises): <dotted domain>/<name>. `memory`, `cpu` and the other
# built-in names have no domain; the kubernetes.io domain is Kubernetes' own (refused by the validator below).
EXTENDED_RESOURCE = (r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+/"
                     r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
KUBERNETES_DOMAIN = re.compile(r"^([^/]*\.)?kubernetes\.io/")


class ResourcesSpec(Section):
    gpus: int = Field(1, ge=0, le=64, description="GPUs on each node (one runner pod per node). Standalone too: "
                      "one process per GPU; 0 or 1 runs one process (a GPU if one is visible, else the CPU); more "
                      "than are visible stops the run at once (exit 2).")
    nodes: int = Field(
        1, ge=1, le=64,
        description="Nodes the job spreads over, one runner pod of `gpus` GPUs each. More than 1: one JobSet "
        "(jobset.x-k8s.io, installed separately) per attempt instead of a Job, and torchrun with c10d rendezvous "
        "across the pods (data parallel, or FSDP over every GPU); the JobSet fails as a whole when one pod fails, "
        "and the next attempt resumes from the newest checkpoint, so the output and checkpoints must be where every node reaches them (S3, GCS, the Hub, or a shared volume).",
    )
    cpu: str | None = Field(None, description="CPU request, e.g. `8`.")
    memory: str | None = Field(None, description="Memory request and limit, e.g. `64Gi`.")
    gpu_resource_name: str = Field(
        "nvidia.com/gpu", pattern=EXTENDED_RESOURCE, max_length=253,
        description="Extended resource name of the GPUs: a domain-prefixed name such as `nvidia.com/gpu` or "
        "`amd.com/gpu` (never `cpu`, `memory` or another built-in resource, nor one under kubernetes.io).")

    @field_validator("gpu_resource_name")
    @classmethod
    def _extended(cls, value: str) -> str:
        if KUBERNETES_DOMAIN.match(value):
            raise ValueError(f"{value!r} is a built-in Kubernetes resource, not a GPU's extended resource name; "
                             "write the device plugin's name, e.g. nvidia.com/gpu")
        return value


STORE_MAX_SECONDS = 1e7  # any store limit (runner/api/store_limits.py)


class StoreTimeouts(Section):
    """Tighter limits on this job's calls to remote stores than the cluster's (the chart's runner.storeTimeouts,
    standalone FINETUNE_STORE_TIMEOUTS); values above those are cut to them. The runner applies them, on a cluster and standalone (runner/api/store_limits.py)."""

    connect: float | None = Field(None, gt=0, lt=STORE_MAX_SECONDS, description="Seconds to open a connection.")
    read: float | None = Field(None, gt=0, lt=STORE_MAX_SECONDS,
                               description="Seconds to wait for the next byte of an answer, or to send the next byte.")
    stall: float | None = Field(None, gt=0, lt=STORE_MAX_SECONDS,
                                description="Seconds a request may wait for an answer from its endpoint, retries "
                                "included, before the attempt ends (exit 75, retried).")
    deadline: float | None = Field(None, gt=0, lt=STORE_MAX_SECONDS,
                                   description="Seconds one store operation (a download, a publish, a checkpoint "
                                   "save) may take in all.")


MAX_DEADLINE_SECONDS = 30 * 86400  # a sane bound: far beyond any fine-tune, far below what overflows a deadline


class ClusterFields(Section):
    """Fields only the cluster needs; the runner ignores them."""

    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec, description="Compute for the runner pod (cluster only)."
    )
    image: str | None = Field(None, description="Runner image (default: the operator's).")
    image_pull_secrets: list[str] = Field(default_factory=list, description="Pull secret names.")
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the runner pod must match (cluster only)."
    )
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, description="Pod tolerations, as in a Pod spec (cluster only)."
    )
    affinity: dict[str, Any] | None = Field(None, description="Pod affinity, as in a Pod spec (cluster only).")
    priority_class_name: str | None = Field(None, description="PriorityClass of the runner pod (cluster only).")
    queue_name: str | None = Field(None, description="Kueue LocalQueue (label kueue.x-k8s.io/queue-name).")
    service_account_name: str | None = Field(
        None,
        description="ServiceAccount of the runner pod (default: one made for this job, allowed only to report "
        "this job's status).",
    )
    env: list[dict[str, Any]] = Field(default_factory=list, description="Extra container env vars.")
    hf_token_secret_ref: SecretKeyRef | None = Field(None, description="Secret holding HF_TOKEN.")
    s3_secret_ref: SecretRef | None = Field(None, description="Secret holding AWS_* variables.")
    gcs_secret_ref: ServiceAccountKeyRef | None = Field(
        None, description="Secret holding a Google Cloud service-account JSON key for `gs://` places: mounted "
        "read-only in the runner pod, GOOGLE_APPLICATION_CREDENTIALS names the file (never the key in the env). "
        "The service account needs roles/storage.objectAdmin on the buckets. Unset: the pod's own identity "
        "(GKE Workload Identity).")
    backoff_limit: int = Field(3, ge=0, description="Retries after retryable failures.")
    active_deadline_seconds: int | None = Field(
        None, ge=1, le=MAX_DEADLINE_SECONDS, description="Fail with DeadlineExceeded when the job has been running "
        "this long (counted from status.startTime, across retries); at most 30 days (2592000).",
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete the job's Jobs, Pods and runner identity this long after it finished "
        "(the FineTuneJob and its status stay).",
    )
    suspend: bool = Field(
        False, description="true stops the runner (it saves a checkpoint); false again resumes from that checkpoint."
    )
    volumes: list[VolumeSpec] = Field(
        default_factory=list, description="PersistentVolumeClaims mounted into the runner pods, e.g. for a local "
        "`output.checkpoints` or `output.destination` (cluster only; policy.volumeClaims).")
    model_cache: ModelCacheSpec | None = Field(
        None, description="The model cache volume of this job (cluster only; default: the operator's, if any).")
    store_timeouts: StoreTimeouts | None = Field(
        None, description="Limits on this job's calls to S3, GCS and the Hub, tighter than the cluster's (chart "
        "value runner.storeTimeouts; standalone FINETUNE_STORE_TIMEOUTS): a frozen store ends the attempt (exit "
        "75, retried) instead of holding the GPU.")


# ------------------------------------------------------------------------------------------ the job
