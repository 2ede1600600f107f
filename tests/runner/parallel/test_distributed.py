"""More than one process: torchrun-launched data parallel training (gloo on CPU), rank-0-only side effects,
and a rank that dies failing the attempt cleanly; on one node, and on two "nodes" of this machine (c10d
rendezvous over loopback)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from runner.api import errors
from tests.conftest import ROOT, job_doc, run_cli


def _events_of(events, kind):
    return [e for e in events if e["event"] == kind]


def test_two_processes_split_the_data_and_only_rank0_writes(tiny_llama, qa_jsonl, tmp_path):
    doc = job_doc(tiny_llama, qa_jsonl, tmp_path / "one" / "out", training={"epochs": 1, "saveSteps": 2},
                  dataset={"packing": False})
    del doc["spec"]["training"]["maxSteps"]
    (tmp_path / "one").mkdir()
    code, events, _, _ = run_cli(tmp_path / "one", doc)
    assert code == 0
    single_total = _events_of(events, "progress")[-1]["totalSteps"]

    (tmp_path / "two").mkdir()
    doc["spec"]["output"]["destination"] = str(tmp_path / "two" / "out")
    code, events, stderr, result = run_cli(tmp_path / "two", doc, env={"FINETUNE_NPROC": "2"})
    assert code == 0, stderr[-3000:]
    assert "launching 2 processes" in stderr
    # Rank 0 alone prints the runner's lines: each once, none from rank 1.
    lines = [ln for ln in stderr.splitlines() if ln.startswith(("[runner]", "[rank"))]
    assert sum(ln.startswith("[runner] tokenized") for ln in lines) == 1
    assert sum(ln.startswith("[runner] plan:") for ln in lines) == 1
    assert not [ln for ln in lines if ln.startswith("[rank")]
    progress = _events_of(events, "progress")
    assert progress[-1]["totalSteps"] == (single_total + 1) // 2  # each step takes a batch from each rank
    # Rank 0 alone reports, checkpoints and publishes: one of each, nothing duplicated.
    assert [e["phase"] for e in _events_of(events, "phase")] == [
        "Validating", "Downloading", "Training", "Merging", "Uploading"]
    assert len(_events_of(events, "result")) == 1 and result["phase"] == "Succeeded"
    steps = [e["step"] for e in _events_of(events, "checkpoint")]
    assert steps == sorted(set(steps)) and steps[-1] == progress[-1]["totalSteps"]
    ckpts = sorted(p.name for p in (tmp_path / "two" / "out.checkpoints").iterdir())
    assert ckpts == sorted(["job-fingerprint.json", "tokenized", *[f"checkpoint-{s}" for s in steps[-2:]]])
    assert (tmp_path / "two" / "out" / "finetune-manifest.json").is_file()


def test_a_rank_other_than_0_prints_only_its_failures():
    import io

    from runner.report.console import FailuresOnly
    from runner.report.events import Reporter

    err = io.StringIO()
    reporter = Reporter(stdout=io.StringIO(), stderr=FailuresOnly(err, 1), termination_log=os.devnull)
    reporter.log("tokenized 10 examples as prompt-completion; 0 truncated to 32 tokens")
    reporter.phase("Training")
    reporter.log("failed (TrainingFailed): CUDA error: an illegal memory access")
    assert err.getvalue() == "[rank 1] [runner] failed (TrainingFailed): CUDA error: an illegal memory access\n"


def _rank_pid(job: Path, rank: int) -> int | None:
    """The pid of the runner process of `job` whose environment says RANK=<rank>."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and str(job).encode() in cmdline and b"torch.distributed.run" not in cmdline:
            return int(proc.name)
    return None


def test_a_rank_that_dies_fails_the_attempt_retryably_without_hanging(tiny_llama, qa_jsonl, tmp_path):
    doc = job_doc(tiny_llama, qa_jsonl, tmp_path / "out", training={"maxSteps": 500, "saveSteps": 1000,
                                                                     "loggingSteps": 1})
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    term = tmp_path / "term"
    proc = subprocess.Popen([sys.executable, "-m", "runner", "run", str(job), "--termination-log", str(term)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "FINETUNE_NPROC": "2"})
    for line in proc.stdout:
        if json.loads(line)["event"] == "progress":
            break
    victim = _rank_pid(job, 1)
    assert victim, "rank 1 not found"
    os.kill(victim, signal.SIGKILL)
    started = time.monotonic()
    proc.stdout.read()
    code = proc.wait(timeout=180)
    assert time.monotonic() - started < 180
    result = json.loads(term.read_text())
    assert code in (errors.EXIT_RETRYABLE, errors.EXIT_UNEXPECTED) and result["retryable"] is True
    assert result["phase"] == "Failed"
    assert not (tmp_path / "out" / "finetune-manifest.json").exists()


def test_more_gpus_than_visible_is_a_permanent_error(tiny_llama, qa_jsonl, tmp_path):
    doc = job_doc(tiny_llama, qa_jsonl, tmp_path / "out", resources={"gpus": 2})
    code, _, _, result = run_cli(tmp_path, doc)
    assert code == errors.EXIT_PERMANENT
    assert "resources.gpus: 2 GPUs requested but 0 visible" in result["message"]


# ------------------------------------------------------------------------------------------- several nodes
# Two "nodes" on this machine: two runners, each started as on its own machine with the variables of README
# "Several nodes" (torchrun's PET_*), one process each, gloo over loopback, a work directory each, the output and
# checkpoints in a shared place.
def _node_env(rank: int, port: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FINETUNE_NPROC": "1", "PET_NODE_RANK": str(rank),
           "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}
    if rank:
        env["PET_LOCAL_ADDR"] = "127.0.0.2"  # this "machine's" address (loopback too): it sorts after node 0's
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PET_NNODES"):
        env.pop(name, None)
    return env


def _start_node(tmp_path: Path, job: Path, rank: int, port: int) -> subprocess.Popen:
    d = tmp_path / f"node{rank}"
    d.mkdir()
    return subprocess.Popen(
        [sys.executable, "-m", "runner", "run", str(job), "--work-dir", str(d / "work"),
         "--termination-log", str(d / "termination-log")],
        stdout=subprocess.PIPE, stderr=open(d / "stderr", "w"), text=True, cwd=d, env=_node_env(rank, port),
        start_new_session=True)  # a process group per "node", to kill one node whole


def _tree(root: int) -> list[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) if proc.name.isdigit() else None
        except (OSError, IndexError, ValueError):
            continue
        if ppid is not None:
            children.setdefault(ppid, []).append(int(proc.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _losses(events) -> list[float]:
    return [e["loss"] for e in _events_of(events, "progress") if "loss" in e]


def test_two_nodes_train_as_two_processes_do_and_only_node0_publishes(tiny_llama, qa_jsonl, tmp_path):
    from tests.cluster.cluster import free_port

    doc = job_doc(tiny_llama, qa_jsonl, tmp_path / "one" / "out", training={"maxSteps": 4, "loggingSteps": 1,
                                                                          "saveSteps": 2})
    (tmp_path / "one").mkdir()
    code, events, stderr, _ = run_cli(tmp_path / "one", doc, env={"FINETUNE_NPROC": "2"})
    assert code == 0, stderr[-3000:]
    reference = _losses(events)

    doc["spec"]["output"]["destination"] = str(tmp_path / "both-nodes" / "out")
    doc["spec"]["resources"] = {"nodes": 2}  # the same YAML on both machines
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    port = free_port()
    nodes = [_start_node(tmp_path, job, rank, port) for rank in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in nodes]
    logs = [(tmp_path / f"node{r}" / "stderr").read_text() for r in (0, 1)]
    assert [p.returncode for p in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "launching 1 processes on node 0 of 2" in logs[0] and "--rdzv-backend=c10d" in logs[0]
    events = [json.loads(line) for line in outs[0].splitlines() if line.strip()]
    # Node 0 runs global rank 0: it alone reports, checkpoints and publishes; node 1's processes only train.
    assert not outs[1].strip() and not (tmp_path / "node1" / "termination-log").exists()
    result = json.loads((tmp_path / "node0" / "termination-log").read_text())
    assert result["phase"] == "Succeeded" and result["output"] == str(tmp_path / "both-nodes" / "out")
    assert result["metrics"]["global_step"] == 4
    assert [e["phase"] for e in _events_of(events, "phase")] == [
        "Validating", "Downloading", "Training", "Merging", "Uploading"]
    assert [e["step"] for e in _events_of(events, "checkpoint")] == [2, 4]
    assert (tmp_path / "both-nodes" / "out" / "finetune-manifest.json").is_file()
    # each node fetched into its own work directory
    assert all((tmp_path / f"node{r}" / "work" / "downloads.json").is_file() for r in (0, 1))
    # Data parallel over the two nodes is the same training as over two processes of one node: the same losses.
    # (Exactly for the first two steps - the second shows the first update, averaged over both nodes; from the
    # third step on, two runs of the one-node reference itself differ by up to ~1% on this machine.)
    losses = _losses(events)
    assert len(reference) == 4 and losses[:2] == pytest.approx(reference[:2], rel=1e-6)
    assert losses == pytest.approx(reference, rel=0.02)


def test_a_node_that_dies_fails_the_other_within_the_bound(tiny_llama, qa_jsonl, tmp_path):
    from tests.cluster.cluster import free_port

    doc = job_doc(tiny_llama, qa_jsonl, tmp_path / "both-nodes" / "out", resources={"nodes": 2},
                  training={"maxSteps": 2000, "saveSteps": 5000, "loggingSteps": 1})
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    port = free_port()
    node0, node1 = (_start_node(tmp_path, job, rank, port) for rank in (0, 1))
    try:
        for line in node0.stdout:
            if json.loads(line)["event"] == "progress":
                break
        _kill(_tree(node1.pid))  # the whole "machine": runner, torchrun, its worker (in a session of its own)
        killed = time.monotonic()
        node0.stdout.read()
        code = node0.wait(timeout=BOUND_S + 60)
        took = time.monotonic() - killed
    finally:
        for p in (node0, node1):
            _kill(_tree(p.pid) if p.poll() is None else [])
            p.wait()
    assert took < BOUND_S, took
    result = json.loads((tmp_path / "node0" / "termination-log").read_text())
    assert code in (errors.EXIT_RETRYABLE, errors.EXIT_UNEXPECTED) and result["retryable"] is True, result
    assert not (tmp_path / "both-nodes" / "out" / "finetune-manifest.json").exists()


BOUND_S = 120  # the survivor's collective fails as soon as the dead node's connections close (README)


def test_torchrun_command_for_one_node_and_for_several(monkeypatch):
    from runner.parallel import distributed

    for name in ("RANK", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT", "PET_LOCAL_ADDR", "PET_NNODES"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.torchrun_command(2, 1, run_id="j-1")[3:] == ["--nproc-per-node=2", "--standalone"]
    with pytest.raises(errors.PermanentError, match="PET_NODE_RANK and PET_MASTER_ADDR not set"):
        distributed.torchrun_command(1, 2, run_id="j-1")
    monkeypatch.setenv("PET_NODE_RANK", "0")
    monkeypatch.setenv("PET_MASTER_ADDR", "j-1-node-0-0.j-1")
    assert distributed.torchrun_command(8, 4, run_id="j-1")[3:] == [
        "--nproc-per-node=8", "--nnodes=4", "--node-rank=0", "--rdzv-backend=c10d",
        "--rdzv-endpoint=j-1-node-0-0.j-1:29500", "--rdzv-id=j-1", "--rdzv-conf=is_host=1,join_timeout=900",
        "--max-restarts=0", "--local-addr=j-1-node-0-0.j-1"]
    assert distributed.is_main()
    monkeypatch.setenv("PET_NODE_RANK", "3")
    monkeypatch.setenv("PET_LOCAL_ADDR", "j-1-node-0-3.j-1")
    cmd = distributed.torchrun_command(8, 4, run_id="j-1")
    assert "--rdzv-conf=is_host=0,join_timeout=900" in cmd and cmd[-1] == "--local-addr=j-1-node-0-3.j-1"
    assert not distributed.is_main()  # node 3's launcher neither reports nor publishes
    monkeypatch.setenv("RANK", "0")
    assert distributed.is_main()  # global rank 0 (torchrun's), wherever it runs
    monkeypatch.setenv("PET_NODE_RANK", "4")
    with pytest.raises(errors.PermanentError, match="between 0 and 3"):
        distributed.torchrun_command(8, 4, run_id="j-1")


def test_nodes_come_from_the_spec_or_pet_nnodes(tiny_llama, monkeypatch):
    from runner.parallel import distributed
    from runner.api.parse import parse_job

    spec = parse_job(job_doc(tiny_llama, "data.jsonl", "/tmp/out", resources={"nodes": 2})).spec
    monkeypatch.delenv("PET_NNODES", raising=False)
    monkeypatch.delenv("FINETUNE_LAUNCHED", raising=False)
    assert distributed.nodes_for(spec) == 2 and distributed.launcher_needed(spec, 1)
    monkeypatch.setenv("PET_NNODES", "1")  # the same YAML on one machine alone
    assert distributed.nodes_for(spec) == 1 and not distributed.launcher_needed(spec, 1)
