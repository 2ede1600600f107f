"""The names both sides of the FineTuneJob contract use: the API's group, version and resource names, the
environment variables the controller sets in (and the runner reads from) a runner pod, and the file the
runner leaves its result in. Each is written here once; everything else imports it."""
from __future__ import annotations

# ------------------------------------------------------------------------------------------ the API
GROUP = "finetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"  # a manifest's `apiVersion`
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ("ftj",)
CRD_NAME = f"{PLURAL}.{GROUP}"
STATUS_SUBRESOURCE = f"{PLURAL}/status"  # what the runner's identity may get and patch

# --------------------------------------------------------------------- the runner pod's environment
# Set by the controller in every runner pod; read by the runner (runner/report/kube_status.py).
ENV_PREFIX = "FINETUNE_"  # every variable below starts with it; a spec's `env` may not use it
ENV_JOB_NAME = "FINETUNE_JOB_NAME"  # the FineTuneJob the pod runs (turns on the status sink)
ENV_JOB_NAMESPACE = "FINETUNE_JOB_NAMESPACE"
ENV_POD_NAME = "FINETUNE_POD_NAME"  # the pod itself (downward API): status.runner.pod
ENV_ATTEMPT = "FINETUNE_ATTEMPT"  # 1, 2, ...: status.runner.attempt
ENV_WORK_DIR = "FINETUNE_WORK_DIR"  # scratch space for downloads and the trainer
# Several nodes (spec.resources.nodes > 1): torchrun's own variables (PET_<FLAG> is the default of its --<flag>).
# The controller sets them in every pod of a JobSet; to run a job on several machines by hand, set them on each
# (README "Several nodes").
ENV_NNODES = "PET_NNODES"  # nodes in the job (overrides spec.resources.nodes)
ENV_NODE_RANK = "PET_NODE_RANK"  # this node: 0 .. nodes-1; node 0 hosts the rendezvous and runs global rank 0
ENV_MASTER_ADDR = "PET_MASTER_ADDR"  # node 0's address as every node reaches it: the c10d rendezvous endpoint
ENV_MASTER_PORT = "PET_MASTER_PORT"  # the rendezvous port on node 0 (default RDZV_PORT)
ENV_LOCAL_ADDR = "PET_LOCAL_ADDR"  # this node's address as the others reach it (node 0: PET_MASTER_ADDR)
RDZV_PORT = 29500  # torchrun's default
# Read by the runner only.
ENV_STATUS_INTERVAL = "FINETUNE_STATUS_INTERVAL"  # seconds between progress patches
ENV_LEASE_WAIT = "FINETUNE_LEASE_WAIT"  # seconds a runner waits for the checkpoint location's lease (runner/store/lease.py)
ENV_TERMINATION_LOG = "FINETUNE_TERMINATION_LOG"  # where the result goes (default TERMINATION_LOG)
ENV_LAUNCHED = "FINETUNE_LAUNCHED"  # set in each rank's environment by the runner's own launcher
ENV_NPROC = "FINETUNE_NPROC"  # processes per node, overriding resources.gpus (CPU tests, debugging)
# Read by the controller only.
ENV_RUNNER_IMAGE = "FINETUNE_RUNNER_IMAGE"  # the operator's runner image

# ------------------------------------------------------------------------------------- the result
# Kubernetes shows this file's content as the container's termination message (4 KiB kept): the runner
# writes its final result event there, the controller reads it back from the pod's status.
TERMINATION_LOG = "/dev/termination-log"
TERMINATION_MESSAGE_LIMIT = 4096
# Limits on every call to a remote store (S3, the Hub), read by the runner (runner/store/timeouts.py):
# "connect=10,read=60,deadline=10800" (seconds; any subset): connecting, waiting for the next byte, and one whole
# store operation (a download, a publish, a checkpoint save), retries included. Past one: exit 75, endpoint named.
ENV_STORE_TIMEOUTS = "FINETUNE_STORE_TIMEOUTS"
# Google Cloud Storage (gs://): the service-account JSON key file google-cloud-storage reads (runner/store/gcs.py).
# The controller mounts spec.gcsSecretRef's key read-only and points this at the file (never the key's contents).
ENV_GCS_CREDENTIALS = "GOOGLE_APPLICATION_CREDENTIALS"
# The shared model cache (runner/store/cache.py): a directory where model downloads land keyed by source and revision,
# complete or absent, so a retry, a resume or the next job on the same base downloads nothing. Set by the
# controller when the admin configures one (chart values runner.modelCache: a PVC mounted at MODEL_CACHE_DIR);
# set it by hand for standalone runs. Unset: no cache (each run downloads into its work dir).
ENV_MODEL_CACHE = "FINETUNE_MODEL_CACHE"
MODEL_CACHE_DIR = "/model-cache"
