"""One set of versions: the table in README "Versions" (the CPU/CI stack and the images' GPU stack) against every
place a version is written - the Dockerfile's pins, .ci/run's and the README's `pip install torch==...`, the
README's other torch mentions, and pyproject.toml's ranges and comment."""
from __future__ import annotations

import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.deploy.conftest import README, ROOT, pins_and_extras, stages

PYPROJECT_TEXT = (ROOT / "pyproject.toml").read_text()
PYPROJECT = tomllib.loads(PYPROJECT_TEXT)
CI = (ROOT / ".ci" / "run").read_text()
VERSION = re.compile(r"\d+(?:\.\d+)+(?:\+\w+)?")


def table() -> dict[str, tuple[str | None, str | None]]:
    """README "Versions": package -> (CPU/CI version, image version); None where a stack lacks the package."""
    text = README.read_text(encoding="utf-8")
    assert "\n## Versions\n" in text, 'README.md needs a "## Versions" section'
    section = text.split("\n## Versions\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert rows[0].replace(" ", "") == "|package|CPU/CIstack|GPUimagestack(Dockerfile)|", rows[0]
    out = {}
    for row in rows[2:]:
        name, cpu, image = (cell.strip() for cell in row.strip("|").split("|"))
        versions = tuple(m.group(0) if (m := VERSION.match(cell)) else None for cell in (cpu, image))
        out[name if name == "python" else canonicalize_name(name)] = versions
    return out


TABLE = table()


def cpu(name: str) -> str:
    return TABLE[name][0]


def image(name: str) -> str:
    return TABLE[name][1]


def declared() -> dict[str, Requirement]:
    project = PYPROJECT["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    return {canonicalize_name(r.name): r for r in reqs}


def test_the_table_lists_the_ml_stack_for_both():
    for name in ("torch", "transformers", "peft", "bitsandbytes", "trl", "accelerate", "datasets"):
        assert cpu(name) and image(name), f"README Versions: {name} needs both stacks' versions"


def test_the_images_pin_exactly_the_tables_gpu_stack():
    pinned: dict[str, str] = {}
    for name, stage in stages().items():
        pins, _ = pins_and_extras(stage)
        for pkg, version in pins.items():
            assert pinned.setdefault(pkg, version) == version, f"the images pin {pkg} twice: {pinned[pkg]}, {version}"
    images = {pkg: image(pkg) for pkg in TABLE if pkg != "python" and image(pkg)}
    assert pinned == images, (
        "Dockerfile pins and README Versions' image column differ: "
        f"{ {k: (pinned.get(k), images.get(k)) for k in set(pinned) | set(images) if pinned.get(k) != images.get(k)} }")


def test_ci_and_the_readme_commands_install_the_tables_cpu_torch():
    ci_torch = re.findall(r"torch==(\S+)", CI)
    assert ci_torch == [cpu("torch")], f".ci/run installs torch {ci_torch}; README Versions says {cpu('torch')}"
    text = README.read_text(encoding="utf-8")
    commands = [line for line in text.splitlines() if "pip install" in line and "torch==" in line]
    assert len(commands) >= 2, commands  # the quickstart and the test command
    for line in commands:
        assert re.findall(r"torch==(\S+)", line) == [cpu("torch")], line
    # .ci/run is the README's test command
    test_command = next(line for line in commands if "pytest" in line)
    assert test_command in CI, f".ci/run must run the README's test command:\n{test_command}"


def test_every_torch_version_the_readme_names_is_one_of_the_table():
    text = README.read_text(encoding="utf-8").split("\n## Versions\n")[0]
    named = set(re.findall(r"torch[ =]=?(\d+\.\d+(?:\.\d+)?)", text))
    assert named, "the README names no torch version"
    stacks = {cpu("torch"), image("torch")}
    for version in named:
        assert any(v == version or v.startswith(version + ".") or v.startswith(version + "+") for v in stacks), (
            f"README names torch {version}; README Versions lists {sorted(stacks)}")
    assert re.search(r"docker build .*# .*torch " + re.escape(".".join(image("torch").split(".")[:2])), text), (
        "the README's docker build line names the image's torch")


@pytest.mark.parametrize("column", [0, 1], ids=["cpu", "image"])
def test_pyprojects_ranges_admit_both_stacks(column):
    reqs = declared()
    for name, versions in TABLE.items():
        version = versions[column]
        if version is None:
            continue
        if name == "python":
            assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(version), version
            continue
        assert name in reqs, f"README Versions lists {name}, which pyproject.toml does not declare"
        assert reqs[name].specifier.contains(Version(version), prereleases=True), (
            f"{name} {version} (README Versions) is outside pyproject.toml's {reqs[name]}")


def test_pyprojects_comment_points_at_the_table_and_agrees_with_it():
    comments = " ".join(line for line in PYPROJECT_TEXT.splitlines() if line.lstrip().startswith("#"))
    assert 'README "Versions"' in comments
    mentioned = re.findall(r"\b([a-z][\w-]*) (\d+(?:\.\d+)+(?:\+\w+)?)", comments)
    assert any(name == "torch" for name, _ in mentioned), comments
    for name, version in mentioned:
        key = canonicalize_name(name)
        assert key in TABLE and version in TABLE[key], f"pyproject.toml's comment says {name} {version}; README " \
            f"Versions lists {TABLE.get(key)}"
