"""README.md: the spec reference is the model's, and what it tells a platform team to run exists and works."""
from __future__ import annotations

import re

import pytest
import yaml

from controller import generate
from tests.deploy.conftest import CHART, README, ROOT, docs, template


def test_spec_reference_covers_every_field():
    from runner.api.spec import FineTuneJobSpec

    text = generate.markdown()

    def walk(model, path):
        for name, f in model.model_fields.items():
            alias = f.alias or name
            assert f"| `{alias}` |" in text, f"{path}.{alias} missing from the reference"
            sub = generate._submodel(f.annotation)
            if sub is not None:
                assert f"### `{path}.{alias}`" in text
                walk(sub, f"{path}.{alias}")

    walk(FineTuneJobSpec, "spec")
    lora = text.split("### `spec.lora`")[1].split("###")[0]
    assert "| `r` | integer | `16` | ≥ 1, ≤ 1024 | LoRA rank. |" in lora
    assert "| `bias` | string | `\"none\"` | `none`, `all`, `lora_only` |" in lora
    assert "| `model` | object ([`spec.model`](#specmodel)) | **required** |" in text


def test_the_reference_replaces_only_the_block():
    text = generate.with_reference(f"# T\nintro\n{generate.START}\nold\n{generate.END}\ntail\n")
    assert text.startswith("# T\nintro\n") and text.endswith(f"{generate.END}\ntail\n")
    assert generate.readme_block(text) == generate.markdown()
    assert generate.with_reference(text) == text
    with pytest.raises(ValueError, match="markers"):
        generate.with_reference("# no markers\n")


def test_files_the_readme_points_to_exist():
    text = README.read_text(encoding="utf-8")
    paths = set(re.findall(r"\]\(((?:manifests|charts)/[^)#]+)\)", text))
    paths |= set(re.findall(r"(?<![\w/])((?:manifests|charts)/[\w./-]+\.ya?ml)", text))
    assert len(paths) >= 8, paths
    for rel in paths:
        assert (ROOT / rel).exists(), f"README.md names {rel}, which does not exist"


def test_helm_commands_in_the_readme_render(helm_bin):
    """Every `--set key=value` the README shows is accepted by the chart's schema."""
    text = README.read_text(encoding="utf-8")
    sets = re.findall(r"--set ([\w.]+=[^\s\\`]+)", text)
    assert {s.split("=")[0] for s in sets} >= {"image.repository", "runner.image.repository"}
    objs = docs(template(helm_bin, *sets).stdout)
    deploy = next(d for d in objs if d["kind"] == "Deployment")
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--image=registry.example.com/finetune-runner:0.1.0" in args
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    table = text.split("| value | what it does |")[1].split("\n\n")[0]
    keys = {k for row in table.splitlines()[2:] for k in re.findall(r"`([\w.]+)[`:]", row.split(" | ")[0])}
    assert {"watchNamespaces", "runner.gpuResourceName", "crds.keep", "tolerations"} <= keys, keys
    for key in keys:
        node = values
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"README's values table names {key}, not in values.yaml"
            node = node[part]


def _section(text: str, title: str) -> str:
    assert f"\n## {title}\n" in text, f'README.md needs a "## {title}" section'
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_architecture_map_is_the_runners_own():
    """README "Architecture" names every runner package with the line runner/__init__.py gives it, lowest first."""
    import runner

    doc = runner.__doc__.split("lowest layer first", 1)[1].split("\n\n", 2)[1]
    packages: list[tuple[str, str]] = []
    for line in doc.splitlines():
        name, _, rest = line.strip().partition(" ")
        if line.startswith("    ") and not line.startswith("     "):
            packages.append((name, rest))
        else:
            packages[-1] = (packages[-1][0], f"{packages[-1][1]} {line}")
    assert len(packages) >= 8, packages
    section = _section(README.read_text(encoding="utf-8"), "Architecture")
    flat = " ".join(section.split())
    order = [flat.index(f" {name}/ ") for name, _ in packages]
    assert order == sorted(order), "README's package map is not in runner/__init__.py's order"
    for name, description in packages:
        assert f"{name}/ {' '.join(description.split())}" in flat, f"README's line for {name}/ is not runner's"
    for top in ("controller/", "charts/", "manifests/", "tests/", "bench/"):
        assert f"\n{top}" in section, f"README's Architecture does not place {top}"


def test_the_docs_speak_to_users():
    """No tracker numbers or project history in the docs a user reads; the measurements live in bench/README.md."""
    for path in (README, ROOT / "bench" / "README.md"):
        text = path.read_text(encoding="utf-8")
        found = re.findall(r"\bissue \d+|\bthe seeds\b|\bseed \d{3}\b|\bsession's\b", text, flags=re.I)
        assert not found, f"{path.name}: {found}"
    readme = README.read_text(encoding="utf-8")
    assert "](bench/README.md" in _section(readme, "Speed")
    assert len([line for line in _section(readme, "Speed").splitlines() if line.startswith("| ")]) <= 12
