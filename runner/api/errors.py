"""The runner's two kinds of failure, and the exit codes and reasons they map to.

Every failure the runner knows about is a RunnerError: either *permanent* (running the same job again
cannot help: a bad spec, missing credentials, data that does not match the format, an out-of-memory) or
*retryable* (a network error, a 5xx from a store, a preemption). The exit code tells a supervisor (the
controller, a shell loop) which one it was without parsing any text; `reason` is one of a closed set the
controller shows as `status.reason` (runner/api/status.py).
"""
from __future__ import annotations

import os
import re

from runner.api.names import ENV_WORK_DIR

from runner.api.status import (  # noqa: F401 - re-exported: the reasons a RunnerError carries
    DOWNLOAD_FAILED,
    INVALID_SPEC,
    MERGE_FAILED,
    OUT_OF_MEMORY,
    TRAINING_FAILED,
    UPLOAD_FAILED,
)

# Exit codes. Kubernetes reports the container's exit code; the controller maps them back.
EXIT_OK = 0
EXIT_UNEXPECTED = 1  # a bug or an unclassified error: treated as retryable
EXIT_PERMANENT = 2  # invalid spec, missing credentials, data that does not match, auth refused
EXIT_OUT_OF_MEMORY = 3  # CUDA OOM: permanent until a memory knob changes
EXIT_RETRYABLE = 75  # EX_TEMPFAIL: network, store 5xx or timeout, preemption (SIGTERM)
# Deliberately permanent (2): a model source that is not a model, a template error, a seed out of range, a disk
# full in the work dir (`disk_full`). Deliberately retryable (75): a store that cannot be reached, answers 5xx,
# or does not finish an operation within FINETUNE_STORE_TIMEOUTS (runner/store/timeouts.py).


class RunnerError(Exception):
    """A failure with a reason, a message that says what to fix, and whether a retry can help."""

    retryable: bool = False
    exit_code: int = EXIT_PERMANENT

    def __init__(self, message: str, *, reason: str = TRAINING_FAILED):
        super().__init__(redact(message))
        self.reason = reason

    @property
    def message(self) -> str:
        return str(self)


class PermanentError(RunnerError):
    """Running the same job again gives the same failure: the user must change something."""


class RetryableError(RunnerError):
    """A transient failure (network, store, preemption): the same job may succeed when run again."""

    retryable = True
    exit_code = EXIT_RETRYABLE


class SpecError(PermanentError):
    """The job spec is invalid. Holds every problem found, each naming its field and the fix."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        text = "invalid FineTuneJob spec:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(text, reason=INVALID_SPEC)


class OutOfMemory(PermanentError):
    exit_code = EXIT_OUT_OF_MEMORY

    def __init__(self, message: str):
        super().__init__(message, reason=OUT_OF_MEMORY)


class Preempted(RetryableError):
    """SIGTERM arrived (node drain, spot reclaim, `kubectl delete`): a checkpoint was saved if possible."""

    def __init__(self, message: str = "received SIGTERM; stopped after saving a checkpoint"):
        super().__init__(message, reason=TRAINING_FAILED)


# Environment variables whose values must never appear in logs, status or events.
SECRET_ENV_VARS = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "MLFLOW_TRACKING_PASSWORD",  # experiment trackers (runner/report/tracking.py)
    "MLFLOW_TRACKING_TOKEN",
    "WANDB_API_KEY",
)
_BEARER = re.compile(r"(?i)(bearer\s+|token=|authorization:\s*)[^\s'\"&]+")
_HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{8,}")
_UNPRINTABLE = re.compile("[\x00\ud800-\udfff]")  # a NUL byte or an unpaired surrogate (no UTF-8 for it)


def redact(text: str) -> str:
    """Remove secret values (from the environment, bearer tokens, hf_ tokens) from a message, and write NUL
    bytes and unpaired surrogates as escapes, so that any message can be printed and encoded."""
    text = _UNPRINTABLE.sub(lambda m: ascii(m.group())[1:-1], str(text))
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    text = _BEARER.sub(lambda m: m.group(1) + "***", text)
    return _HF_TOKEN.sub("hf_***", text)


_DISK_FULL = re.compile(r"No space left on device|StorageFull|Disk quota exceeded")


def disk_full(exc: BaseException, work_dir, reason: str) -> PermanentError | None:
    """The failure to report when `exc` (not already a RunnerError) comes from a full disk or quota (ENOSPC,
    EDQUOT - also as text, as torch and safetensors report it), else None. Permanent, like an out-of-memory:
    the same job needs the same space again, and only freeing space or a bigger volume helps."""
    import errno

    if isinstance(exc, RunnerError):
        return None
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        by_errno = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
        if by_errno or _DISK_FULL.search(str(e)):
            where = getattr(e, "filename", None) if isinstance(e, OSError) else None
            work = os.path.abspath(str(work_dir))
            inside = not where or os.path.abspath(str(where)).startswith(work + os.sep)
            place = (f"the work dir {work} ({ENV_WORK_DIR})" if inside else f"{where} (outside the work dir {work})")
            return PermanentError(
                f"no space left on device in {place}: {type(e).__name__}: {str(e)[:200]}; free space there, or set "
                f"{ENV_WORK_DIR} to a directory on a larger volume (it holds the downloaded model and data, the "
                "trainer's checkpoints and the merged model before publishing; in a cluster, give the runner's "
                "node more ephemeral storage)", reason=reason)
        e = e.__cause__ or e.__context__
    return None
