"""Bounds on everything the controller reads: every FineTuneJob, every status the runner writes and every
termination message is untrusted input.

Anyone who may create a FineTuneJob, the runner (through its least-privilege token, which may patch its own
job's whole status) and anything that runs in the runner pod (its termination message) can hand the
controller an object of their choosing. The API server accepts JSON nested up to 10,000 levels and objects up
to ~1.5 MB; Python's own JSON parser and printer give up at 1,000 levels. So:

  * the CRD says what it can (`schema_bounds`: maxLength, maxItems, maxProperties; status.metrics holds numbers
    only), so most oversized input is refused by the API server at `kubectl apply` time;
  * the controller process parses anything the API server can store (`raise_recursion_limit`), and the watch
    cache screens each FineTuneJob as it arrives (`screen`): a spec deeper or larger than the bounds is
    replaced by a marker, status fields that are too deep, too large or of the wrong shape are set aside;
  * the reconciler fails that one FineTuneJob (InvalidSpec, or InvalidStatus for a status written through the
    status subresource) and removes the bad status fields; every other job keeps reconciling;
  * a termination message is parsed only when it is short and shallow (`loads_bounded`); otherwise the pod's
    exit code alone decides.
"""
from __future__ import annotations

import json
import math
import sys
import threading
from typing import Any

from pydantic import BaseModel, ValidationError

from runner.api import names, status as contract

# ------------------------------------------------------------------------------------ runtime bounds
# The deepest field a valid spec has is 10 levels below `spec`
# (affinity.podAntiAffinity.preferredDuringScheduling...[].podAffinityTerm.labelSelector.matchExpressions[]
# .values[]); the runner's job file goes into a pod annotation, and annotations are limited to 256 KiB.
SPEC_MAX_DEPTH = 16
SPEC_MAX_BYTES = 128 * 1024
# One status field: the deepest is conditions[].message (2 levels below the field).
STATUS_FIELD_MAX_DEPTH = 4
STATUS_FIELD_MAX_BYTES = 16 * 1024
# The runner's result (its termination message): {"metrics": {"train_loss": 0.5}, ...}.
RESULT_MAX_DEPTH = 4
RESULT_MAX_BYTES = names.TERMINATION_MESSAGE_LIMIT + 1024  # the kubelet keeps 4 KiB; some slack for others
# What the controller copies from the runner's result into its own status fields.
OUTPUT_MAX_LENGTH = 2048
METRICS_MAX_ENTRIES = 64
METRIC_NAME_MAX_LENGTH = 128
# The API server refuses JSON nested deeper than 10,000 levels; a watch event and managedFields add a few.
RECURSION_LIMIT = 25_000
THREAD_STACK_BYTES = 64 * 1024 * 1024

UNTRUSTED = "__untrusted__"  # key of the screening verdict in a cached FineTuneJob (never sent anywhere)

# Status fields the runner writes, and the contract models they must match.
RUNNER_STATUS_MODELS: dict[str, type[BaseModel]] = {
    "progress": contract.Progress, "runner": contract.RunnerReport, "lastCheckpoint": contract.Checkpoint,
    "published": contract.Published}


def raise_recursion_limit() -> None:
    """Let this process parse (json.loads in kopf's watch streams, in the Kubernetes client) any object the
    API server can store, so no object can make a parser raise in a place that stops the whole operator.
    Threads started afterwards get a stack that holds such a parse too."""
    if sys.getrecursionlimit() < RECURSION_LIMIT:
        sys.setrecursionlimit(RECURSION_LIMIT)
    try:
        threading.stack_size(THREAD_STACK_BYTES)
    except (ValueError, RuntimeError):  # pragma: no cover - platforms without a settable stack size
        pass


def measure(value: Any, *, max_depth: int, max_bytes: int, where: str = "") -> str | None:
    """None if `value` is within the bounds, else what is wrong (naming where). Iterative: any depth is fine."""
    stack: list[tuple[Any, int, str]] = [(value, 0, where)]
    size = 0
    while stack:
        v, depth, path = stack.pop()
        if depth > max_depth:
            return f"{path or '(top)'}...: nested deeper than {max_depth} levels"
        if isinstance(v, dict):
            size += 2
            for k, x in v.items():
                size += len(str(k)) + 4
                stack.append((x, depth + 1, f"{path}.{k}" if depth < 6 else path))
        elif isinstance(v, list):
            size += 2
            for i, x in enumerate(v):
                size += 1
                stack.append((x, depth + 1, f"{path}[{i}]" if depth < 6 else path))
        elif isinstance(v, str):
            size += len(v) + 2
        else:
            size += 8
        if size > max_bytes:
            return f"{where or '(top)'}: larger than {max_bytes // 1024} KiB"
    return None


def json_depth_exceeds(text: str, max_depth: int) -> bool:
    """Whether JSON text nests deeper than `max_depth` (a scan, no parse)."""
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > max_depth:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def loads_bounded(text: Any, *, max_bytes: int = RESULT_MAX_BYTES, max_depth: int = RESULT_MAX_DEPTH
                  ) -> tuple[Any, str | None]:
    """(the parsed JSON, None), or (None, why not): too long, too deep, or not JSON."""
    if not isinstance(text, str):
        return None, "not text"
    if len(text) > max_bytes:
        return None, f"longer than {max_bytes} characters"
    if json_depth_exceeds(text, max_depth):
        return None, f"nested deeper than {max_depth} levels"
    try:
        return json.loads(text), None
    except (ValueError, RecursionError):
        return None, "not JSON"


# --------------------------------------------------------------------------------- screening objects
def screen(ftj: dict) -> dict:
    """A FineTuneJob as the controller may use it. A spec out of bounds becomes {} and its problem is recorded
    under UNTRUSTED["spec"]; status fields out of bounds or of the wrong shape are removed and recorded under
    UNTRUSTED["status"] ({field: problem}). Objects within bounds come back unchanged (the same dict)."""
    verdict: dict[str, Any] = {}
    spec = ftj.get("spec")
    if not isinstance(spec, dict):
        verdict["spec"] = "spec: not a mapping"
    else:
        problem = measure(spec, max_depth=SPEC_MAX_DEPTH, max_bytes=SPEC_MAX_BYTES, where="spec")
        if problem:
            verdict["spec"] = problem
    status = ftj.get("status")
    status = status if isinstance(status, dict) else {}
    bad = {}
    for key, value in status.items():
        problem = measure(value, max_depth=STATUS_FIELD_MAX_DEPTH, max_bytes=STATUS_FIELD_MAX_BYTES,
                          where=f"status.{key}")
        if problem is None and key in RUNNER_STATUS_MODELS and value is not None:
            problem = _shape(RUNNER_STATUS_MODELS[key], value, key)
        if problem is None and key == "metrics" and value is not None and clean_metrics(value) != value:
            problem = "status.metrics: holds more than numbers (or too many, or too long names)"
        if problem:
            bad[str(key)] = problem
    if bad:
        verdict["status"] = bad
    if not verdict:
        return ftj
    out = dict(ftj)
    if "spec" in verdict:
        out["spec"] = {}
    out["status"] = {k: v for k, v in status.items() if k not in bad}
    out[UNTRUSTED] = verdict
    return out


def _shape(model: type[BaseModel], value: Any, key: str) -> str | None:
    try:
        model.model_validate(value)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        return f"status.{key}{'.' + loc if loc else ''}: {first['msg']}"
    return None


def problems(ftj: dict) -> dict:
    return ftj.get(UNTRUSTED) or {}


# ----------------------------------------------------------------------------- what the controller writes
def clean_metrics(value: Any) -> dict | None:
    """The runner's final metrics as status.metrics may hold them: numbers by short names, at most 64."""
    if not isinstance(value, dict):
        return None
    out = {}
    for k, v in value.items():
        if len(out) >= METRICS_MAX_ENTRIES:
            break
        if (isinstance(k, str) and 0 < len(k) <= METRIC_NAME_MAX_LENGTH and isinstance(v, (int, float))
                and not isinstance(v, bool) and math.isfinite(v)):
            out[k] = v
    return out


def clean_output(value: Any) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= OUTPUT_MAX_LENGTH else None


# ----------------------------------------------------------------------------------------- CRD bounds
# What the CRD's schema says (OpenAPI v3 keywords every supported API server enforces; structural schemas
# cannot bound the depth of a free-form field, so affinity, tolerations and env items are bounded by
# maxProperties here and by SPEC_MAX_DEPTH in the controller).
STRING_MAX_LENGTH = 4096
LONG_TEXT_MAX_LENGTH = 16 * 1024  # prompts and templates
LIST_MAX_ITEMS = 64
MAP_MAX_PROPERTIES = 64
SCHEMA_BOUNDS: dict[str, dict] = {  # by path below spec/status; `[]` is a list's items
    "spec.dataset.template.text": {"maxLength": LONG_TEXT_MAX_LENGTH},
    "spec.dataset.template.prompt": {"maxLength": LONG_TEXT_MAX_LENGTH},
    "spec.dataset.template.completion": {"maxLength": LONG_TEXT_MAX_LENGTH},
    "spec.evalPrompts[]": {"maxLength": LONG_TEXT_MAX_LENGTH},
    "spec.image": {"maxLength": 512},
    "spec.serviceAccountName": {"maxLength": 253},
    "spec.priorityClassName": {"maxLength": 253},
    "spec.queueName": {"maxLength": 253},
    "spec.imagePullSecrets": {"maxItems": 16},
    "spec.imagePullSecrets[]": {"maxLength": 253},
    "spec.nodeSelector": {"maxProperties": 32},
    "spec.nodeSelector.*": {"maxLength": 63},
    "spec.tolerations": {"maxItems": 32},
    "spec.tolerations[]": {"maxProperties": 5},  # key, operator, value, effect, tolerationSeconds
    "spec.affinity": {"maxProperties": 3},  # nodeAffinity, podAffinity, podAntiAffinity
    "spec.env": {"maxItems": 128},
    "spec.env[]": {"maxProperties": 3},  # name, value, valueFrom
    "status.conditions": {"maxItems": 8},
    "status.metrics": {"maxProperties": METRICS_MAX_ENTRIES},
}


def schema_bounds(node: dict, path: str) -> dict:
    """`node` (a structural schema) with a maxLength on every string, a maxItems on every list and a
    maxProperties on every map that has none: SCHEMA_BOUNDS where it names the path, defaults elsewhere."""
    out = dict(node)
    out.update(SCHEMA_BOUNDS.get(path, {}))
    kind = out.get("type")
    if kind == "string" and "enum" not in out and "format" not in out:
        out.setdefault("maxLength", STRING_MAX_LENGTH)
    elif kind == "array":
        out.setdefault("maxItems", LIST_MAX_ITEMS)
        out["items"] = schema_bounds(out["items"], path + "[]")
    elif kind == "object":
        if "properties" in out:
            out["properties"] = {k: schema_bounds(v, f"{path}.{k}") for k, v in out["properties"].items()}
        elif isinstance(out.get("additionalProperties"), dict):
            out.setdefault("maxProperties", MAP_MAX_PROPERTIES)
            out["additionalProperties"] = schema_bounds(out["additionalProperties"], path + ".*")
        else:
            out.setdefault("maxProperties", MAP_MAX_PROPERTIES)
    return out
