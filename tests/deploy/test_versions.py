"""One set of versions: the locks (locks/*.txt, `python -m locks`) against pyproject.toml, the README "Versions"
table generated from them, and every place the stack is installed - the Dockerfile, .ci/run and the README's
test command, bench/gpu/setup.sh - installing from its lock."""
from __future__ import annotations

import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from locks import targets
from locks.targets import BY_NAME, TARGETS, Lock, Pin, Target
from tests.deploy.conftest import README, ROOT

PYPROJECT_TEXT = (ROOT / "pyproject.toml").read_text()
PYPROJECT = tomllib.loads(PYPROJECT_TEXT)
CI = (ROOT / ".ci" / "run").read_text()
SETUP = (ROOT / "bench" / "gpu" / "setup.sh").read_text()
# the Pythons each lock serves: CI's Debian base is 3.11, the production images' 3.12
PYTHONS = {"ci": ("3.11",), "runner-cpu": ("3.11",), "runner": ("3.11", "3.12"), "controller": ("3.11", "3.12")}


def disagreements(target: Target, lock: Lock, python: str) -> list[str]:
    """What pyproject.toml (and the target's pins) say that the lock does not."""
    versions = lock.versions(python)
    out = []
    for text in target.requirements():
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name not in versions:
            out.append(f"{req.name} (pyproject) is not in the lock")
        elif not req.specifier.contains(Version(versions[name]), prereleases=True):
            out.append(f"the lock's {req.name}=={versions[name]} is outside pyproject's {req}")
    for pin in target.pins:
        req = Requirement(pin)
        [spec] = req.specifier
        if versions.get(canonicalize_name(req.name)) != spec.version:
            out.append(f"the lock's {req.name}=={versions.get(canonicalize_name(req.name))}, not {spec.version}")
    return out


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
def test_each_lock_is_generated_from_the_current_pyproject(target):
    lock = targets.read(target.path)
    assert lock.digest == target.digest(), (
        f"{target.path.name} was generated from another pyproject.toml or other pins: run `{targets.COMMAND}`")
    unhashed = [p.name for p in lock.pins if not p.hashes]
    assert not unhashed, f"{target.path.name}: no hashes for {unhashed}"
    for python in PYTHONS[target.name]:
        assert not disagreements(target, lock, python), disagreements(target, lock, python)


def test_a_lock_that_disagrees_with_pyproject_is_caught():
    runner = BY_NAME["runner"]
    lock = targets.read(runner.path)
    older = Lock(lock.digest, tuple(Pin(p.name, "5.0.0", p.marker, p.hashes) if p.name == "transformers" else p
                                    for p in lock.pins))
    assert any("transformers==5.0.0 is outside" in d for d in disagreements(runner, older, "3.12"))
    missing = Lock(lock.digest, tuple(p for p in lock.pins if p.name != "boto3"))
    assert "boto3 (pyproject) is not in the lock" in disagreements(runner, missing, "3.12")


def test_the_images_and_gpu_machines_get_the_cuda_torch_and_ci_the_cpu_build():
    runner = targets.read(BY_NAME["runner"].path).versions("3.12")
    assert runner["torch"] == "2.11.0" and runner["triton"] == "3.6.0"
    assert {"nvidia-cudnn-cu13", "nvidia-nccl-cu13", "nvidia-cusparselt-cu13", "nvidia-nvshmem-cu13"} <= set(runner)
    for name in ("ci", "runner-cpu"):
        versions = targets.read(BY_NAME[name].path).versions("3.11")
        assert versions["torch"].endswith("+cpu"), versions["torch"]
        assert not {n for n in versions if n.startswith("nvidia-") or n in ("triton", "liger-kernel")} - (
            {"liger-kernel"} if name == "ci" else set()), name
    cpu_image = targets.read(BY_NAME["runner-cpu"].path).versions("3.11")
    ci = targets.read(BY_NAME["ci"].path).versions("3.11")
    assert {n: v for n, v in cpu_image.items() if ci.get(n) != v} == {}, "the CPU image runs CI's versions"


def test_the_readme_versions_table_is_the_one_the_locks_give():
    text = README.read_text(encoding="utf-8")
    assert targets.readme_table(text) == targets.table(), f'README "Versions" is stale: run `{targets.COMMAND}`'
    for name in ("torch", "transformers", "peft", "bitsandbytes", "trl", "accelerate", "datasets"):
        assert f"| {name} |" in targets.table()


def test_ci_and_the_readme_test_command_install_the_cpu_lock():
    text = README.read_text(encoding="utf-8")
    test_command = next(line for line in text.splitlines() if "pip install" in line and "pytest" in line)
    assert test_command in CI, f".ci/run must run the README's test command:\n{test_command}"
    assert "--require-hashes -r locks/ci.txt" in test_command and "--no-deps -e ." in test_command
    assert "torch==" not in test_command  # the lock says which torch
    # the quickstart's one-liner names the CPU lock's torch
    cpu_torch = targets.public(targets.read(BY_NAME["ci"].path).versions("3.11")["torch"])
    quickstart = [line for line in text.splitlines() if "pip install" in line and "quickstart" in line]
    assert quickstart and all(re.findall(r"torch==(\S+)", line) == [cpu_torch] for line in quickstart), quickstart


def test_gpu_machines_install_the_runner_lock():
    assert "locks/runner.txt" in SETUP and "--require-hashes" in SETUP


def test_every_torch_version_the_readme_names_is_a_locked_one():
    text = README.read_text(encoding="utf-8").split("\n## Versions\n")[0]
    named = set(re.findall(r"torch[ =]=?(\d+\.\d+(?:\.\d+)?)", text))
    assert named, "the README names no torch version"
    locked = {targets.public(targets.read(BY_NAME[n].path).versions("3.11")["torch"]) for n in ("ci", "runner")}
    for version in named:
        assert any(v == version or v.startswith(version + ".") for v in locked), (
            f"README names torch {version}; the locks have {sorted(locked)}")
    gpu = targets.read(BY_NAME["runner"].path).versions("3.12")["torch"]
    assert re.search(r"docker build .*# .*torch " + re.escape(".".join(gpu.split(".")[:2])), text), (
        "the README's docker build line names the image's torch")


def test_pyprojects_comment_points_at_the_locks():
    comments = " ".join(line for line in PYPROJECT_TEXT.splitlines() if line.lstrip().startswith("#"))
    assert "python -m locks" in comments and 'README "Versions"' in comments
