# syntax=docker/dockerfile:1
# Two images from this file (tests/deploy/test_images.py checks the pins against pyproject.toml, and
# tests/deploy/test_versions.py against the table in README "Versions"):
#
#   docker build -t finetune-runner .                               # the runner (default target): CUDA, torch
#   docker build --target controller -t finetune-controller .       # the controller: slim, no torch
#
# The runner runs the same FineTuneJob YAML that `kubectl apply` takes:
#
#   docker run --gpus all --ipc=host -v "$PWD:/work" -e HF_TOKEN finetune-runner run /work/job.yaml
#
# Credentials come from the environment: HF_TOKEN, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION,
# AWS_ENDPOINT_URL_S3 (MinIO, R2, Ceph). Both images run as uid 1000, the uid the controller gives runner pods.

# ------------------------------------------------------------------------------------------ controller
FROM python:3.12-slim-bookworm AS controller

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY pyproject.toml README.md /tmp/src/
COPY runner /tmp/src/runner
COPY controller /tmp/src/controller
# The spec (pydantic, pyyaml) and the `controller` extra, pinned as README "Versions" lists.
RUN pip install --no-cache-dir \
        "pydantic==2.14.3" "pyyaml==6.0.3" \
        "kopf==1.45.2" "kubernetes==37.0.1" "prometheus-client==0.26.0" \
        "/tmp/src[controller]" \
    && rm -rf /tmp/src \
    && useradd --uid 1000 --user-group --no-create-home --shell /usr/sbin/nologin finetune

USER 1000:1000
WORKDIR /tmp
EXPOSE 8080
ENTRYPOINT ["python", "-m", "controller"]
CMD ["run"]

# -------------------------------------------------------------------------------------------- runner
# CUDA 13.0 to match torch's cu130 build (torch brings its own CUDA libraries as wheels; the base image sets
# NVIDIA_REQUIRE_CUDA, so a host driver too old for CUDA 13.0 is refused at `docker run`, not mid-training).
FROM nvidia/cuda:13.0.0-base-ubuntu24.04 AS runner

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Python 3.12; gcc and the Python headers because Triton (Liger's fused kernels, torch.compile) builds a small
# launcher with the system compiler the first time a kernel runs. uid 1000 is taken by the base's `ubuntu` user.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin finetune \
    && mkdir -p /work && chown 1000:1000 /work

# torch first, from PyTorch's CUDA 13.0 index (a layer of its own: the largest and the least often changed).
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cu130 "torch==2.11.0+cu130"

COPY pyproject.toml README.md /tmp/src/
COPY runner /tmp/src/runner
COPY controller /tmp/src/controller
# The `runner` and `gpu` extras, pinned to README "Versions" (the GPU stack `python -m bench` ran on, H100 and H200).
RUN pip install --no-cache-dir \
        "pydantic==2.14.3" "pyyaml==6.0.3" \
        "transformers==5.17.0" "peft==0.21.0" "bitsandbytes==0.50.2" "trl==1.16.0" "datasets==5.2.0" \
        "accelerate==1.15.0" "huggingface_hub==1.33.0" "tokenizers==0.23.3" "safetensors==0.8.0" \
        "boto3==1.44.5" "matplotlib==3.11.2" "pandas==2.3.3" "pyarrow==26.0.1" "tensorboard==2.21.0" \
        "liger-kernel==0.8.5" \
        "/tmp/src[runner,gpu]" \
    && rm -rf /tmp/src

USER 1000:1000
WORKDIR /work
# `docker run <image> run /work/job.yaml`; in a cluster the controller runs `python -m runner run` itself.
ENTRYPOINT ["python", "-m", "runner"]
CMD ["--help"]
