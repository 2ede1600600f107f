"""Reading a FineTuneJob: a YAML/JSON file or mapping in, a validated Job out, or a SpecError that holds
every problem at once, each naming its field and the fix.

    load_job(path) -> Job            a file holding a FineTuneJob manifest or a bare spec
    parse_job(doc) -> Job            the same for a mapping
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from runner.api.errors import SpecError
from runner.api.names import API_VERSION, KIND
from runner.api.spec import FineTuneJobSpec, Job
from runner.api.uris import Location


# ------------------------------------------------------------------------------------------- loading
def load_job(path: str | Path) -> Job:
    """Read a YAML/JSON file holding a FineTuneJob manifest or a bare spec."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError([f"{p}: cannot read the job file ({e.strerror}); give the path of a YAML file"])
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError([f"{p}: not valid YAML ({e}); fix the syntax"])
    return parse_job(doc, default_name=p.stem)


def parse_job(doc: Any, *, default_name: str = "finetune") -> Job:
    if not isinstance(doc, dict):
        raise SpecError(["the job must be a mapping: a FineTuneJob manifest or its spec"])
    prefix = ""
    name = default_name
    if "kind" in doc or "apiVersion" in doc:
        problems = []
        if doc.get("kind") != KIND:
            problems.append(f"kind: must be {KIND} (got {doc.get('kind')!r})")
        if doc.get("apiVersion") != API_VERSION:
            problems.append(
                f"apiVersion: must be {API_VERSION} (got {doc.get('apiVersion')!r})"
            )
        if not isinstance(doc.get("spec"), dict):
            problems.append("spec: missing; a FineTuneJob needs a spec mapping")
        if problems:
            raise SpecError(problems)
        name = (doc.get("metadata") or {}).get("name") or default_name
        doc, prefix = doc["spec"], "spec."
    problems: list[str] = []
    spec = None
    try:
        spec = FineTuneJobSpec.model_validate(doc)
    except ValidationError as e:
        problems += [_explain(err, prefix) for err in e.errors()]
    problems += [prefix + p for p in cross_field_problems(doc)]
    if problems or spec is None:
        raise SpecError(problems)
    return Job(name=_dns_name(name), spec=spec)


def _dns_name(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "finetune"


# -------------------------------------------------------------------------------- error explanations
def _loc_str(loc: tuple, prefix: str) -> str:
    out = prefix.rstrip(".")
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[str]", "int", "float", "bool", "constrained-str"):
            continue  # pydantic union member tags
        else:
            out += ("." if out else "") + str(part)
    return out


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: Any = FineTuneJobSpec
    for part in loc:
        fields = {f.alias or n: f for n, f in model.model_fields.items()}
        f = fields.get(part)
        ann = getattr(f, "annotation", None)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return model if f is None else None
    return model


def _explain(err: dict, prefix: str) -> str:
    loc = tuple(err["loc"])
    where = _loc_str(loc, prefix)
    kind = err["type"]
    got = err.get("input")
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        allowed = sorted(f.alias or n for n, f in parent.model_fields.items()) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean `{close[0]}`?" if close else f"allowed here: {', '.join(allowed)}"
        return f"{where}: unknown field; {hint}"
    if kind == "missing":
        return f"{where}: required field is missing; add it"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"{where}: {got!r} is not allowed; use one of {expected}"
    msg = err["msg"]
    return f"{where}: {msg} (got {got!r}); fix the value"


# ---------------------------------------------------------------------------------- cross-field rules
def cross_field_problems(doc: dict) -> list[str]:
    """Rules that involve several fields. Works on the raw mapping so it runs even beside field errors."""
    problems: list[str] = []

    def section(name: str) -> dict:
        v = doc.get(name)
        return v if isinstance(v, dict) else {}

    def check_uri(field: str, value: Any) -> None:
        if isinstance(value, str):
            try:
                Location.parse(value)
            except ValueError as e:
                problems.append(f"{field}: {e}")

    model, data, out = section("model"), section("dataset"), section("output")
    check_uri("model.source", model.get("source"))
    for key in ("source", "evalSource"):
        check_uri(f"dataset.{key}", data.get(key))
    check_uri("output.destination", out.get("destination"))
    check_uri("output.checkpoints", out.get("checkpoints"))

    evals = [k for k in ("evalSource", "evalSplit", "evalFraction") if data.get(k) is not None]
    if len(evals) > 1:
        problems.append(
            f"dataset: {' and '.join(evals)} are alternatives; keep only one way to get the eval set"
        )

    template = data.get("template") if isinstance(data.get("template"), dict) else {}
    fmt = data.get("format", "auto")
    if template.get("text") and (template.get("prompt") or template.get("completion")):
        problems.append(
            "dataset.template: give either `text`, or `prompt` and `completion`, not both"
        )
    if bool(template.get("prompt")) != bool(template.get("completion")) and not template.get("text"):
        missing = "completion" if template.get("prompt") else "prompt"
        problems.append(f"dataset.template.{missing}: required together with the other half of the pair")
    if fmt == "chat" and template:
        problems.append("dataset.template: not used with format chat (the tokenizer's chat template is)")
    if fmt == "text" and (template.get("prompt") or template.get("completion")):
        problems.append("dataset.format: `text` has no prompt/completion split; use prompt-completion")

    dest = out.get("destination")
    if isinstance(dest, str) and dest.startswith("hf://") and not out.get("checkpoints"):
        problems.append(
            "output.checkpoints: required when output.destination is a Hub repo (checkpoints are not "
            "pushed to the Hub); set an s3:// prefix or a path on a mounted volume"
        )
    ckpt = out.get("checkpoints")
    if isinstance(ckpt, str) and ckpt.startswith("hf://"):
        problems.append("output.checkpoints: the Hub cannot hold checkpoints; use s3:// or a local path")
    merge = section("merge")
    if merge.get("enabled") is False and out.get("pushAdapter") is False:
        problems.append(
            "output.pushAdapter: with merge.enabled false the adapter is the only result; set it true"
        )
    return problems


def manifest(name: str, spec: dict, *, namespace: str | None = None) -> dict:
    """A FineTuneJob manifest holding `spec` (a mapping by alias): what the runner reads and reports."""
    metadata = {"name": name} if namespace is None else {"name": name, "namespace": namespace}
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec}
