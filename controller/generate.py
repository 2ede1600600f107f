"""`python -m controller generate`: every file made from the contract and the chart (kubebuilder's `make manifests`).

    python -m controller generate           # after changing runner/api/spec.py or charts/: rewrite what is stale
    python -m controller generate --check   # write nothing; exit 1 naming each stale file

The generated files, in dependency order (tests/deploy fails while one is stale, naming this command):

    manifests/crds/finetunejobs.finetune.dev.yaml   the CRD (controller/crd.py, from runner/api/spec.py)
    charts/finetune-operator/files/crd.yaml         the chart's copy of it
    manifests/install.yaml                          a Namespace, then the chart rendered with its default values
    README.md, between the spec-reference markers   the spec reference (controller/reference.py)

It works on a checkout (the chart and the README are read from it). install.yaml is rendered by helm: --helm,
else $HELM, else the helm v3.6.2 that tests/cluster/build.sh installs and caches (the one the tests render
with), else `helm` on PATH.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from runner.api import names

ROOT = Path(__file__).resolve().parents[1]  # the checkout
COMMAND = "python -m controller generate"
CHART = Path("charts") / "finetune-operator"
CRD_FILE = Path("manifests") / "crds" / f"{names.CRD_NAME}.yaml"
CHART_CRD = CHART / "files" / "crd.yaml"
INSTALL = Path("manifests") / "install.yaml"
README = Path("README.md")

INSTALL_RELEASE = "finetune-operator"
INSTALL_NAMESPACE = "finetune-system"


# ------------------------------------------------------------------------------------------------ helm
def helm(helm_bin: str, *args: str) -> subprocess.CompletedProcess:
    """Run helm with its caches under /tmp (nothing in the user's home) and no proxy (it reaches nothing)."""
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
    env.update(HELM_CACHE_HOME="/tmp/ftc-helm/cache", HELM_CONFIG_HOME="/tmp/ftc-helm/config",
               HELM_DATA_HOME="/tmp/ftc-helm/data")
    return subprocess.run([helm_bin, *args], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
                          timeout=60)


def find_helm(explicit: str | None = None, root: Path = ROOT) -> str:
    """--helm, $HELM, the test cluster's pinned helm (tests/cluster/build.sh, cached after its first run), or
    `helm` on PATH."""
    if explicit or os.environ.get("HELM"):
        return explicit or os.environ["HELM"]
    build = root / "tests" / "cluster" / "build.sh"
    if build.exists():
        p = subprocess.run(["bash", str(build)], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                           timeout=3600)
        found = [line.partition("=")[2] for line in p.stdout.splitlines() if line.startswith("HELM=")]
        if p.returncode == 0 and found:
            return found[0]
    on_path = shutil.which("helm")
    if on_path:
        return on_path
    raise SystemExit(f"{COMMAND}: no helm (needed for {INSTALL}): pass --helm PATH, set $HELM, or run "
                     "bash tests/cluster/build.sh")


# ------------------------------------------------------------------------------------------- the files
def render_install(helm_bin: str, root: Path = ROOT) -> str:
    """manifests/install.yaml: a Namespace, then the chart rendered with its default values."""
    p = helm(helm_bin, "template", INSTALL_RELEASE, str(root / CHART), "--namespace", INSTALL_NAMESPACE)
    if p.returncode != 0:
        raise SystemExit(f"helm template {CHART} failed ({p.returncode}):\n{p.stderr}")
    header = f"""\
# The FineTuneJob operator with the chart's default values, for clusters without helm:
#
#   kubectl apply -f manifests/install.yaml
#
# Generated from charts/finetune-operator by `{COMMAND}`; do not edit by hand (a test keeps them in
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
    return header + p.stdout


def outputs(helm_bin: str, root: Path = ROOT) -> dict[Path, str]:
    """Every generated file's path (relative to the checkout) and the content it should have, in dependency
    order: the chart's CRD copy comes before install.yaml, which helm renders from it."""
    from controller import crd, reference

    crd_text = crd.render()
    out = {CRD_FILE: crd_text, CHART_CRD: crd_text}
    with _chart_with_crd(root, crd_text) as chart_root:
        out[INSTALL] = render_install(helm_bin, chart_root)
    out[README] = reference.with_reference((root / README).read_text(encoding="utf-8"))
    return out


class _chart_with_crd:
    """The checkout itself when the chart's CRD copy is current, else a temporary copy of the chart holding
    the new CRD, so install.yaml is rendered from what this run writes (and --check writes nothing)."""

    def __init__(self, root: Path, crd_text: str):
        self.root, self.crd_text, self.tmp = root, crd_text, None

    def __enter__(self) -> Path:
        path = self.root / CHART_CRD
        if path.exists() and path.read_text(encoding="utf-8") == self.crd_text:
            return self.root
        import tempfile

        self.tmp = tempfile.TemporaryDirectory(prefix="finetune-generate-")
        tmp_root = Path(self.tmp.name)
        shutil.copytree(self.root / CHART, tmp_root / CHART)
        (tmp_root / CHART_CRD).write_text(self.crd_text, encoding="utf-8")
        return tmp_root

    def __exit__(self, *exc) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()


def stale(helm_bin: str, root: Path = ROOT) -> list[Path]:
    """The generated files whose committed content differs from what the generator makes now."""
    return [rel for rel, text in outputs(helm_bin, root).items() if _read(root / rel) != text]


def write(helm_bin: str, root: Path = ROOT) -> list[Path]:
    """Rewrite every stale generated file; returns the ones written."""
    written = []
    for rel, text in outputs(helm_bin, root).items():
        if _read(root / rel) != text:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text, encoding="utf-8")
            written.append(rel)
    return written


def _read(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.exists() else None


# ------------------------------------------------------------------------------------------ the command
def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="rewrite every generated file (CRD, chart's CRD copy, install.yaml, "
                       "README spec reference) in this checkout")
    g.add_argument("--check", action="store_true", help="write nothing; exit 1 naming each stale file")
    g.add_argument("--helm", default=None, help="the helm binary (default: $HELM, tests/cluster/build.sh's, "
                   "or helm on PATH)")
    g.add_argument("--root", type=Path, default=ROOT, help="the checkout (default: the one holding controller/)")


def main(args) -> int:
    root = args.root.resolve()
    if not (root / CHART / "Chart.yaml").exists() or not (root / README).exists():
        raise SystemExit(f"{COMMAND} works on a checkout; {root} has no {CHART}/Chart.yaml or {README}")
    helm_bin = find_helm(args.helm, root)
    if args.check:
        out_of_date = stale(helm_bin, root)
        for rel in out_of_date:
            print(f"{rel} is out of date", file=sys.stderr)
        if out_of_date:
            print(f"run: {COMMAND}", file=sys.stderr)
        return 1 if out_of_date else 0
    written = write(helm_bin, root)
    for rel in written:
        print(f"wrote {rel}")
    if not written:
        print("every generated file is current")
    return 0
