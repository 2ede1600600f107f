"""Names of the FineTuneJob API and the contract of its `status`.

Status ownership (one writer per field, so neither side can clobber the other):

* the runner (runner/kube_status.py, through the job's own least-privilege identity) writes only
  `status.runner` (its phase, pod and attempt), `status.progress` and `status.lastCheckpoint`;
* the controller writes every other field, rebuilt from what it observes on every pass (the attempt
  Jobs, their Pods, the Pods' termination messages, and `status.runner` of the live pod).

`FineTuneJobStatus` documents that contract; the CRD's status schema is generated from it.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from runner.spec import API_GROUP, API_VERSION, KIND

GROUP = API_GROUP
VERSION = API_VERSION
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]
CRD_NAME = f"{PLURAL}.{GROUP}"
API_VERSION_FULL = f"{GROUP}/{VERSION}"
__all__ = ["GROUP", "VERSION", "KIND", "PLURAL"]

# Labels and annotations the controller puts on its children.
LABEL_JOB = "finetune.dev/job"  # the FineTuneJob's name (truncated to 63 characters)
LABEL_JOB_UID = "finetune.dev/job-uid"  # the FineTuneJob's uid: what children are selected by
LABEL_ATTEMPT = "finetune.dev/attempt"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
ANNOTATION_JOB_NAME = "finetune.dev/job-name"  # the full FineTuneJob name (labels are limited to 63)
ANNOTATION_SPEC = "finetune.dev/spec"  # the runner's job file (JSON), mounted through the downward API
ANNOTATION_SPEC_HASH = "finetune.dev/spec-hash"
MANAGED_BY = "finetune-controller"
RUNNER_CONTAINER = "runner"

# Phases and reasons (the closed sets of the status contract).
PENDING, RUNNING, SUCCEEDED, FAILED, SUSPENDED = "Pending", "Running", "Succeeded", "Failed", "Suspended"
RUNNER_PHASES = ("Downloading", "Training", "Merging", "Uploading")
PHASES = (PENDING, RUNNING, *RUNNER_PHASES, SUCCEEDED, FAILED, SUSPENDED)
TERMINAL_PHASES = (SUCCEEDED, FAILED)

REASONS = (
    "InvalidSpec",
    "Unschedulable",
    "ImagePullFailed",
    "OutOfMemory",
    "DownloadFailed",
    "TrainingFailed",
    "MergeFailed",
    "UploadFailed",
    "DeadlineExceeded",
    "BackoffLimitExceeded",
)

# Spec fields that may change while the job runs (run policy). Everything else is fixed at creation.
MUTABLE_SPEC_FIELDS = ("suspend", "backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished")


# ------------------------------------------------------------------------------------- status schema
class _Status(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Condition(_Status):
    """A metav1.Condition."""

    type: str = Field(description="Succeeded, Failed, Running or Suspended.")
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(description="CamelCase reason of the last transition.")
    message: str | None = None
    last_transition_time: str = Field(description="When the status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, description="metadata.generation the condition is based on.")


class Progress(_Status):
    """Live training progress, written by the runner while it trains."""

    step: int | None = Field(None, description="Optimizer steps done.")
    total_steps: int | None = Field(None, description="Optimizer steps in the whole run.")
    percent: int | None = Field(None, description="step / totalSteps in percent.")
    summary: str | None = Field(None, description="`step/totalSteps (percent%)`, for `kubectl get`.")
    epoch: float | None = None
    loss: float | None = Field(None, description="Training loss at the last report.")
    eval_loss: float | None = Field(None, description="Evaluation loss at the last evaluation.")
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    eta: str | None = Field(None, description="Estimated end of training (RFC 3339).")
    updated: str | None = Field(None, description="When the runner last reported (RFC 3339).")


class RunnerReport(_Status):
    """What the runner last said about itself; only trusted while `pod` is the job's live pod."""

    phase: str | None = Field(None, description="Validating, Downloading, Training, Merging, Uploading, ...")
    pod: str | None = Field(None, description="The pod the runner runs in.")
    attempt: int | None = None
    result: str | None = Field(None, description="Succeeded or Failed, once the runner has finished.")
    updated: str | None = None


class Checkpoint(_Status):
    name: str | None = Field(None, description="Checkpoint name in the durable store, e.g. checkpoint-300.")
    step: int | None = None
    time: str | None = None


class FineTuneJobStatus(_Status):
    """The status contract of a FineTuneJob."""

    phase: Literal[PHASES] | None = Field(None, description="Pending, Running, Downloading, Training, Merging, "  # type: ignore[valid-type]
                                          "Uploading, Succeeded, Failed or Suspended.")
    reason: Literal[REASONS] | None = Field(None, description="Why the job failed (or why it waits).")  # type: ignore[valid-type]
    message: str | None = Field(None, description="Human-readable detail of the reason.")
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = Field(None, description="metadata.generation this status is based on.")
    attempt: int | None = Field(None, description="The current (or last) attempt, from 1.")
    failed_attempts: int | None = Field(None, description="Attempts that failed with a retryable error.")
    job_name: str | None = Field(None, description="The batch/v1 Job of the current attempt.")
    start_time: str | None = Field(None, description="When the first attempt on record started.")
    completion_time: str | None = Field(None, description="When the job succeeded or failed.")
    output: str | None = Field(None, description="Where the model went (from the runner's result).")
    metrics: dict[str, Any] | None = Field(None, description="Final training metrics from the runner's result.")
    progress: Progress | None = None
    runner: RunnerReport | None = None
    last_checkpoint: Checkpoint | None = Field(None, description="The newest durable checkpoint.")


CONTROLLER_STATUS_FIELDS = tuple(
    f.alias for n, f in FineTuneJobStatus.model_fields.items() if n not in ("progress", "runner", "last_checkpoint")
)
RUNNER_STATUS_FIELDS = ("progress", "runner", "lastCheckpoint")
