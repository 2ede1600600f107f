"""The contract of a FineTuneJob's `status`: its phases, reasons, condition types and shape.

Status ownership (one writer per field, so neither side can clobber the other):

* the runner (runner/report/kube_status.py, through the job's own least-privilege identity) writes only
  `status.runner` (its phase, pod and attempt), `status.progress`, `status.lastCheckpoint` and
  `status.published` (RUNNER_STATUS_FIELDS);
* the controller writes every other field, rebuilt from what it observes on every pass (the attempt
  Jobs, their Pods, the Pods' termination messages, and `status.runner` of the live pod).

`FineTuneJobStatus` documents that contract; the CRD's status schema is generated from it.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

# ------------------------------------------------------------------------------------------ phases
# The runner's phases, in the order one run goes through them (its `phase` events, status.runner.phase).
VALIDATING = "Validating"  # the spec, the sources' reachability, credentials, the destination
DOWNLOADING = "Downloading"  # data, then the model
TRAINING = "Training"
MERGING = "Merging"  # the adapter into a 16-bit copy of the base
UPLOADING = "Uploading"  # the result to output.destination
# Where a job ends (the runner's result event, status.phase).
SUCCEEDED = "Succeeded"
FAILED = "Failed"
# The controller's own phases around an attempt.
PENDING = "Pending"  # no runner pod is running yet (scheduling, image pull, retry backoff)
RUNNING = "Running"  # a runner pod runs and has not reported a phase yet
SUSPENDED = "Suspended"  # spec.suspend is true and no runner pod is left

RUNNER_STEPS = (VALIDATING, DOWNLOADING, TRAINING, MERGING, UPLOADING)
RUNNER_PHASES = (*RUNNER_STEPS, SUCCEEDED, FAILED)  # what the runner reports
ACTIVE_RUNNER_PHASES = (DOWNLOADING, TRAINING, MERGING, UPLOADING)  # shown as status.phase while they last
PHASES = (PENDING, RUNNING, *ACTIVE_RUNNER_PHASES, SUCCEEDED, FAILED, SUSPENDED)  # status.phase
TERMINAL_PHASES = (SUCCEEDED, FAILED)

# ----------------------------------------------------------------------------------------- reasons
# Why a job failed (status.reason). The runner's reasons come from its RunnerError; the controller's from
# what it observes of the attempt's Job and Pods.
INVALID_SPEC = "InvalidSpec"  # the spec (or a Secret/ConfigMap it names) is wrong: fix it
DOWNLOAD_FAILED = "DownloadFailed"  # the model or data could not be read
TRAINING_FAILED = "TrainingFailed"  # training failed (also: a failure of unknown origin)
MERGE_FAILED = "MergeFailed"  # merging failed its checks
UPLOAD_FAILED = "UploadFailed"  # the result could not be published
OUT_OF_MEMORY = "OutOfMemory"  # CUDA OOM (exit 3), or the pod was OOMKilled
UNSCHEDULABLE = "Unschedulable"  # no node fits the pod (a waiting reason, not a failure by itself)
IMAGE_PULL_FAILED = "ImagePullFailed"  # the runner image cannot be pulled
DEADLINE_EXCEEDED = "DeadlineExceeded"  # spec.activeDeadlineSeconds passed
BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"  # more retryable failures than spec.backoffLimit
INVALID_STATUS = "InvalidStatus"  # the status held fields out of bounds or of the wrong shape (the runner's
#                                   token, or an admin, wrote them through the status subresource): job stopped

RUNNER_REASONS = (INVALID_SPEC, DOWNLOAD_FAILED, TRAINING_FAILED, MERGE_FAILED, UPLOAD_FAILED, OUT_OF_MEMORY)
REASONS = (INVALID_SPEC, UNSCHEDULABLE, IMAGE_PULL_FAILED, OUT_OF_MEMORY, DOWNLOAD_FAILED, TRAINING_FAILED,
           MERGE_FAILED, UPLOAD_FAILED, DEADLINE_EXCEEDED, BACKOFF_LIMIT_EXCEEDED,
           INVALID_STATUS)  # status.reason
# The reason a failure of unknown origin gets, by the runner phase it happened in.
PHASE_REASON = {VALIDATING: INVALID_SPEC, DOWNLOADING: DOWNLOAD_FAILED, TRAINING: TRAINING_FAILED,
                MERGING: MERGE_FAILED, UPLOADING: UPLOAD_FAILED}

# ------------------------------------------------------------------------------------- conditions
# status.conditions: one of each, True or False. A condition's reason is the phase (or the failure's reason).
CONDITION_SUCCEEDED = SUCCEEDED
CONDITION_FAILED = FAILED
CONDITION_RUNNING = RUNNING  # True in Running and in every active runner phase
CONDITION_SUSPENDED = SUSPENDED
CONDITION_TYPES = (CONDITION_SUCCEEDED, CONDITION_FAILED, CONDITION_RUNNING, CONDITION_SUSPENDED)

# Events the controller records beside its phase transitions.
EVENT_ATTEMPT_FAILED = "AttemptFailed"  # a retryable failure; another attempt follows
EVENT_POD_REPLACED = "PodReplaced"  # a runner pod was deleted and its Job made a new one for the same attempt

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
    resumed_from: "Checkpoint | None" = Field(None, description="The checkpoint this attempt resumed from.")
    updated: str | None = None


class Checkpoint(_Status):
    name: str | None = Field(None, description="Checkpoint name in the durable store, e.g. checkpoint-300.")
    step: int | None = None
    time: str | None = None


class Published(_Status):
    """Whose weights the output holds, written by the runner when training ends (output.publish)."""

    step: int | None = Field(None, description="The training step whose weights are merged and published.")
    choice: Literal["best", "last"] | None = Field(
        None, description="best: the step with the lowest eval loss; last: the last step.")
    eval_loss: float | None = Field(None, description="The eval loss of the published weights, if evaluated.")
    reason: str | None = Field(None, description="Why this step: the rule, the eval losses, early stopping.")


class Estimate(_Status):
    """What the job's training is expected to take before any GPU is held (runner/api/cost.py says how): the
    controller's from the spec alone at Pending; `runner preview` and the run's summary add the data and the plan."""

    summary: str = Field(description="Training time and GPU-hours, e.g. `12m, 0.2 h100-hours`, or `unknown`.")
    why: str | None = Field(None, description="What is unknown, where the summary is `unknown`.")
    gpu: str = Field(description="The GPU kind estimated for, e.g. h100.")
    gpu_source: str = Field(description="Why that kind: the spec's nodeSelector, --gpu, or assumed.")
    gpus: int = Field(description="GPUs over every node.")
    model: str = Field(description="Where the model's shape came from.")
    steps: int | None = Field(None, description="Optimizer steps (unknown with epochs before the data is read).")
    tokens: int | None = Field(None, description="Tokens through the model over the run (padding included).")
    tokens_per_epoch: int | None = Field(None, description="Tokens per epoch after packing (from the data).")
    flops_per_token: int | None = Field(None, description="Training FLOPs per token (forward and backward).")
    tokens_per_second: float | None = Field(None, description="Expected tokens per second over every GPU.")
    seconds: float | None = Field(None, description="Expected seconds of training steps (no loading or merging).")
    gpu_hours: float | None = Field(None, description="seconds x GPUs / 3600.")
    row: str | None = Field(None, description="The measured throughput row it scales from.")
    row_source: str | None = Field(None, description="The benchmark result the row comes from.")
    distance: str | None = Field(None, description="How far this job's shape is from the row's.")
    mode: str | None = Field(None, description="The memory mode planned (none, layer, layer, host, ...).")
    peak_gib: float | None = Field(None, description="The planned peak GPU memory, GiB.")
    notes: list[str] = Field(default_factory=list, description="What the estimate assumed.")


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
    published: Published | None = Field(
        None, description="The step whose weights are published, and why (output.publish, training.earlyStopping).")
    estimate: Estimate | None = Field(
        None, description="The expected training time and GPU-hours, from the spec alone (`runner preview` reads "
        "the data too).")


# What the runner writes (everything else is the controller's), by alias.
RUNNER_STATUS_FIELDS = ("progress", "runner", "lastCheckpoint", "published")
CONTROLLER_STATUS_FIELDS = tuple(
    f.alias for f in FineTuneJobStatus.model_fields.values() if f.alias not in RUNNER_STATUS_FIELDS
)
