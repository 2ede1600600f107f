"""One process per GPU: the launcher (`resources.gpus > 1`) and the few rank-aware helpers the job needs.

The runner re-executes itself under PyTorch's own launcher (torch.distributed.run, --standalone) in the same
container, with a work directory all ranks share. Rank 0 validates, downloads, writes checkpoints, merges
and publishes; every rank trains. A rank that dies makes torchrun stop the others, and the launcher turns
that into a retryable failure instead of a hung job.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from runner.api import errors, names



def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """Join the process group (NCCL on GPUs, gloo on CPU) once, before anything waits on a barrier."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState()


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (downloads, checkpoint fetches); the others run it after."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def leave_group() -> None:
    """After training: the other ranks are done; rank 0 merges and publishes on its own."""
    if world_size() > 1:
        import torch.distributed as dist

        barrier()
        if dist.is_initialized():
            dist.destroy_process_group()


def pin_one_gpu() -> None:
    """A single process uses one GPU. With several visible (docker run --gpus all on a multi-GPU host),
    transformers would wrap the model in nn.DataParallel, which trl refuses; resources.gpus > 1 is the way
    to use more than one. Must run before CUDA is initialised."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        os.environ["CUDA_VISIBLE_DEVICES"] = "0"
    elif "," in visible:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[0]


def processes_for(spec) -> int:
    override = os.environ.get(names.ENV_NPROC)
    if override:
        return int(override)
    wanted = spec.resources.gpus
    if wanted <= 1:
        return 1
    import torch

    visible = torch.cuda.device_count()
    if visible < wanted:
        raise errors.PermanentError(
            f"resources.gpus: {wanted} GPUs requested but {visible} visible; give the container "
            f"{wanted} GPUs (docker run --gpus all, or the pod's GPU limit) or lower resources.gpus",
            reason=errors.INVALID_SPEC,
        )
    return wanted


def launch(job_path: str, nproc: int, *, work_dir: str | None, reporter) -> int:
    """Run `runner run` once per process under torchrun; return rank 0's exit code."""
    work = work_dir or tempfile.mkdtemp(prefix="finetune-")
    result_file = Path(work) / "rank0-result.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "runner", "run", job_path, "--work-dir", work, "--termination-log", str(result_file)]
    env = {**os.environ, names.ENV_LAUNCHED: "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    reporter.log(f"launching {nproc} processes: {' '.join(cmd[2:6])}")
    proc = subprocess.Popen(cmd, env=env)  # rank 0's JSON events go straight to our stdout

    def forward(signum, frame):  # noqa: ARG001 - preemption reaches every rank through torchrun
        proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    code = proc.wait()
    if result_file.exists():
        result = json.loads(result_file.read_text())
        reporter.write_termination(result)
        return int(result.get("exitCode", code))
    err = errors.RetryableError(
        f"a training process died before rank 0 reported (torchrun exit code {code}); see the pod log",
        reason=errors.TRAINING_FAILED,
    )
    reporter.result(succeeded=False, exit_code=err.exit_code, reason=err.reason, message=err.message,
                    retryable=True, failedPhase=None)
    return err.exit_code
