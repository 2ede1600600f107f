"""The images (top-level Dockerfile: the `controller`, `runner-cpu` and default `runner` stages), checked without
a Docker engine: hadolint, each stage installing its lock with hashes and nothing else, one base and one index
for the default build, the driver floor against torch's CUDA build, the entrypoints against the package and the
controller, and that the slim controller image's packages suffice."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from controller import children
from locks import targets
from locks.targets import BY_NAME
from runner.model import cuda_driver
from tests.deploy.conftest import (CHART, DOCKERFILE, ROOT, build_args, hadolint_binary, stage_install,
                                   stages)

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
STAGES = ("controller", "runner-cpu", "runner")  # the last one is what `docker build .` builds
RUNNERS = ("runner-cpu", "runner")


def test_hadolint_passes():
    binary = hadolint_binary()
    r = subprocess.run([binary, "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # the linter is real: it flags what it should
    bad = "FROM ubuntu\nRUN apt-get install curl\nRUN cd /tmp && pip install requests\n"
    r = subprocess.run([binary, "-"], input=bad, capture_output=True, text=True)
    assert r.returncode != 0 and "DL3006" in r.stdout and "DL3013" in r.stdout, r.stdout


def test_three_named_stages_and_the_runner_is_the_default_target():
    assert tuple(stages()) == STAGES  # `docker build .` builds the last one: the CUDA runner


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_installs_exactly_its_lock_with_hashes_then_the_source(stage):
    target = BY_NAME[stage]
    install = stage_install(stages()[stage])
    assert install.locks == (f"/tmp/locks/{target.path.name}",) and install.hashed, install
    assert install.extras == set(target.extras) and install.source_no_deps, install
    copies = [rest for word, rest in stages()[stage] if word == "COPY"]
    assert copies[0] == f"locks/{target.path.name} /tmp/locks/", "the lock is copied first, alone"
    assert all("locks/" not in c for c in copies[1:]), copies  # the source after it: a new layer on top


@pytest.mark.parametrize("stage", ["controller", "runner"])
def test_the_default_build_uses_one_debian_python_base_and_pypi_only(stage):
    base = stages()[stage][0][1]
    assert base == "python:3.12-slim-bookworm", f"{stage}: {base}"
    assert stage_install(stages()[stage]).index_options == (), "no index but PyPI"
    assert targets.IMAGE_PYTHON == "3.12" and targets.read(BY_NAME[stage].path).versions("3.12")


def test_the_cpu_runner_gets_the_cpu_torch_on_the_python_it_is_built_for():
    base = stages()["runner-cpu"][0][1]
    m = re.fullmatch(r"python:(3\.\d+)-slim-bookworm", base)
    assert m and m.group(1) == BY_NAME["runner-cpu"].python, base
    assert stage_install(stages()["runner-cpu"]).index_options == ("https://download.pytorch.org/whl/cpu/torch/",)
    versions = targets.read(BY_NAME["runner-cpu"].path).versions(m.group(1))
    assert versions["torch"].endswith("+cpu") and not {"triton", "liger-kernel"} & set(versions)


def test_the_driver_floor_matches_torchs_cuda_build():
    """The container toolkit's NVIDIA_REQUIRE_CUDA and the runner's own check ask for the CUDA version the locked
    torch is built for (PyPI's torch 2.11.0: CUDA 13.0, its libraries the nvidia-*-cu13 wheels)."""
    envs = " ".join(rest for word, rest in stages()["runner"] if word == "ENV")
    m = re.search(r'NVIDIA_REQUIRE_CUDA="cuda>=(\d+\.\d+)"', envs)
    assert m, envs
    runner = targets.read(BY_NAME["runner"].path).versions("3.12")
    major = {m2.group(1) for n in runner if (m2 := re.fullmatch(r"nvidia-[a-z]+-cu(\d+)", n))}
    assert major == {m.group(1).split(".")[0]}, (major, m.group(1))
    assert cuda_driver.MIN_DRIVER[m.group(1)]  # the runner names the driver it needs
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in envs


def test_controller_image_is_slim():
    install = stage_install(stages()["controller"])
    versions = targets.read(BY_NAME["controller"].path).versions("3.12")
    heavy = {canonicalize_name(Requirement(r).name) for e in ("runner", "gpu")
             for r in PYPROJECT["project"]["optional-dependencies"][e]}
    assert not heavy & set(versions) and not install.extras & {"runner", "gpu"}
    assert build_args()["BASE"] == "python:3.12-slim-bookworm"


@pytest.mark.parametrize("stage", RUNNERS)
def test_entrypoints_match_the_package_and_the_controller(stage):
    s = stages()
    runner, controller = dict(s[stage]), dict(s["controller"])
    # the runner: `docker run <image> run /work/job.yaml` and the controller's `python -m runner run <file>`
    assert json.loads(runner["ENTRYPOINT"]) == ["python", "-m", "runner"]
    assert children.RUNNER_COMMAND[:3] == ["python", "-m", "runner"] and children.RUNNER_COMMAND[3] == "run"
    assert (ROOT / "runner" / "__main__.py").exists()
    envs = " ".join(rest for word, rest in s[stage] if word == "ENV")
    assert "PATH=/opt/venv/bin:$PATH" in envs  # `python` is the venv's, where the package is installed
    assert any("python3 -m venv /opt/venv" in rest for word, rest in s[stage] if word == "RUN")
    assert runner["WORKDIR"] == "/work"  # relative paths in a job file resolve in the mounted directory
    # all run as uid 1000: the uid the controller gives runner pods and the chart gives its own pod
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert runner["USER"] == controller["USER"] == f"{children.RUNNER_UID}:{children.RUNNER_UID}"
    assert values["podSecurityContext"]["runAsUser"] == children.RUNNER_UID
    # the controller: the chart's args start with a `python -m controller` command
    assert json.loads(controller["ENTRYPOINT"]) == ["python", "-m", "controller"]
    assert (ROOT / "controller" / "__main__.py").exists()
    assert json.loads(controller["CMD"]) == ["run"]
    # the files `pip install /tmp/src[...]` needs are copied: pyproject's readme and both packages
    for name in (stage, "controller"):
        copied = " ".join(rest for word, rest in s[name] if word == "COPY")
        assert PYPROJECT["project"]["readme"] in copied and "pyproject.toml" in copied
        assert "runner /tmp/src/runner" in copied and "controller /tmp/src/controller" in copied
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored and "README.md" not in ignored and "locks" not in ignored


BLOCK = """
import importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not in the controller image")
sys.meta_path.insert(0, Block())
sys.argv = ["controller", *sys.argv[2:]]
import runpy
runpy.run_module(sys.argv[0], run_name="__main__")
"""


def test_the_controller_runs_with_only_the_controller_images_packages():
    """With every module of the runner and gpu extras unimportable, the controller still imports all of its
    code (operator included) and prints its CRD and RBAC: the slim image has what it needs."""
    from importlib.metadata import packages_distributions

    heavy = {canonicalize_name(Requirement(r).name) for e in ("runner", "gpu")
             for r in PYPROJECT["project"]["optional-dependencies"][e]}
    modules = {m for m, dists in packages_distributions().items() if {canonicalize_name(d) for d in dists} & heavy}
    assert {"torch", "transformers", "boto3", "huggingface_hub"} <= modules
    blocked = ",".join(sorted(modules))
    code = BLOCK
    for args, expect in ((["crd"], "CustomResourceDefinition"), (["rbac"], "ClusterRole")):
        r = subprocess.run([sys.executable, "-c", code, blocked, *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0 and expect in r.stdout, r.stderr[-2000:]
    probe = ("import sys\n" + BLOCK.split("sys.argv = ")[0] +
             "import controller.operator, controller.cli, controller.reconciler, runner.api.parse\n"
             "runner.api.parse.load_job(sys.argv[2])\nprint('ok')\n")
    r = subprocess.run([sys.executable, "-c", probe, blocked, str(ROOT / "manifests/examples/llama2-jsonl-s3.yaml")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
