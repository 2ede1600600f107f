"""The FineTuneJob CustomResourceDefinition, generated from the runner's pydantic spec.

    python -m controller crd > manifests/crds/finetunejobs.finetune.dev.yaml

`structural()` turns pydantic's JSON schema (draft 2020-12) into a Kubernetes structural OpenAPI v3
schema: `$ref`s inlined, `anyOf [X, null]` -> X with `nullable: true`, `exclusiveMinimum: n` ->
`minimum: n, exclusiveMinimum: true`, `additionalProperties: false` dropped (Kubernetes prunes or,
with strict field validation, rejects unknown fields), `null` defaults dropped, `default: {}` on
sections whose fields all have defaults (so the API server fills in every default), and
`x-kubernetes-preserve-unknown-fields` only for free-form mappings (tolerations, affinity, env items).
"""
from __future__ import annotations

import copy
from typing import Any

import yaml

from controller import limits
from runner.api import names, status as contract
from runner.api.spec import FineTuneJobSpec

# Descriptions for spec fields the pydantic model leaves undocumented (used only where it has none).


def structural(schema: dict) -> dict:
    """The structural OpenAPI v3 schema of a pydantic JSON schema (with `$defs`)."""
    defs = schema.get("$defs", {})
    return _convert(schema, defs, path=())


def _resolve(node: dict, defs: dict) -> dict:
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
        extra = {k: v for k, v in node.items() if k != "$ref"}
        return {**target, **extra}  # the property's own description wins over the model's docstring
    return node


def _convert(node: dict, defs: dict, path: tuple[str, ...]) -> dict:
    node = _resolve(node, defs)
    out: dict[str, Any] = {}
    if "anyOf" in node:
        members = [m for m in node["anyOf"] if m.get("type") != "null"]
        nullable = len(members) < len(node["anyOf"])
        if len(members) != 1:
            raise ValueError(f"{'.'.join(path)}: unions other than `X | None` cannot be structural")
        merged = {**{k: v for k, v in node.items() if k != "anyOf"}, **_resolve(members[0], defs)}
        if "description" in node:
            merged["description"] = node["description"]
        out = _convert(merged, defs, path)
        if nullable:
            out["nullable"] = True
        return out

    if "description" in node:
        out["description"] = " ".join(node["description"].split())
    if "const" in node:
        node = {**node, "enum": [node["const"]]}
    kind = node.get("type")
    if kind is None and "enum" in node:
        kind = "string"
    if kind is None:
        raise ValueError(f"{'.'.join(path)}: no type in {node}")
    out["type"] = kind
    for key in ("enum", "minimum", "maximum", "minLength", "maxLength", "pattern", "minItems", "maxItems",
                "format"):
        if key in node:
            out[key] = node[key]
    for key, base in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if key in node:
            out[base] = node[key]
            out[key] = True
    if node.get("default") is not None:
        out["default"] = node["default"]

    if kind == "object":
        props = node.get("properties")
        extra = node.get("additionalProperties")
        if props:
            out["properties"] = {k: _convert(v, defs, path + (k,)) for k, v in props.items()}
            if node.get("required"):
                out["required"] = list(node["required"])
            elif "default" not in node:  # (an optional section, `X | None = None`, stays unset)
                out["default"] = {}  # every field has a default: let the API server fill them in
        elif isinstance(extra, dict):
            out["additionalProperties"] = _convert(extra, defs, path + ("*",))
        else:  # dict[str, Any]: a free-form mapping (tolerations, affinity, env items)
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        out["items"] = _convert(node.get("items", {}), defs, path + ("[]",))
    return out


def immutability_rules(spec_schema: dict) -> list[dict]:
    """CEL transition rules (enforced by Kubernetes 1.25+; older servers ignore them) that reject changes
    to every spec field but the run policy, once the FineTuneJob exists. The controller reports the same
    thing as a Warning Event where the server does not enforce them."""
    rules = []
    for field in spec_schema["properties"]:
        if field in contract.MUTABLE_SPEC_FIELDS:
            continue
        rules.append({
            "rule": f"has(self.{field}) == has(oldSelf.{field}) && (!has(self.{field}) || self.{field} == oldSelf.{field})",
            "message": f"spec.{field} cannot change after the FineTuneJob was created; delete and re-create it "
            f"(only {', '.join(contract.MUTABLE_SPEC_FIELDS)} may change)",
        })
    return rules


def spec_schema() -> dict:
    spec = structural(FineTuneJobSpec.model_json_schema(by_alias=True))
    spec.pop("default", None)
    spec["description"] = (
        "What to fine-tune and how (the runner's job spec), plus fields only the cluster needs: resources, "
        "image, scheduling, credentials as Secret references, and the run policy (backoffLimit, "
        "activeDeadlineSeconds, ttlSecondsAfterFinished, suspend)."
    )
    spec = limits.schema_bounds(spec, "spec")  # every string, list and map bounded (controller/limits.py)
    spec["x-kubernetes-validations"] = immutability_rules(spec)
    return spec


def _strip_defaults(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_defaults(v) for k, v in node.items() if k != "default"}
    if isinstance(node, list):
        return [_strip_defaults(v) for v in node]
    return node


def status_schema() -> dict:
    # No defaults in status: the API server would otherwise add empty objects on every write.
    status = _strip_defaults(structural(contract.FineTuneJobStatus.model_json_schema(by_alias=True)))
    status["properties"]["metrics"] = {  # numbers by name: nothing nested (anyone with the runner's token writes it)
        "description": status["properties"]["metrics"].get("description", ""),
        "type": "object",
        "nullable": True,
        "additionalProperties": {"type": "number"},
    }
    status = limits.schema_bounds(status, "status")
    status["description"] = "Observed state, rebuilt by the controller on every pass (see status.runner for what " \
                            "the runner reports itself)."
    return status


def crd(cel: bool = True) -> dict:
    """The CRD. `cel=False` leaves out the CEL rules, for API servers older than 1.25, whose published
    OpenAPI makes `kubectl apply` refuse the unknown `x-kubernetes-validations` (the controller still
    reports ignored spec changes with an Event)."""
    spec = spec_schema()
    if not cel:
        spec.pop("x-kubernetes-validations")
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": names.CRD_NAME},
        "spec": {
            "group": names.GROUP,
            "scope": "Namespaced",
            "names": {
                "plural": names.PLURAL,
                "singular": names.SINGULAR,
                "kind": names.KIND,
                "listKind": f"{names.KIND}List",
                "shortNames": list(names.SHORT_NAMES),
            },
            "versions": [{
                "name": names.VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary"},
                    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
                    {"name": "Attempt", "type": "integer", "jsonPath": ".status.attempt"},
                    {"name": "EST", "type": "string", "jsonPath": ".status.estimate.summary",
                     "description": "Estimated training time and GPU-hours (status.estimate)"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    {"name": "Reason", "type": "string", "jsonPath": ".status.reason", "priority": 1},
                    {"name": "Output", "type": "string", "jsonPath": ".status.output", "priority": 1},
                ],
                "schema": {"openAPIV3Schema": {
                    "description": "A QLoRA fine-tuning job: one spec in, a fine-tuned model out.",
                    "type": "object",
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec,
                        "status": status_schema(),
                    },
                }},
            }],
        },
    }


HEADER = "# Generated from runner/api/spec.py by `python -m controller generate`; do not edit by hand.\n"


def render(cel: bool = True) -> str:
    return HEADER + yaml.safe_dump(crd(cel), sort_keys=False, width=120, allow_unicode=True)
