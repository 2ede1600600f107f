# syntax=docker/dockerfile:1
# Three images from this file, every Python package from PyPI at the exact version and hash its lock gives
# (locks/*.txt, written by `python -m locks` from pyproject.toml; tests/deploy checks both):
#
#   docker build -t finetune-runner .                                # the runner (default target): CUDA 13.0 torch
#   docker build --target runner-cpu -t finetune-runner-cpu .        # the runner for CPU clusters: CPU torch
#   docker build --target controller -t finetune-controller .        # the controller: slim, no torch
#
# The runner runs the same FineTuneJob YAML that `kubectl apply` takes (README "Run standalone with docker"):
#
#   docker run --gpus all --ipc=host --read-only --tmpfs /tmp -v "$PWD:/work" -e HF_TOKEN finetune-runner run /work/job.yaml
#
# Credentials come from the environment: HF_TOKEN, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION,
# AWS_ENDPOINT_URL_S3 (MinIO, R2, Ceph). Every image runs as uid 1000, the uid the controller gives runner pods,
# with a read-only root filesystem (only /tmp, HOME's caches and /work need to be writable).
#
# Build arguments (CI sets only the two bases, to a Debian 12 image it makes itself, and the CPU torch's location,
# to its local copy; tests/e2e/images.py):
#   BASE             the runner's and the controller's base: Debian with Python >= 3.11 and its venv module
#   CPU_BASE         the CPU runner's base: Python 3.11 (the CPU torch build of locks/runner-cpu.txt is cp311)
#   TORCH_CPU_LINKS  where pip finds that CPU torch wheel (PyPI has only the CUDA build for Linux x86_64)
# The runner's CUDA libraries come as PyPI's nvidia-* wheels; the host's driver comes in through the NVIDIA
# container toolkit (`--gpus all`, the device plugin), which refuses a driver older than NVIDIA_REQUIRE_CUDA, and
# the runner checks it again at start (exit 2 naming the driver it needs).
ARG BASE=python:3.12-slim-bookworm
ARG CPU_BASE=python:3.11-slim-bookworm

# ------------------------------------------------------------------------------------------ controller
FROM ${BASE} AS controller

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN python3 -m venv /opt/venv \
    && useradd --uid 1000 --user-group --no-create-home --shell /usr/sbin/nologin finetune

# The lock first, the source last: a change to the source rebuilds only the last layer.
COPY locks/controller.txt /tmp/locks/
RUN pip install --no-cache-dir --require-hashes -r /tmp/locks/controller.txt
COPY pyproject.toml README.md /tmp/src/
COPY runner /tmp/src/runner
COPY controller /tmp/src/controller
RUN pip install --no-cache-dir --no-deps "/tmp/src[controller]" \
    && rm -rf /tmp/src /tmp/locks

USER 1000:1000
WORKDIR /tmp
EXPOSE 8080
ENTRYPOINT ["python", "-m", "controller"]
CMD ["run"]

# ------------------------------------------------------------------------------------------ runner-cpu
FROM ${CPU_BASE} AS runner-cpu
ARG TORCH_CPU_LINKS=https://download.pytorch.org/whl/cpu/torch/

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN python3 -m venv /opt/venv \
    && useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin finetune \
    && mkdir -p /work && chown 1000:1000 /work

# The `runner` extra (no tracker clients: training.reportTo mlflow/wandb is refused at Validating, naming the
# package) with the CPU torch. Kept small (under 1.5 GB): without what no CPU job runs - torch's C++ tests, tools
# (but its shared-memory manager) and headers (no compiler here), bitsandbytes' GPU libraries, the packages' own test suites - and with bytecode
# only for the modules a job imports (compiled once here; the root filesystem is read-only at run time).
COPY locks/runner-cpu.txt /tmp/locks/
RUN pip install --no-cache-dir --no-compile --require-hashes --find-links "$TORCH_CPU_LINKS" -r /tmp/locks/runner-cpu.txt \
    && site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && rm -rf "$site/torch/test" "$site/torch/include" \
    && find "$site/torch/bin" -type f ! -name torch_shm_manager -delete \
    && find "$site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name 'libbitsandbytes_cpu.so' -delete \
    && find "$site" -mindepth 2 -depth -type d -name tests -exec rm -rf {} + \
    && PYTHONDONTWRITEBYTECODE='' python -c "import torch, torch.utils.tensorboard, transformers, peft, trl, datasets, \
accelerate, bitsandbytes, boto3, google.cloud.storage, pandas, pyarrow, matplotlib.pyplot, yaml, pydantic; \
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM; from trl import SFTTrainer"
COPY pyproject.toml README.md /tmp/src/
COPY runner /tmp/src/runner
COPY controller /tmp/src/controller
RUN pip install --no-cache-dir --no-deps "/tmp/src[runner]" \
    && rm -rf /tmp/src /tmp/locks

USER 1000:1000
WORKDIR /work
ENTRYPOINT ["python", "-m", "runner"]
CMD ["--help"]

# ------------------------------------------------------------------------------ runner (the default)
FROM ${BASE} AS runner

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA="cuda>=13.0"

# gcc and the Python headers because Triton (Liger's fused kernels, torch.compile) builds a small launcher with
# the system compiler the first time a kernel runs (python:3.12-slim has the headers; a Debian base needs
# python3-dev).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && if [ ! -e "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ]; then \
         apt-get install -y --no-install-recommends python3-dev; fi \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin finetune \
    && mkdir -p /work && chown 1000:1000 /work

# The `runner`, `gpu` and `tracking` extras with torch 2.11.0 (the CUDA 13.0 build, its CUDA libraries as
# nvidia-* wheels, triton): the GPU stack the benchmarks ran on (H100, H200). Then the source, without
# dependencies (they are all in the layer above).
COPY locks/runner.txt /tmp/locks/
RUN pip install --no-cache-dir --require-hashes -r /tmp/locks/runner.txt
COPY pyproject.toml README.md /tmp/src/
COPY runner /tmp/src/runner
COPY controller /tmp/src/controller
RUN pip install --no-cache-dir --no-deps "/tmp/src[runner,gpu,tracking]" \
    && rm -rf /tmp/src /tmp/locks

USER 1000:1000
WORKDIR /work
# `docker run <image> run /work/job.yaml`; in a cluster the controller runs `python -m runner run` itself.
ENTRYPOINT ["python", "-m", "runner"]
CMD ["--help"]
