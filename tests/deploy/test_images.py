"""The images (top-level Dockerfile: the `controller` stage and the default `runner` stage), checked without a
Docker engine: hadolint, the pins against pyproject.toml, the CUDA base against torch's CUDA build, the
entrypoints against the package and the controller, and that the slim controller image's packages suffice."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from controller import children
from tests.deploy.conftest import CHART, DOCKERFILE, ROOT, hadolint_binary, pins_and_extras, pip_installs, stages

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
STAGE_EXTRAS = {"controller": {"controller"}, "runner": {"runner", "gpu", "tracking"}}


def declared(extras: set[str]) -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"][extra]]
    return {canonicalize_name(r.name): r for r in reqs}


def test_hadolint_passes():
    binary = hadolint_binary()
    r = subprocess.run([binary, "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # the linter is real: it flags what it should
    bad = "FROM ubuntu\nRUN apt-get install curl\nRUN cd /tmp && pip install requests\n"
    r = subprocess.run([binary, "-"], input=bad, capture_output=True, text=True)
    assert r.returncode != 0 and "DL3006" in r.stdout and "DL3013" in r.stdout, r.stdout


def test_two_named_stages_and_the_runner_is_the_default_target():
    s = stages()
    assert list(s) == ["controller", "runner"]  # `docker build .` builds the last one: the runner


@pytest.mark.parametrize("stage", ["controller", "runner"])
def test_image_pins_are_exact_and_inside_pyprojects_ranges(stage):
    pins, extras = pins_and_extras(stages()[stage])
    assert extras == STAGE_EXTRAS[stage], f"{stage} image installs the extras {extras}"
    want = declared(extras)
    missing = sorted(set(want) - set(pins))
    assert not missing, f"{stage} image: pin {missing} (declared in pyproject.toml)"
    stray = sorted(set(pins) - set(want))
    assert not stray, f"{stage} image pins {stray}, which pyproject.toml does not declare for {sorted(extras)}"
    for name, version in pins.items():
        assert want[name].specifier.contains(Version(version), prereleases=True), (
            f"{stage} image pins {name}=={version}, outside pyproject.toml's {want[name]}")


def test_controller_image_is_slim():
    pins, extras = pins_and_extras(stages()["controller"])
    heavy = {canonicalize_name(Requirement(r).name) for e in ("runner", "gpu")
             for r in PYPROJECT["project"]["optional-dependencies"][e]}
    assert not heavy & set(pins) and not extras & {"runner", "gpu"}
    base = dict(stages()["controller"])["FROM"]
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", base), base


def test_runner_cuda_base_matches_the_torch_build():
    stage = stages()["runner"]
    base = stage[0][1]
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(base|runtime|cudnn-runtime)-ubuntu(\d+\.\d+)", base)
    assert m, f"runner base {base}: an nvidia/cuda base/runtime image"
    torch = [a for argv in pip_installs(stage) for a in argv if a.startswith("torch==")]
    assert len(torch) == 1, torch
    version = Version(torch[0].split("==")[1])
    assert version.local and re.fullmatch(r"cu\d+", version.local), f"{torch[0]}: name the CUDA build (+cuXYZ)"
    assert version.local == f"cu{m.group(1)}{m.group(2)}", f"{base} does not match torch's {version.local} build"
    index = [argv[argv.index("--index-url") + 1] for argv in pip_installs(stage) if "--index-url" in argv]
    assert index == [f"https://download.pytorch.org/whl/{version.local}"]
    assert declared({"runner"})["torch"].specifier.contains(Version(version.public))
    # Python: Ubuntu 24.04's 3.12 satisfies requires-python
    assert m.group(4) == "24.04" and SpecifierSet(PYPROJECT["project"]["requires-python"]).contains("3.12")


def test_entrypoints_match_the_package_and_the_controller():
    s = stages()
    runner, controller = dict(s["runner"]), dict(s["controller"])
    # the runner: `docker run <image> run /work/job.yaml` and the controller's `python -m runner run <file>`
    assert json.loads(runner["ENTRYPOINT"]) == ["python", "-m", "runner"]
    assert children.RUNNER_COMMAND[:3] == ["python", "-m", "runner"] and children.RUNNER_COMMAND[3] == "run"
    assert (ROOT / "runner" / "__main__.py").exists()
    envs = " ".join(rest for word, rest in s["runner"] if word == "ENV")
    assert "PATH=/opt/venv/bin:$PATH" in envs  # `python` is the venv's, where the package is installed
    assert any("python3 -m venv /opt/venv" in rest for word, rest in s["runner"] if word == "RUN")
    assert runner["WORKDIR"] == "/work"  # relative paths in a job file resolve in the mounted directory
    # both run as uid 1000: the uid the controller gives runner pods and the chart gives its own pod
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert runner["USER"] == controller["USER"] == f"{children.RUNNER_UID}:{children.RUNNER_UID}"
    assert values["podSecurityContext"]["runAsUser"] == children.RUNNER_UID
    # the controller: the chart's args start with a `python -m controller` command
    assert json.loads(controller["ENTRYPOINT"]) == ["python", "-m", "controller"]
    assert (ROOT / "controller" / "__main__.py").exists()
    assert json.loads(controller["CMD"]) == ["run"]
    # the files `pip install /tmp/src[...]` needs are copied: pyproject's readme and both packages
    for stage in ("controller", "runner"):
        copied = " ".join(rest for word, rest in s[stage] if word == "COPY")
        assert PYPROJECT["project"]["readme"] in copied and "pyproject.toml" in copied
        assert "runner /tmp/src/runner" in copied and "controller /tmp/src/controller" in copied
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored and "README.md" not in ignored


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
