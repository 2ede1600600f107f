# syntax=docker/dockerfile:1
# Two images from this file (tests/deploy/test_images.py checks the pins against pyproject.toml, and
# tests/deploy/test_versions.py against the table in README "Versions"; tests/e2e builds both and runs them):
#
#   docker build -t finetune-runner .                               # the runner (default target): CUDA, torch
#   docker build --target controller -t finetune-controller .       # the controller: slim, no torch
#
# The runner runs the same FineTuneJob YAML that `kubectl apply` takes (README "Run standalone with docker"):
#
#   docker run --gpus all --ipc=host --read-only --tmpfs /tmp -v "$PWD:/work" -e HF_TOKEN finetune-runner run /work/job.yaml
#
# Credentials come from the environment: HF_TOKEN, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION,
# AWS_ENDPOINT_URL_S3 (MinIO, R2, Ceph). Both images run as uid 1000, the uid the controller gives runner pods,
# and both run with a read-only root filesystem (only /tmp, HOME's caches and /work need to be writable).
#
# Build arguments (the defaults are the production images; CI overrides them to build offline-capable CPU
# images from a Debian base it makes itself, tests/e2e/images.py):
#   CONTROLLER_BASE  any Debian/Ubuntu image with python3 (>= 3.11) and python3-venv; default python:3.12-slim
#   RUNNER_BASE      the runner's base; default CUDA 13.0 (matches torch's cu130 build, and NVIDIA_REQUIRE_CUDA
#                    refuses a host driver too old for it at `docker run`, not mid-training)
#   TORCH, TORCH_INDEX_URL  the torch build and the index it comes from; default the CUDA 13.0 build
#   PIP_FIND_LINKS   optional extra wheel location for every pip install (CI: its local CPU torch wheel)
ARG CONTROLLER_BASE=python:3.12-slim-bookworm
ARG RUNNER_BASE=nvidia/cuda:13.0.0-base-ubuntu24.04

# ------------------------------------------------------------------------------------------ controller
FROM ${CONTROLLER_BASE} AS controller
ARG PIP_FIND_LINKS

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN python3 -m venv /opt/venv \
    && useradd --uid 1000 --user-group --no-create-home --shell /usr/sbin/nologin finetune

# The spec (pydantic, pyyaml) and the `controller` extra, pinned as README "Versions" lists: a layer of its own,
# so that a change to the source rebuilds only the last layer.
RUN pip install --no-cache-dir \
        "pydantic==2.14.3" "pyyaml==6.0.3" \
        "kopf==1.45.2" "kubernetes==37.0.1" "prometheus-client==0.26.0"
COPY pyproject.toml README.md /tmp/src/
COPY runner /tmp/src/runner
COPY controller /tmp/src/controller
RUN pip install --no-cache-dir --no-deps "/tmp/src[controller]" \
    && rm -rf /tmp/src

USER 1000:1000
WORKDIR /tmp
EXPOSE 8080
ENTRYPOINT ["python", "-m", "controller"]
CMD ["run"]

# -------------------------------------------------------------------------------------------- runner
FROM ${RUNNER_BASE} AS runner
ARG PIP_FIND_LINKS

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Python (3.12 on the CUDA base); gcc and the Python headers because Triton (Liger's fused kernels,
# torch.compile) builds a small launcher with the system compiler the first time a kernel runs. uid 1000 is
# taken by the CUDA base's `ubuntu` user.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin finetune \
    && mkdir -p /work && chown 1000:1000 /work

# torch first, from PyTorch's CUDA 13.0 index (a layer of its own: the largest and the least often changed).
ARG TORCH=torch==2.11.0+cu130
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "$TORCH"

# The `runner`, `gpu` and `tracking` extras, pinned to README "Versions" (the GPU stack `python -m bench` ran on,
# H100 and H200); then the source, without dependencies (they are all in the layer above).
# hadolint ignore=DL3059
RUN pip install --no-cache-dir \
        "pydantic==2.14.3" "pyyaml==6.0.3" \
        "transformers==5.17.0" "peft==0.21.0" "bitsandbytes==0.50.2" "trl==1.16.0" "datasets==5.2.0" \
        "accelerate==1.15.0" "huggingface_hub==1.33.0" "tokenizers==0.23.3" "safetensors==0.8.0" \
        "boto3==1.44.5" "google-cloud-storage==3.17.2" "matplotlib==3.11.2" "pandas==2.3.3" "pyarrow==26.0.1" \
        "tensorboard==2.21.0" \
        "liger-kernel==0.8.5" "mlflow-skinny==3.17.2" "wandb==0.31.0"
COPY pyproject.toml README.md /tmp/src/
COPY runner /tmp/src/runner
COPY controller /tmp/src/controller
RUN pip install --no-cache-dir --no-deps "/tmp/src[runner,gpu,tracking]" \
    && rm -rf /tmp/src

USER 1000:1000
WORKDIR /work
# `docker run <image> run /work/job.yaml`; in a cluster the controller runs `python -m runner run` itself.
ENTRYPOINT ["python", "-m", "runner"]
CMD ["--help"]
