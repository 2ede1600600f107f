"""Several nodes: one JobSet (kubernetes-sigs/jobset, jobset.x-k8s.io/v1alpha2) per attempt of a FineTuneJob with
spec.resources.nodes > 1, and how its pods are told apart. Pure functions, plus `available()` (API discovery).

The JobSet has one replicatedJob, `node`: one Indexed Job with parallelism = completions = nodes, so one pod per
node, each with resources.gpus GPUs and the very pod template of a single-node attempt (children.pod_template).
JobSet gives the pods stable DNS names through its headless Service (network.enableDNSHostnames):
`<jobset>-node-0-<i>.<jobset>`, where i is the pod's completion index, read through the downward API from the
annotation the Indexed Job sets. The runner gets them as torchrun's own variables (runner/api/names.py: PET_NNODES,
PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT, PET_LOCAL_ADDR) and starts torchrun with c10d rendezvous hosted by
node 0 (runner/parallel/distributed.py). c10d numbers the nodes by their addresses, and `<jobset>-node-0-0.` sorts before
every other node's, so global rank 0 - the process that reports progress, checkpoints, merges and publishes, and
whose result the controller reads - always runs in node 0's pod.

An attempt fails as a whole: the Job's backoffLimit is 0 and the JobSet's failurePolicy.maxRestarts 0, so the
first pod that fails fails the Job (the Job controller stops the other pods) and the JobSet (condition Failed);
the controller then retries with a new attempt that resumes from the newest checkpoint, as for one node
(controller/attempts.py reads the outcome). Success is the JobSet's condition Completed. Kueue admits the JobSet
as one unit (its queue label is on the JobSet).
"""
from __future__ import annotations

import time

from controller import children, naming
from controller.naming import child_name
from runner.api import names

GROUP = "jobset.x-k8s.io"
VERSION = "v1alpha2"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "JobSet"
PLURAL = "jobsets"
RELEASE = "v0.12.0"  # the JobSet release the tests use the CRD of (tests/controller/testdata/)
INSTALL = ("kubectl apply --server-side -f https://github.com/kubernetes-sigs/jobset/releases/download/"
           f"{RELEASE}/manifests.yaml")

REPLICATED_JOB = "node"
COMPLETED, FAILED = "Completed", "Failed"  # the JobSet's terminal condition types
# Set by JobSet on its Jobs and their pods.
LABEL_JOBSET_NAME = "jobset.sigs.k8s.io/jobset-name"
LABEL_JOBSET_UID = "jobset.sigs.k8s.io/jobset-uid"
# Set by the Indexed Job controller on each pod (an annotation; also a label since Kubernetes 1.28).
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
# The pods' hostnames are DNS labels: <jobset>-node-0-<index>, index up to 63.
NAME_LIMIT = 63 - len(f"-{REPLICATED_JOB}-0-63")


def nodes_of(spec: dict) -> int:
    """spec.resources.nodes (1 when unset or unreadable: a bad value is the spec check's to report)."""
    try:
        return max(1, int(((spec or {}).get("resources") or {}).get("nodes") or 1))
    except (TypeError, ValueError):
        return 1


def name(ftj_name: str, attempt: int) -> str:
    """`<ftj>-<attempt>` as for a Job, kept short enough, and a DNS label (no dots, a letter first) because
    it also names the headless Service and starts every pod's hostname."""
    base = ftj_name.replace(".", "-")
    if not base[:1].isalpha():
        base = f"x{base}"
    if base != ftj_name:  # two FineTuneJobs whose names map to one base keep apart
        base = f"{base[:NAME_LIMIT - 16]}-{naming.short_hash(ftj_name)}"
    return child_name(base, str(attempt), NAME_LIMIT)


def attempt_name(ftj_name: str, attempt: int, spec: dict) -> str:
    """The name of the attempt's Job (one node) or JobSet (several)."""
    return name(ftj_name, attempt) if nodes_of(spec) > 1 else naming.job_name(ftj_name, attempt)


def leader(jobset_name: str) -> str:
    """Node 0's DNS name: its pod's hostname under the JobSet's headless Service (same namespace)."""
    return f"{jobset_name}-{REPLICATED_JOB}-0-0.{jobset_name}"


def env(jobset_name: str, nodes: int) -> list[dict]:
    """torchrun's variables for one pod: the node's rank from its completion index, node 0 as the endpoint."""
    return [
        {"name": names.ENV_NNODES, "value": str(nodes)},
        {"name": names.ENV_NODE_RANK,
         "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}}},
        {"name": names.ENV_MASTER_ADDR, "value": leader(jobset_name)},
        {"name": names.ENV_MASTER_PORT, "value": str(names.RDZV_PORT)},
        # $(VAR) refers to a variable defined above (Kubernetes expands it): this pod's own DNS name
        {"name": names.ENV_LOCAL_ADDR,
         "value": f"{jobset_name}-{REPLICATED_JOB}-0-$({names.ENV_NODE_RANK}).{jobset_name}"},
    ]


def jobset(ftj: dict, attempt: int, spec: dict, *, image: str, deadline_seconds: int | None = None,
           runner=None) -> dict:
    """The JobSet of one attempt. `spec` is the spec to run (the original one on retries)."""
    js_name = name(ftj["metadata"]["name"], attempt)
    nodes = nodes_of(spec)
    job_spec: dict = {
        "parallelism": nodes, "completions": nodes, "completionMode": "Indexed", "backoffLimit": 0,
        "template": children.pod_template(ftj, attempt, spec, image=image, env=env(js_name, nodes), runner=runner),
    }
    if deadline_seconds:
        job_spec["activeDeadlineSeconds"] = int(deadline_seconds)
    return {
        "apiVersion": API_VERSION, "kind": KIND,
        "metadata": children.attempt_meta(ftj, js_name, attempt, spec),
        "spec": {
            "replicatedJobs": [{"name": REPLICATED_JOB, "replicas": 1, "template": {"spec": job_spec}}],
            # the headless Service <jobset>; DNS records before the pods are ready: the rendezvous needs them
            "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
            "failurePolicy": {"maxRestarts": 0},  # the controller retries, resuming from a checkpoint
            "successPolicy": {"operator": "All"},
        },
    }


# --------------------------------------------------------------------------------- reading back
def is_jobset(obj: dict) -> bool:
    return obj.get("kind") == KIND


def nodes_in(js: dict) -> int:
    """How many pods the JobSet runs (its Job's parallelism)."""
    try:
        return int(js["spec"]["replicatedJobs"][0]["template"]["spec"].get("parallelism") or 1)
    except (KeyError, IndexError, TypeError, ValueError):
        return 1


def pod_template_of(obj: dict) -> dict:
    """The pod template of an attempt's Job or JobSet."""
    spec = obj.get("spec") or {}
    if is_jobset(obj):
        try:
            spec = spec["replicatedJobs"][0]["template"]["spec"]
        except (KeyError, IndexError, TypeError):
            return {}
    return spec.get("template") or {}


def owns(js: dict, pod: dict) -> bool:
    """Whether `pod` runs a node of this JobSet (JobSet labels its pods with its name and uid)."""
    labels = pod["metadata"].get("labels") or {}
    md = js["metadata"]
    if labels.get(LABEL_JOBSET_UID):
        return labels[LABEL_JOBSET_UID] == md.get("uid")
    return labels.get(LABEL_JOBSET_NAME) == md["name"]


def node_rank(pod: dict) -> int | None:
    md = pod["metadata"]
    value = (md.get("annotations") or {}).get(COMPLETION_INDEX) or (md.get("labels") or {}).get(COMPLETION_INDEX)
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------- discovery
def refusal(nodes: int, *, disabled: bool = False) -> str:
    if disabled:
        return (f"resources.nodes: {nodes} nodes need JobSet, and this operator runs without it (--no-jobsets; "
                "chart value jobset.enabled: false); set resources.nodes: 1, or enable JobSet")
    return (f"resources.nodes: {nodes} nodes need JobSet ({API_VERSION}), which is not installed in this cluster; "
            f"install JobSet ({INSTALL}) or set resources.nodes: 1")


class Discovery:
    """Whether the API server serves jobset.x-k8s.io/v1alpha2 jobsets. A yes is kept `ttl` seconds; a no is
    asked again each time (JobSet may be installed a moment before the next job), once per job that needs it."""

    def __init__(self, kube, ttl: float = 60.0, clock=time.monotonic):
        self.kube, self.ttl, self.clock = kube, ttl, clock
        self._yes_at: float | None = None

    def available(self) -> bool:
        now = self.clock()
        if self._yes_at is not None and now - self._yes_at < self.ttl:
            return True
        if available(self.kube):
            self._yes_at = now
            return True
        self._yes_at = None
        return False


def available(kube) -> bool:
    """Discovery (allowed to every authenticated user): is the JobSet CRD installed and served?"""
    from kubernetes.client.exceptions import ApiException

    try:
        doc = kube.request("GET", f"/apis/{API_VERSION}")
    except ApiException as e:
        if e.status in (404, 503):
            return False
        raise
    return any(r.get("name") == PLURAL for r in doc.get("resources") or [])
