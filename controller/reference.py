"""The spec reference in the README, rendered from the contract's models (runner/api/spec.py), so it cannot drift.

`markdown()` renders every field of `FineTuneJobSpec`, nested sections included, with its type, default,
allowed values or bounds, and description. `with_reference()` puts it into README.md's text between the markers
`<!-- spec-reference:start -->` and `<!-- spec-reference:end -->`; `python -m controller generate` (generate.py)
writes it, and tests/deploy checks the committed README is current.
"""
from __future__ import annotations

import json
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from runner.api.spec import ClusterFields, FineTuneJobSpec

START = "<!-- spec-reference:start -->"
END = "<!-- spec-reference:end -->"
COMMAND = "python -m controller generate"


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
        if sub is not None:  # a nested section: a row that links to its own table
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
        return "string"
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


# ---------------------------------------------------------------------------------------------- README
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
