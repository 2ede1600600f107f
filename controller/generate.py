"""`python -m controller generate`: every file made from the contract and the chart (kubebuilder's `make manifests`).

A maintainer's command on a checkout, hidden from `python -m controller --help` (the operator's users never need
it; in the image it only says it needs a checkout).

    python -m controller generate           # after changing runner/api/spec.py or charts/: rewrite what is stale
    python -m controller generate --check   # write nothing; exit 1 naming each stale file

The generated files, in dependency order (tests/deploy fails while one is stale, naming this command):

    manifests/crds/finetunejobs.finetune.dev.yaml   the CRD (controller/crd.py, from runner/api/spec.py)
    charts/finetune-operator/files/crd.yaml         the chart's copy of it
    manifests/install.yaml                          a Namespace, then the chart rendered with its default values
    README.md, between the spec-reference markers   the spec reference (markdown(), below)

The spec reference (`markdown()`) renders every field of the contract's models, nested sections included, with
its type, default, allowed values or bounds and description. The command works on a checkout (the chart and the
README are read from it). install.yaml is rendered by helm: --helm, else $HELM, else the helm v3.6.2 that
tests/cluster/build.sh installs and caches (the one the tests render with), else `helm` on PATH.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from runner.api import names
from runner.api.cluster import ClusterFields
from runner.api.spec import FineTuneJobSpec

ROOT = Path(__file__).resolve().parents[1]  # the checkout
COMMAND = "python -m controller generate"
CHART = Path("charts") / "finetune-operator"
CRD_FILE = Path("manifests") / "crds" / f"{names.CRD_NAME}.yaml"
CHART_CRD = CHART / "files" / "crd.yaml"
INSTALL = Path("manifests") / "install.yaml"
README = Path("README.md")

INSTALL_RELEASE = "finetune-operator"
INSTALL_NAMESPACE = "finetune-system"
# The Kubernetes version install.yaml is rendered for (the chart leaves the CRD's CEL rules out before 1.25, whose
# API servers refuse them; `helm install` knows the cluster's version itself).
INSTALL_KUBE_VERSION = "1.27.0"


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
    p = helm(helm_bin, "template", INSTALL_RELEASE, str(root / CHART), "--namespace", INSTALL_NAMESPACE,
             "--kube-version", INSTALL_KUBE_VERSION)
    if p.returncode != 0:
        raise SystemExit(f"helm template {CHART} failed ({p.returncode}):\n{p.stderr}")
    header = f"""\
# The FineTuneJob operator with the chart's default values, for clusters without helm:
#
#   kubectl apply -f manifests/install.yaml
#
# Generated from charts/finetune-operator by `{COMMAND}`; do not edit by hand (a test keeps them in
# sync). To change images or options, use the chart: `helm template {INSTALL_RELEASE} charts/finetune-operator
# -n {INSTALL_NAMESPACE} --set ...`, or `helm install` (README: "Install on a cluster"). Rendered for Kubernetes
# {INSTALL_KUBE_VERSION}+ (1.25+ is enough); for an older cluster add `--kube-version` with its version to `helm template`.
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
    from controller import crd

    crd_text = crd.render()
    out = {CRD_FILE: crd_text, CHART_CRD: crd_text}
    with _chart_with_crd(root, crd_text) as chart_root:
        out[INSTALL] = render_install(helm_bin, chart_root)
    out[README] = with_reference((root / README).read_text(encoding="utf-8"))
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


# ------------------------------------------------------------------------------ the README's spec reference
# Every field of the contract's models (runner/api/spec.py), so the README cannot drift from the spec.
START = "<!-- spec-reference:start -->"
END = "<!-- spec-reference:end -->"


def markdown() -> str:
    """The reference: one table per section, the runner's fields first, then the cluster-only ones."""
    schema = FineTuneJobSpec.model_json_schema(by_alias=True)
    defs = schema.get("$defs", {})
    cluster = {f.alias or n for n, f in ClusterFields.model_fields.items()}
    props = schema["properties"]
    lines = [
        f"<!-- Generated from runner/api/spec.py by `{COMMAND}`; do not edit by hand. -->",
        "",
        "Every field of a FineTuneJob's `spec` (the same file runs under `kubectl apply` and `python -m runner "
        "run`). Field names are camelCase. Unknown fields are rejected by `python -m runner validate`, and by "
        "`kubectl apply` on Kubernetes 1.27+ (strict field validation). `kubectl explain ftj.spec.<field>` shows "
        "the same descriptions.",
    ]
    lines += _section("spec", "What the runner does. The runner and the cluster read these.", FineTuneJobSpec,
                      {k: v for k, v in props.items() if k not in cluster}, defs)
    lines += _section("spec", "Cluster-only fields: the controller reads them to build the runner's pod; the "
                      "runner ignores them (so the same file still runs standalone).", FineTuneJobSpec,
                      {k: v for k, v in props.items() if k in cluster}, defs, title="spec (cluster only)")
    return "\n".join(lines).rstrip() + "\n"


def _section(path: str, intro: str, model: type[BaseModel], props: dict, defs: dict,
             title: str | None = None) -> list[str]:
    out = ["", f"### `{title or path}`", "", intro, "", "| Field | Type | Default | Allowed | Description |",
           "|---|---|---|---|---|"]
    fields = {f.alias or n: f for n, f in model.model_fields.items()}
    nested: list[tuple[str, type[BaseModel], dict, str]] = []
    for name, raw in props.items():
        info = fields[name]
        node = _resolve(raw, defs)
        sub = _submodel(info.annotation)
        field_path = f"{path}.{name}"
        description = _description(raw, node)
        if sub is not None and node.get("type") == "array":  # a list of sections: its items' own table
            kind = f"list of objects ([`{field_path}`](#{_anchor(field_path)}))"
            nested.append((field_path, sub, _resolve(node["items"], defs), description))
        elif sub is not None:  # a nested section: a row that links to its own table
            kind = f"object ([`{field_path}`](#{_anchor(field_path)}))"
            nested.append((field_path, sub, node, description))
        else:
            kind = _type(node, defs)
        out.append(f"| `{name}` | {kind} | {_default(info, sub)} | {_allowed(node)} | {_cell(description)} |")
    for field_path, sub, node, description in nested:
        out += _section(field_path, description, sub, node["properties"], defs)
    return out


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The model class of a nested section (`Section` or `Section | None`), else None."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _default(info: FieldInfo, sub: type[BaseModel] | None) -> str:
    if info.is_required():
        return "**required**"
    value = info.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if sub is not None:
        return "all defaults"
    if value == [] or value == {}:
        return "empty"
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _resolve(node: dict, defs: dict) -> dict:
    """Inline `$ref`s and drop the `null` member of `X | None` (the field is optional: its default is null)."""
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    if "anyOf" in node:
        members = [m for m in node["anyOf"] if m.get("type") != "null"]
        if len(members) == 1:
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            return {**_resolve(members[0], defs), **rest}
    return node


def _type(node: dict, defs: dict) -> str:
    if "enum" in node or "const" in node:
        return node["type"] if isinstance(node.get("type"), str) else "string"  # integer for quantization.bits
    kind = node.get("type")
    if kind == "array":
        return f"list of {_type(_resolve(node.get('items', {}), defs), defs)}"
    if kind == "object":
        extra = node.get("additionalProperties")
        if isinstance(extra, dict) and extra.get("type"):
            return f"map of string to {_type(_resolve(extra, defs), defs)}"
        if node.get("properties"):
            return "object"
        return "object (free-form)"
    if isinstance(kind, list):
        return " or ".join(kind)
    return kind or "any"


def _allowed(node: dict) -> str:
    if "enum" in node:
        return ", ".join(f"`{v}`" for v in node["enum"])
    if "const" in node:
        return f"`{node['const']}`"
    bounds = []
    for key, sign in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<"),
                      ("minLength", "length ≥"), ("maxLength", "length ≤"), ("minItems", "items ≥"),
                      ("maxItems", "items ≤")):
        if key in node:
            bounds.append(f"{sign} {_number(node[key])}")
    if "pattern" in node:
        bounds.append(f"matches `{node['pattern']}`")
    return ", ".join(bounds)


def _number(v: Any) -> str:
    return f"{v:,}".replace(",", " ") if isinstance(v, int) and abs(v) >= 10_000 else str(v)


def _description(raw: dict, node: dict) -> str:
    text = raw.get("description") or node.get("description") or ""
    return " ".join(text.split())


def _anchor(path: str) -> str:
    """GitHub's heading anchor of "#### `spec.dataset.columns`"."""
    return "".join(c for c in path.lower() if c.isalnum() or c in "-_ ").replace(" ", "-")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def readme_block(text: str) -> str:
    """What the README holds between the markers (ValueError if they are missing)."""
    try:
        head, rest = text.split(START, 1)
        body, _ = rest.split(END, 1)
    except ValueError:
        raise ValueError(f"README.md needs the markers {START} and {END}") from None
    return body.strip("\n") + "\n"


def with_reference(text: str) -> str:
    """README text with `markdown()` between its markers (ValueError if they are missing)."""
    readme_block(text)  # the markers must be there
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{markdown()}{END}{tail}"


# ------------------------------------------------------------------------------------------ the command
def add_parser(sub) -> None:
    """The `generate` subcommand, hidden from `python -m controller --help` (no `help=`): it is a maintainer's
    command, for a checkout, not part of the operator a user runs."""
    g = sub.add_parser("generate", description="For maintainers, on a checkout: rewrite every file generated from "
                       "runner/api/spec.py and charts/ (the CRD, the chart's copy of it, manifests/install.yaml, the "
                       "README's spec reference) that is stale. Run it after changing either.")
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
