"""The locks' targets and how a lock file reads: which extras each place installs, on which Python and platform,
with which exact pins; the digest of those inputs written into each lock; the README "Versions" table.

`python -m locks` (locks/__main__.py) writes the lock files from these targets; tests/deploy/test_versions.py
reads them back with the functions here and fails when pyproject.toml and the locks disagree.
"""
from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCKS = ROOT / "locks"
PYPROJECT = ROOT / "pyproject.toml"
README = ROOT / "README.md"
COMMAND = "python -m locks"

# The GPU stack measured on H100 and H200 (bench/results): the GPU machines' preinstalled torch 2.11.0 (on PyPI, the
# CUDA 13.0 build) and libraries, and the wheels carried there. The runner image pins exactly these.
GPU_STACK = ("torch==2.11.0", "transformers==5.17.0", "peft==0.21.0", "accelerate==1.15.0",
             "huggingface_hub==1.33.0", "tokenizers==0.23.3", "safetensors==0.8.0", "bitsandbytes==0.50.2",
             "trl==1.16.0", "datasets==5.2.0", "liger-kernel==0.8.5")
# The CPU build of torch that lies in the local wheel folder of every CI and developer machine (pip's find-links):
# PyPI's torch for Linux x86_64 is a CUDA build of several GB. PyTorch's CPU index serves the same file.
CPU_TORCH = "torch==2.13.0+cpu"


@dataclass(frozen=True)
class Target:
    """One place the stack is installed."""

    name: str  # the lock is locks/<name>.txt
    what: str  # where it is installed, for the lock's header
    extras: tuple[str, ...]  # pyproject extras, besides the base dependencies
    python: str  # the Python the lock is resolved for (the lowest one, for a universal lock)
    pins: tuple[str, ...] = ()  # exact versions on top of pyproject's ranges
    universal: bool = False  # one lock for every Python >= `python` (markers where versions differ)
    local_torch: bool = False  # the CPU torch from the machine's local wheel folder
    constrained_by: str | None = None  # another target whose lock this one's versions follow

    @property
    def path(self) -> Path:
        return LOCKS / f"{self.name}.txt"

    def requirements(self) -> list[str]:
        """pyproject's requirements for this target, in pyproject's order."""
        project = tomllib.loads(PYPROJECT.read_text())["project"]
        reqs = list(project["dependencies"])
        for extra in self.extras:
            reqs += project["optional-dependencies"][extra]
        return reqs

    def digest(self) -> str:
        """What the lock was generated from: a lock whose recorded digest differs is stale."""
        inputs = [self.python, str(self.universal), *sorted(self.requirements()), *self.pins]
        return "sha256:" + hashlib.sha256("\n".join(inputs).encode()).hexdigest()


# Production images run Python 3.12 (python:3.12-slim-bookworm); CI builds the same Dockerfile on a Debian 12 base
# (Python 3.11), so the images' locks are universal from 3.11 up. The CPU runner image and CI's test stack run
# the CPU torch, which exists here for Python 3.11 only.
TARGETS = (
    Target("ci", "CI, the tests and the quickstart: CPU torch, Python 3.11, Linux x86_64",
           ("runner", "tracking", "controller", "test"), "3.11", pins=(CPU_TORCH,), local_torch=True),
    Target("runner", "the runner image (Dockerfile, default target) and GPU machines: CUDA 13.0 torch from PyPI",
           ("runner", "gpu", "tracking"), "3.11", pins=GPU_STACK, universal=True),
    Target("runner-cpu", "the CPU runner image (Dockerfile --target runner-cpu): CPU torch, no liger/triton, no "
           "tracker clients", ("runner",), "3.11", pins=(CPU_TORCH,), local_torch=True, constrained_by="ci"),
    Target("controller", "the controller image (Dockerfile --target controller)",
           ("controller",), "3.11", universal=True, constrained_by="ci"),
)
BY_NAME = {t.name: t for t in TARGETS}


@dataclass(frozen=True)
class Pin:
    """One line of a lock: name==version [; marker], with its hashes."""

    name: str  # canonical
    version: str
    marker: Marker | None
    hashes: tuple[str, ...]

    def applies(self, python: str) -> bool:
        """On Linux x86_64 CPython `python` (the places this project's images and machines run)."""
        if self.marker is None:
            return True
        env = {"python_version": python, "python_full_version": python + ".0", "sys_platform": "linux",
               "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
               "implementation_name": "cpython", "platform_python_implementation": "CPython"}
        return self.marker.evaluate(env)


@dataclass(frozen=True)
class Lock:
    digest: str | None
    pins: tuple[Pin, ...]

    def versions(self, python: str) -> dict[str, str]:
        """name -> version for Linux x86_64 CPython `python`."""
        return {p.name: p.version for p in self.pins if p.applies(python)}


def read(path: Path) -> Lock:
    text = path.read_text()
    digest = m.group(1) if (m := re.search(r"^# inputs: (\S+)$", text, re.M)) else None
    pins = []
    for entry in re.split(r"\n(?=\S)", re.sub(r"^#.*\n", "", text, flags=re.M)):
        entry = entry.replace("\\\n", " ").strip()
        if not entry:
            continue
        hashes = tuple(re.findall(r"--hash=(\S+)", entry))
        req = Requirement(re.sub(r"\s*--hash=\S+", "", entry).strip())
        [spec] = req.specifier
        assert spec.operator == "==", f"{path.name}: {entry.split()[0]} is not pinned exactly"
        pins.append(Pin(canonicalize_name(req.name), spec.version, req.marker, hashes))
    return Lock(digest, tuple(pins))


# ------------------------------------------------------------------------------------------ README "Versions"
TABLE_HEADER = ("| package | CPU / CI stack (`locks/ci.txt`) | GPU runner image (`locks/runner.txt`) |\n"
                "|---|---|---|")
IMAGE_PYTHON = "3.12"


def table() -> str:
    """README "Versions": python, then every package pyproject declares for the runner and the controller."""
    ci, runner, controller = (read(BY_NAME[n].path) for n in ("ci", "runner", "controller"))
    cpu, gpu = ci.versions(BY_NAME["ci"].python), runner.versions(IMAGE_PYTHON)
    ctl = controller.versions(IMAGE_PYTHON)
    rows = [TABLE_HEADER, f"| python | {BY_NAME['ci'].python} | {IMAGE_PYTHON} |"]
    seen: set[str] = set()
    for req in BY_NAME["runner"].requirements() + BY_NAME["controller"].requirements():
        name = canonicalize_name(Requirement(req).name)
        if name in seen:
            continue
        seen.add(name)
        image = gpu.get(name) or (f"{ctl[name]} (controller image)" if name in ctl else "-")
        rows.append(f"| {Requirement(req).name} | {cpu.get(name, '- (GPU only)')} | {image} |")
    return "\n".join(rows)


def readme_table(text: str) -> str:
    """The table as it stands in README "Versions"."""
    section = text.split("\n## Versions\n", 1)[1].split("\n## ", 1)[0]
    return "\n".join(line for line in section.splitlines() if line.startswith("|"))


def with_table(text: str) -> str:
    """README text with its "Versions" table replaced by the one the locks give."""
    old = readme_table(text)
    assert old, 'README.md "## Versions" has no table'
    return text.replace(old, table(), 1)


def public(version: str) -> str:
    return Version(version).public
