"""The images as built from the Dockerfile, run as real containers: what each image is, and the runner standalone
with the README's `docker run` command - on the production runner (`docker build .`: its CUDA torch runs CPU work
here) and on the CPU runner (`--target runner-cpu`). `--gpus all` needs a GPU host."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import yaml

from tests.cluster.cluster import wait_for
from tests.e2e.conftest import freeze, sigterm_pending
from tests.e2e.images import CONTROLLER, RUNNER, RUNNER_CPU

# The long standalone run's steps: held at step 3 for the stop, so it stops well before its last step (the runner logs
# each step as it ends; it is held within a step or two of that line).
LONG_STEPS = 60
# README "Run standalone with docker", less --gpus/--ipc: read-only root, uid 1000, /tmp and HOME in a tmpfs.
STANDALONE = ["--user", "1000:1000", "--read-only", "--tmpfs", "/tmp:exec", "-e", "HOME=/tmp", "--network", "host"]


def docker_run(dockerd, image, *args, opts=(), timeout=600, check=True):
    return dockerd.run("run", "--rm", *opts, image, *args, check=check, timeout=timeout)


def test_image_facts(dockerd, built_images):
    print(f"\nimages: {json.dumps(built_images)}")  # sizes and build seconds, for the CI log
    # both runners: uid 1000, their CLI, a read-only root filesystem
    for image in (RUNNER, RUNNER_CPU):
        r = docker_run(dockerd, image, "--help", opts=["--read-only"])
        assert r.returncode == 0 and "usage:" in r.stdout and "quickstart" in r.stdout, r.stdout + r.stderr
    probe = ("import importlib.util, os, torch, transformers, peft, bitsandbytes, trl; print(os.getuid(), os.getgid(),"
             " torch.__version__, torch.version.cuda, torch.cuda.is_available(),"
             " *(importlib.util.find_spec(m) is not None for m in ('triton', 'liger_kernel', 'mlflow', 'wandb')))")
    tmp = ["--read-only", "--tmpfs", "/tmp", "--entrypoint", "python"]
    # the production runner: PyPI's torch 2.11.0, the CUDA 13.0 build (it names itself 2.11.0+cu130, as on the GPU
    # machines), with Triton and Liger; no GPU here
    assert docker_run(dockerd, RUNNER, "-c", probe, opts=tmp).stdout.split() == [
        "1000", "1000", "2.11.0+cu130", "13.0", "False", "True", "True", "True", "True"]
    # the CPU runner: the CPU build; no Triton, Liger or tracker clients
    uid, gid, version, cuda, *rest = docker_run(dockerd, RUNNER_CPU, "-c", probe, opts=tmp).stdout.split()
    assert [uid, gid] == ["1000", "1000"], (uid, gid)
    assert version.endswith("+cpu") and cuda == "None" and rest == ["False"] * 5, (version, cuda, rest)
    # the controller: uid 1000, no torch, prints its CRD from a read-only root
    r = docker_run(dockerd, CONTROLLER, "-c", "import os; print(os.getuid(), flush=True); import torch",
                   opts=["--read-only", "--entrypoint", "python"], check=False)
    assert r.stdout.strip() == "1000"
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr
    r = docker_run(dockerd, CONTROLLER, "crd", opts=["--read-only"])
    assert yaml.safe_load(r.stdout)["kind"] == "CustomResourceDefinition"
    sizes = built_images["sizes_mb"]
    assert sizes[CONTROLLER] < sizes[RUNNER_CPU] / 3, sizes  # the controller image is the slim one
    assert sizes[RUNNER_CPU] < 1500, sizes  # the CPU runner: no CUDA libraries, no Triton


def test_standalone_quickstart_then_stop_and_resume(dockerd, built_images, tmp_path):
    """The README's docker command: the quickstart succeeds and writes the merged model to the mounted directory;
    `docker stop` (SIGTERM) mid-training leaves a checkpoint that the next run resumes from. On the CPU runner: the
    production runner runs the same job and the same SIGTERM resume in real pods (tests/e2e/test_operator.py), and
    both images here would add 3.5 to 10 minutes to a tier that is already past 10 (measured 208 s and 641 s)."""
    image = RUNNER_CPU
    work = tmp_path / "work"
    work.mkdir()
    work.chmod(0o777)  # the container runs as uid 1000
    mount = ["-v", f"{work}:/work"]
    t0 = time.monotonic()
    r = docker_run(dockerd, image, "quickstart", "--dir", "/work/qs", opts=[*STANDALONE, *mount], timeout=900)
    t_quickstart = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    out = work / "qs" / "output"
    assert (out / "finetune-manifest.json").exists() and (out / "config.json").exists()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.num_parameters() > 0

    # a longer run of the same job, stopped the way Ctrl-C / `docker stop` stops it: held (SIGSTOP) as it logs
    # step 3, so that the stop lands mid-training whatever the machine's speed, `docker stop`'s SIGTERM left pending
    # in it, then let go (SIGCONT)
    job = yaml.safe_load((work / "qs" / "job.yaml").read_text())
    job["spec"]["training"].update(maxSteps=LONG_STEPS, saveSteps=10000, loggingSteps=1)
    job["spec"]["output"]["destination"] = "/work/long-output"
    (work / "long.yaml").write_text(yaml.safe_dump(job))
    name = f"ftc-stop-{int(time.time())}"
    t1 = time.monotonic()
    dockerd.run("run", "-d", "--name", name, *STANDALONE, *mount, image, "run", "/work/long.yaml")
    try:
        pid = int(dockerd.run("inspect", "-f", "{{.State.Pid}}", name).stdout)
        follow = subprocess.Popen(["docker", "-H", dockerd.host, "logs", "-f", name], env=dockerd.env(), text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        try:
            held_at = next((json.loads(line)["step"] for line in follow.stdout if line.startswith("{")
                            and '"progress"' in line and json.loads(line)["step"] >= 3), None)
            assert held_at is not None, dockerd.run("logs", name, check=False).stderr[-3000:]
            freeze(pid)
        finally:
            follow.kill()
            follow.wait()
        stopping = subprocess.Popen(["docker", "-H", dockerd.host, "stop", "-t", "60", name], env=dockerd.env(),
                                    stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        wait_for(lambda: sigterm_pending(pid), timeout=60, interval=0.1, what="docker stop's SIGTERM")
        os.kill(pid, signal.SIGCONT)
        assert stopping.wait(timeout=120) == 0
        code = int(dockerd.run("inspect", "-f", "{{.State.ExitCode}}", name).stdout)
        logs = dockerd.run("logs", name, check=False)
    finally:
        dockerd.run("rm", "-f", name, check=False)
    assert code == 75, logs.stderr[-3000:]  # retryable: re-running resumes
    checkpoints = sorted((p.name for p in (work / "long-output.checkpoints").glob("checkpoint-*")),
                         key=lambda n: int(n.split("-")[1]))
    assert checkpoints, list((work).iterdir())
    step = checkpoints[-1].split("-")[1]
    assert f"running the same job again resumes from step {step}" in logs.stderr, logs.stderr[-2000:]
    assert not (work / "long-output" / "finetune-manifest.json").exists()  # nothing looks complete

    t2 = time.monotonic()
    r = docker_run(dockerd, image, "run", "/work/long.yaml", opts=[*STANDALONE, *mount], timeout=900, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {checkpoints[-1]}" in r.stderr, r.stderr[-3000:]
    assert (work / "long-output" / "finetune-manifest.json").exists()
    print(f"\nstandalone: quickstart {t_quickstart:.1f} s; the long run held at step {held_at} and stopped with "
          f"{checkpoints[-1]} after {t2 - t1:.1f} s; the run resuming from it {time.monotonic() - t2:.1f} s")


def test_images_have_no_pip_cache_or_sources(dockerd, built_images):
    r = subprocess.run(["docker", "-H", dockerd.host, "history", "--no-trunc", "--format", "{{.CreatedBy}}", RUNNER],
                       capture_output=True, text=True, check=True)
    assert "--no-cache-dir" in r.stdout
    r = docker_run(dockerd, RUNNER, "-c", "import os; print(os.path.exists('/tmp/src'))",
                   opts=["--entrypoint", "python"])
    assert r.stdout.strip() == "False"


LIGER_PROBE = """
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama
from runner.train import layer_kernels
cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64)
model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=2, target_modules="all-linear"))
before = model.get_base_model().model.layers[1].input_layernorm.forward.__qualname__
patch = layer_kernels.install(model)
layer = model.get_base_model().model.layers[1]
print(before, layer.input_layernorm.forward.__qualname__, layer.post_attention_layernorm.forward.__qualname__,
      model.get_base_model().model.norm.forward.__qualname__, layer.mlp.forward.__qualname__,
      modeling_llama.apply_rotary_pos_emb.__module__)
patch.remove()
print(layer.input_layernorm.forward.__qualname__, modeling_llama.apply_rotary_pos_emb.__module__)
"""


def test_the_runner_image_applies_liger_layer_kernels_itself(dockerd, built_images):
    """trl 1.x deprecates `use_liger_kernel`: the runner patches the same Liger kernels in itself, from the
    image's liger-kernel (runner/train/layer_kernels.py), into a peft-wrapped model: every norm, the MLPs and RoPE;
    and takes them out again after training."""
    r = docker_run(dockerd, RUNNER, "-c", LIGER_PROBE, opts=["--read-only", "--tmpfs", "/tmp", "--entrypoint", "python"])
    before, norm, post_norm, final_norm, mlp, rope, norm_after, rope_after = r.stdout.split()[-8:]
    assert before == "LlamaRMSNorm.forward"
    assert norm == post_norm == final_norm == "LigerRMSNorm.forward", r.stdout
    assert mlp == "LigerSwiGLUMLP.forward" and rope.startswith("liger_kernel."), r.stdout
    assert norm_after == "LlamaRMSNorm.forward" and rope_after.startswith("transformers."), r.stdout


def test_standalone_output_not_writable_fails_at_validating_named_for_validating(dockerd, built_images, tmp_path,
                                                                                tiny_llama):
    """The README's docker command with an output directory the container's user (uid 1000) cannot write: the run
    stops at Validating, before any download or training, and its reason names that phase (InvalidSpec: the job as
    written cannot run), not UploadFailed - nothing was uploaded."""
    import shutil

    from runner.api.parse import manifest
    from tests.conftest import QA_ROWS, write_jsonl

    work = tmp_path / "work"
    shutil.copytree(tiny_llama, work / "model")
    write_jsonl(work / "qa.jsonl", QA_ROWS)
    (work / "locked").mkdir()
    for p in [work, *work.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)  # readable by uid 1000; only root may write
    job = manifest("locked-out", {
        "model": {"source": "/work/model"},
        "dataset": {"source": "/work/qa.jsonl", "template": {"prompt": "Q: {question}\nA:", "completion": " {answer}"},
                    "maxLength": 32},
        "training": {"maxSteps": 2, "batchSize": 2},
        "output": {"destination": "/work/locked/out"},
    })
    (work / "job.yaml").write_text(yaml.safe_dump(job))
    (work / "job.yaml").chmod(0o644)
    r = docker_run(dockerd, RUNNER, "run", "/work/job.yaml", opts=[*STANDALONE, "-v", f"{work}:/work"], check=False,
                   timeout=300)
    results = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{") and '"result"' in line]
    assert r.returncode == 2 and results, r.stdout[-2000:] + r.stderr[-3000:]  # permanent: running again cannot help
    result = results[-1]
    assert result["failedPhase"] == "Validating", result
    assert result["reason"] == "InvalidSpec", result  # not UploadFailed: the phase it failed in
    assert "/work/locked" in result["message"] and "writable" in result["message"], result["message"]
    assert "phase Downloading" not in r.stderr  # found before any download


def test_the_production_runner_refuses_a_driver_too_old_for_its_cuda_at_start(dockerd, built_images, tmp_path):
    """A host driver that runs CUDA 12.8 only (a 570 driver), given to the container as the toolkit gives a real
    one (libcuda.so.1 on the library path): the runner exits 2 at start naming the driver it needs, instead of
    training on the CPU. Here libcuda is a real shared library answering cuDriverGetVersion, built with cc."""
    drv = tmp_path / "driver"
    drv.mkdir()
    (drv / "cuda.c").write_text("int cuDriverGetVersion(int *v) { *v = 12080; return 0; }\n")
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(drv / "libcuda.so.1"), str(drv / "cuda.c")], check=True)
    drv.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    work.chmod(0o777)
    r = docker_run(dockerd, RUNNER, "quickstart", "--dir", "/work/qs", check=False, timeout=600,
                   opts=[*STANDALONE, "-v", f"{work}:/work", "-v", f"{drv}:/driver:ro", "-e", "LD_LIBRARY_PATH=/driver"])
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "built for CUDA 13.0" in r.stderr and "580.65.06 or newer" in r.stderr, r.stderr[-3000:]
