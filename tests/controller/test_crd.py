"""The CRD: generated from runner/api/spec.py, committed, structural, and enforced by a real API server."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from controller import crd
from runner.api import names, status as contract
from tests.controller.conftest import ROOT, ftj_doc, wait_for

CRD_FILE = ROOT / "manifests" / "crds" / "finetunejobs.finetune.dev.yaml"


def spec_schema() -> dict:
    return crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def test_committed_crd_matches_the_model():
    committed = yaml.safe_load(CRD_FILE.read_text())
    assert committed == crd.crd(), (
        f"{CRD_FILE.relative_to(ROOT)} is out of date with runner/api/spec.py; regenerate it with "
        "`python -m controller generate` (the CRD, the chart's copy, install.yaml and the README reference)")


def test_cli_prints_the_committed_crd():
    out = subprocess.run([sys.executable, "-m", "controller", "crd"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert out == CRD_FILE.read_text()


def test_schema_carries_the_models_constraints():
    s = spec_schema()
    props = s["properties"]
    assert set(s["required"]) == {"model", "dataset", "output"}
    lora = props["lora"]["properties"]
    assert lora["r"] == {"description": "LoRA rank.", "type": "integer", "minimum": 1, "maximum": 1024, "default": 16}
    assert lora["alpha"]["minimum"] == 0 and lora["alpha"]["exclusiveMinimum"] is True
    assert lora["bias"]["enum"] == ["none", "all", "lora_only"]
    assert props["lora"]["default"] == {}  # so the API server fills in every default
    assert props["resources"]["properties"]["gpus"]["default"] == 1
    assert props["resources"]["properties"]["gpuResourceName"]["default"] == "nvidia.com/gpu"
    assert props["image"] == {"description": "Runner image (default: the operator's).", "type": "string",
                              "nullable": True, "maxLength": 512}
    assert props["hfTokenSecretRef"]["required"] == ["name"] and props["hfTokenSecretRef"]["nullable"] is True
    assert props["training"]["properties"]["optimizer"]["enum"][0] == "adamw_torch_fused"
    assert props["nodeSelector"]["additionalProperties"] == {"type": "string", "maxLength": 63}


def test_free_form_only_where_the_spec_is_free_form():
    preserved = []

    def walk(node, path):
        if node.get("x-kubernetes-preserve-unknown-fields"):
            preserved.append(path)
        for k, v in (node.get("properties") or {}).items():
            walk(v, f"{path}.{k}")
        if "items" in node:
            walk(node["items"], path + "[]")
        assert "$ref" not in node and "anyOf" not in node and node.get("additionalProperties") is not False

    walk(spec_schema(), "spec")
    assert sorted(preserved) == ["spec.affinity", "spec.env[]", "spec.tolerations[]"]


def test_every_string_list_and_map_is_bounded():
    """What the CRD can say of untrusted input (controller/limits.py): no string, list or map without a bound;
    status.metrics holds numbers only, so nothing in the status can nest."""
    v = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    unbounded = []

    def walk(node, path):
        kind = node.get("type")
        if (kind == "string" and not ({"maxLength", "enum", "format"} & set(node))
                or kind == "array" and "maxItems" not in node
                or kind == "object" and "properties" not in node and "maxProperties" not in node):
            unbounded.append(path)
        for k, sub in (node.get("properties") or {}).items():
            walk(sub, f"{path}.{k}")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], path + ".*")
        if "items" in node:
            walk(node["items"], path + "[]")

    walk(v["spec"], "spec")
    walk(v["status"], "status")
    assert not unbounded, unbounded
    assert v["status"]["properties"]["metrics"]["additionalProperties"] == {"type": "number"}
    assert v["spec"]["properties"]["affinity"]["maxProperties"] == 3
    assert v["spec"]["properties"]["env"]["items"]["maxProperties"] == 3


def test_immutable_fields_have_cel_rules_and_run_policy_does_not():
    rules = spec_schema()["x-kubernetes-validations"]
    fields = {r["message"].split()[0] for r in rules}
    assert {"spec.lora", "spec.model", "spec.image", "spec.resources"} <= fields
    assert not fields & {f"spec.{f}" for f in contract.MUTABLE_SPEC_FIELDS}


def test_status_schema_has_no_defaults_and_the_printer_columns_exist():
    v = crd.crd()["spec"]["versions"][0]
    assert "default" not in yaml.safe_dump(v["schema"]["openAPIV3Schema"]["properties"]["status"])
    assert [c["name"] for c in v["additionalPrinterColumns"]][:6] == ["Phase", "Progress", "Loss", "Attempt", "EST",
                                                                      "Age"]
    assert v["subresources"] == {"status": {}}
    assert crd.crd()["spec"]["names"]["shortNames"] == ["ftj"]


# --------------------------------------------------------------------------- against the API server
@pytest.mark.parametrize("patch,field,fragment", [
    ({"lora": {"r": 0}}, "spec.lora.r", "greater than or equal to 1"),
    ({"training": {"optimizer": "adam"}}, "spec.training.optimizer", "Unsupported value"),
    ({"resources": {"gpus": -1}}, "spec.resources.gpus", "greater than or equal to 0"),
    ({"output": None}, "spec.output", "Required value"),
])
def test_api_server_rejects_a_bad_spec_naming_the_field(cluster_api, patch, field, fragment):
    doc = ftj_doc("bad")
    for k, v in patch.items():
        if v is None:
            del doc["spec"][k]
        else:
            doc["spec"][k] = v
    with pytest.raises(ApiException) as e:
        cluster_api.create_ftj(doc)
    assert e.value.status == 422
    assert field in e.value.body and fragment in e.value.body, e.value.body


def test_defaults_are_filled_in_and_kubectl_shows_the_columns(k8s_cluster, cluster_api):
    cluster_api.create_ftj(ftj_doc("defaults"))
    spec = cluster_api.ftj("defaults")["spec"]
    assert spec["lora"]["r"] == 16 and spec["resources"] == {"gpus": 1, "nodes": 1, "gpuResourceName": "nvidia.com/gpu"}
    assert spec["backoffLimit"] == 3 and spec["suspend"] is False
    out = k8s_cluster.kubectl_run("get", "ftj", "-n", cluster_api.ns).stdout
    assert out.split()[:7] == ["NAME", "PHASE", "PROGRESS", "LOSS", "ATTEMPT", "EST", "AGE"]


def test_kubectl_explain_shows_the_descriptions(k8s_cluster):
    def explain():
        r = k8s_cluster.kubectl_run("explain", "ftj.spec.lora", check=False)
        return r.stdout if r.returncode == 0 and "LoRA rank" in r.stdout else None

    out = wait_for(explain, 30, interval=1, what="kubectl explain ftj.spec.lora")
    assert "targetModules" in out and "scaling numerator" in out


def test_examples_are_valid_for_the_api_server_and_the_runner(cluster_api):
    from runner.api.parse import parse_job

    examples = sorted((ROOT / "manifests" / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc.get("kind") != names.KIND:
                continue
            parse_job(doc)  # the runner's own validation, cross-field rules included
            created = cluster_api.kube.request(
                "POST", f"/apis/{names.API_VERSION}/namespaces/{cluster_api.ns}/{names.PLURAL}", doc,
                query=[("dryRun", "All")])
            assert created["spec"]["resources"]["gpuResourceName"] == "nvidia.com/gpu", path
