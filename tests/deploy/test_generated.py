"""The generated files are current: `python -m controller generate` (controller/generate.py) would not change the
CRD, the chart's copy of it, manifests/install.yaml or the README's spec reference."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from controller import generate
from tests.deploy.conftest import ROOT

GENERATED = [generate.CRD_FILE, generate.CHART_CRD, generate.INSTALL, generate.README]


@pytest.fixture(scope="module")
def generated(helm_bin) -> dict:
    return generate.outputs(helm_bin)


def test_the_generator_makes_exactly_these_files(generated):
    assert list(generated) == GENERATED


@pytest.mark.parametrize("rel", GENERATED, ids=str)
def test_committed_file_is_current(generated, rel):
    assert (ROOT / rel).read_text(encoding="utf-8") == generated[rel], (
        f"{rel} is out of date with runner/api/spec.py or charts/; run: {generate.COMMAND}")


def generate_cmd(helm_bin: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controller", "generate", "--helm", helm_bin, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_check_passes_on_this_checkout(helm_bin):
    r = generate_cmd(helm_bin, "--check")
    assert r.returncode == 0, r.stderr


def test_the_command_names_and_rewrites_stale_files(helm_bin, tmp_path):
    """On a copy of the checkout with a stale README block and no chart CRD: --check names both and writes
    nothing; a run writes them (install.yaml rendered from the new chart copy); a second run writes nothing."""
    shutil.copytree(ROOT / "charts", tmp_path / "charts")
    shutil.copytree(ROOT / "manifests", tmp_path / "manifests")
    readme = (ROOT / generate.README).read_text(encoding="utf-8")
    stale_readme = readme.replace(generate.readme_block(readme), "old\n")
    (tmp_path / generate.README).write_text(stale_readme, encoding="utf-8")
    (tmp_path / generate.CHART_CRD).unlink()

    r = generate_cmd(helm_bin, "--check", "--root", str(tmp_path))
    assert r.returncode == 1 and generate.COMMAND in r.stderr, r.stderr
    assert f"{generate.README} is out of date" in r.stderr and f"{generate.CHART_CRD} is out of date" in r.stderr
    assert str(generate.INSTALL) not in r.stderr and str(generate.CRD_FILE) not in r.stderr
    assert (tmp_path / generate.README).read_text(encoding="utf-8") == stale_readme
    assert not (tmp_path / generate.CHART_CRD).exists()

    r = generate_cmd(helm_bin, "--root", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.split()) == sorted(["wrote", str(generate.CHART_CRD), "wrote", str(generate.README)])
    for rel in GENERATED:
        assert (tmp_path / rel).read_text(encoding="utf-8") == (ROOT / rel).read_text(encoding="utf-8"), rel
    r = generate_cmd(helm_bin, "--root", str(tmp_path))
    assert r.returncode == 0 and "every generated file is current" in r.stdout, r.stdout + r.stderr


def test_generate_is_left_out_of_the_operators_help_but_runs_with_its_own():
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "controller", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)

    users = cli("--help")
    assert users.returncode == 0 and "{run,crd,rbac}" in users.stdout
    assert not re.search(r"\bgenerate\b", users.stdout), users.stdout
    maintainers = cli("generate", "--help")
    assert maintainers.returncode == 0 and "For maintainers" in maintainers.stdout and "--check" in maintainers.stdout
