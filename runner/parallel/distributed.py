"""One process per GPU, on one node or several: the launcher and the few rank-aware helpers the job needs.

The runner re-executes itself under PyTorch's own launcher, torchrun (torch.distributed.run), in the same
container. On one node (`resources.gpus > 1`): `--standalone`, with a work directory all ranks share. On several
nodes (`resources.nodes > 1`, or PET_NNODES): torchrun's c10d rendezvous, hosted by node 0 at
PET_MASTER_ADDR:PET_MASTER_PORT, with torchrun's own variables (runner/api/names.py) - the controller sets them
in each pod of the attempt's JobSet (controller/jobset.py); by hand, set them on each machine (README "Several
nodes"). Each node has a work directory of its own: the first process of each node downloads and fetches the
checkpoint to resume from (`node_first`), every rank trains (data parallel, or FSDP over all ranks), and global
rank 0 alone reports, writes checkpoints, merges and publishes (`is_main`).

Global rank 0 runs on node 0: c10d numbers the nodes by their address (its --local-addr; torchrun ignores
--node-rank with c10d), and node 0's address is PET_MASTER_ADDR while the others give PET_LOCAL_ADDR (or their
host name): in a JobSet `<jobset>-node-0-0.` sorts before every other pod's name. By hand, give the machines
addresses that sort after node 0's; if one sorts first anyway, the job still runs and that machine publishes.

A rank that dies fails the attempt everywhere, within a bound (README "Several nodes"): torchrun runs with
--max-restarts 0, so on the rank's own node it stops the other processes at once; on the other nodes the next
collective fails as soon as the dead process's connections close (at once when a process or machine dies and its
TCP connections are reset; otherwise after the collective timeout, 30 minutes), and torchrun there stops too. A
node that never arrives fails the rendezvous after its join timeout (RDZV_JOIN_TIMEOUT). Each launcher turns
that into a retryable failure instead of a hung job; in a JobSet the first failed pod also fails the Job, whose
other pods are stopped at once.
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

RDZV_JOIN_TIMEOUT = 900  # seconds node 0 waits for every node to join (image pulls, downloads come later)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def node_rank() -> int:
    return int(os.environ.get(names.ENV_NODE_RANK) or 0)


def is_main() -> bool:
    """Global rank 0: it reports, writes checkpoints, merges and publishes. Before torchrun starts (the runner
    itself, the launcher), node 0's process."""
    if "RANK" in os.environ:
        return rank() == 0
    return node_rank() == 0


def is_node_main() -> bool:
    """The first process of its node: it downloads and fetches into the node's work directory."""
    return local_rank() == 0


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
    """Rank 0 runs the block first; the others run it after."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


@contextlib.contextmanager
def node_first():
    """The first process of each node runs the block first (downloads, checkpoint fetches into the node's work
    directory); the node's other processes run it after, and read its copy."""
    if not is_node_main():
        barrier()
    yield
    if is_node_main():
        barrier()


def from_main(value):
    """Rank 0's `value` on every rank (pickled through the process group): what must be the same everywhere."""
    if world_size() > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            box = [value if is_main() else None]
            dist.broadcast_object_list(box, src=0)
            return box[0]
    return value


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
    """Processes on this node: one per GPU of resources.gpus (FINETUNE_NPROC overrides)."""
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


def nodes_for(spec) -> int:
    """Nodes the job runs on: PET_NNODES, else spec.resources.nodes."""
    value = os.environ.get(names.ENV_NNODES)
    try:
        return int(value) if value else int(spec.resources.nodes)
    except ValueError:
        raise errors.PermanentError(f"{names.ENV_NNODES}={value!r} is not a number of nodes",
                                    reason=errors.INVALID_SPEC) from None


def launcher_needed(spec, nproc: int) -> bool:
    """Whether this process starts torchrun (it is not one of torchrun's processes already)."""
    return (nproc > 1 or nodes_for(spec) > 1) and not os.environ.get(names.ENV_LAUNCHED)


def torchrun_command(nproc: int, nodes: int, *, run_id: str) -> list[str]:
    """torchrun's command line for this node (without the script and its arguments)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if nodes <= 1:
        return [*cmd, "--standalone"]
    env = os.environ
    missing = [n for n in (names.ENV_NODE_RANK, names.ENV_MASTER_ADDR) if not env.get(n)]
    if missing:
        raise errors.PermanentError(
            f"resources.nodes: {nodes} nodes, but {' and '.join(missing)} not set: on each machine set "
            f"{names.ENV_NODE_RANK} (0 to {nodes - 1}), {names.ENV_MASTER_ADDR} (node 0's address) and optionally "
            f"{names.ENV_MASTER_PORT} (default {names.RDZV_PORT}) and {names.ENV_LOCAL_ADDR} (this machine's "
            f"address), or {names.ENV_NNODES}=1 to run on this machine alone (README \"Several nodes\")",
            reason=errors.INVALID_SPEC)
    rank_ = node_rank()
    if not 0 <= rank_ < nodes:
        raise errors.PermanentError(f"{names.ENV_NODE_RANK}={rank_} is not between 0 and {nodes - 1}",
                                    reason=errors.INVALID_SPEC)
    master = env[names.ENV_MASTER_ADDR]
    port = int(env.get(names.ENV_MASTER_PORT) or names.RDZV_PORT)
    # Node 0 hosts the rendezvous store (said, not guessed from host names) and is known by the master address.
    local = master if rank_ == 0 else env.get(names.ENV_LOCAL_ADDR)
    cmd += [f"--nnodes={nodes}", f"--node-rank={rank_}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={master}:{port}", f"--rdzv-id={run_id}",
            f"--rdzv-conf=is_host={int(rank_ == 0)},join_timeout={RDZV_JOIN_TIMEOUT}", "--max-restarts=0"]
    if local:
        cmd.append(f"--local-addr={local}")
    return cmd


def _run_id(job) -> str:
    """The same on every node of one attempt, different between attempts (a retry rendezvouses afresh)."""
    attempt = os.environ.get(names.ENV_ATTEMPT) or "0"
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in job.name)[:100]
    return f"{name}-{attempt}"


def launch(job_path: str, nproc: int, *, work_dir: str | None, reporter, job=None) -> int:
    """Run `runner run` once per process under torchrun; return rank 0's exit code. `job`: the loaded job
    (several nodes: its resources.nodes and name)."""
    nodes = nodes_for(job.spec) if job is not None else 1
    torchrun = torchrun_command(nproc, nodes, run_id=_run_id(job) if job is not None else "none")
    work = work_dir or tempfile.mkdtemp(prefix="finetune-")
    result_file = Path(work) / "rank0-result.json"
    result_file.unlink(missing_ok=True)
    cmd = [*torchrun, "-m", "runner", "run", job_path, "--work-dir", work, "--termination-log", str(result_file)]
    env = {**os.environ, names.ENV_LAUNCHED: "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    where = f" on node {node_rank()} of {nodes}" if nodes > 1 else ""
    reporter.log(f"launching {nproc} processes{where}: {' '.join(cmd[2:len(torchrun)])}")
    proc = subprocess.Popen(cmd, env=env)  # rank 0's JSON events go straight to our stdout

    def forward(signum, frame):  # noqa: ARG001 - preemption reaches every rank through torchrun
        proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    code = proc.wait()
    if result_file.exists():  # global rank 0 ran here
        result = json.loads(result_file.read_text())
        reporter.write_termination(result)
        return int(result.get("exitCode", code))
    if nodes > 1 and code == 0:  # global rank 0 ran on another node, and reports there
        reporter.result(succeeded=True, exit_code=errors.EXIT_OK,
                        message=f"node {node_rank()}: its {nproc} processes finished; global rank 0 reports the job")
        return errors.EXIT_OK
    err = errors.RetryableError(
        f"a training process died before rank 0 reported (torchrun exit code {code}"
        + (f" on node {node_rank()} of {nodes}; a process on any node that dies stops them all" if nodes > 1
           else "") + "); see the pod log",
        reason=errors.TRAINING_FAILED,
    )
    reporter.result(succeeded=False, exit_code=err.exit_code, reason=err.reason, message=err.message,
                    retryable=True, failedPhase=None)
    return err.exit_code
