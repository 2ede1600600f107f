"""Reading a FineTuneJob: a YAML/JSON file or mapping in, a validated Job out, or a SpecError that holds
every problem at once, each naming its field and the fix.

    load_job(path) -> Job            a file holding a FineTuneJob manifest or a bare spec
    parse_job(doc) -> Job            the same for a mapping
    field_paths(message) -> str      a message's field paths written the one way: spec.dataset.source
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ValidationError
from pydantic.alias_generators import to_camel

from runner.api import untrusted
from runner.api.errors import SpecError
from runner.api.names import API_VERSION, KIND
from runner.api.spec import CHAT_TEMPLATE_NAMES, FineTuneJobSpec, Job, QuantizationSpec
from runner.api.untrusted import short
from runner.api.uris import Location

# The output heads: never adapted (all-linear leaves them out; runner/model/load.py's HEADS is the same set).
OUTPUT_HEADS = {"lm_head", "embed_out", "output", "score", "classifier"}
SEED_MAX = 2**32 - 1  # numpy's seeds, which the Trainer sets from training.seed
_K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_PLACEHOLDER = re.compile(r"(?<!\{)\{\s*[A-Za-z_][A-Za-z0-9_]*\s*\}(?!\})")
SPEC = "spec"  # a manifest's key holding the spec, and the first part of every field path a message leads with


# ------------------------------------------------------------------------------------------- loading
def load_job(path: str | Path) -> Job:
    """Read a YAML/JSON file holding a FineTuneJob manifest or a bare spec."""
    p = Path(path)
    try:
        doc = untrusted.read_yaml(p)
    except untrusted.FileProblem as e:
        raise SpecError([f"{str(p)[:200]}: {e}"]) from None
    return parse_job(doc, default_name=p.stem)


def parse_job(doc: Any, *, default_name: str = "finetune") -> Job:
    if not isinstance(doc, dict):
        raise SpecError(["the job must be a mapping: a FineTuneJob manifest or its spec"])
    shape = untrusted.shape_problem(doc)
    if shape:
        raise SpecError([shape])
    prefix = ""
    name = _dns_name(default_name)
    if SPEC in doc and "kind" not in doc and "apiVersion" not in doc:
        missing = (f"apiVersion, kind: missing; a file with `{SPEC}:` at the top is a FineTuneJob manifest: add "
                   f"`apiVersion: {API_VERSION}` and `kind: {KIND}` above `{SPEC}:`, or drop the `{SPEC}:` line "
                   f"and write the spec's fields (model:, dataset:, ...) at the top of the file")
        try:
            parse_job({**doc, "apiVersion": API_VERSION, "kind": KIND}, default_name=default_name)
        except SpecError as e:
            raise SpecError([missing, *e.problems]) from None
        raise SpecError([missing])
    if "kind" in doc or "apiVersion" in doc:
        problems = []
        if doc.get("kind") != KIND:
            problems.append(f"kind: must be {KIND} (got {short(doc.get('kind'))})")
        if doc.get("apiVersion") != API_VERSION:
            problems.append(f"apiVersion: must be {API_VERSION} (got {short(doc.get('apiVersion'))})")
        if not isinstance(doc.get("spec"), dict):
            problems.append("spec: missing; a FineTuneJob needs a spec mapping")
        given, problem = _metadata_name(doc)
        if problem:
            problems.append(problem)
        if problems:
            raise SpecError(problems)
        name = given or name
        doc, prefix = doc[SPEC], SPEC + "."
    problems = untrusted.raw_problems(doc, FineTuneJobSpec, prefix)
    flagged = {p.split(": ", 1)[0] for p in problems}  # said once, by the more precise message
    spec = None
    try:
        spec = FineTuneJobSpec.model_validate(doc)
    except ValidationError as e:
        problems += [p for p in (_explain(err, prefix) for err in e.errors()) if p.split(": ", 1)[0] not in flagged]
    problems += [prefix + p for p in cross_field_problems(doc)]
    if problems or spec is None:
        raise SpecError(list(dict.fromkeys(problems)))
    return Job(name=name, spec=spec)


def _metadata_name(doc: dict) -> tuple[str | None, str | None]:
    """(metadata.name, None), (None, None) when there is no metadata, or (None, what is wrong)."""
    if "metadata" not in doc:
        return None, None
    md = doc["metadata"]
    if not isinstance(md, dict):
        return None, f"metadata: must be a mapping such as {{name: my-job}} (got {short(md)})"
    name = md.get("name")
    if name is None:
        return None, "metadata.name: required in a FineTuneJob's metadata; add name: my-job"
    if not isinstance(name, str) or len(name) > 253 or not _K8S_NAME.match(name):
        fix = _dns_name(name) if isinstance(name, str) else "my-job"
        return None, (f"metadata.name: {short(name)} is not a Kubernetes name: use lowercase letters, digits, '-' "
                      f"and '.', starting and ending with a letter or digit, at most 253 characters (e.g. {fix!r})")
    return name, None


def _dns_name(name: str) -> str:
    """A Kubernetes name made from a file name: lowercase letters, digits and '-', at most 63 characters."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower())[:63].strip("-") or "finetune"


def field_paths(message: str) -> str:
    """`message` with each problem's leading field path written from the manifest's top, as parse errors, the
    controller, kubectl and the README's reference write them: a line (or a `- ` item) that starts with a path
    relative to the spec (dataset.source: ...) gets `spec.` in front (spec.dataset.source: ...)."""
    tops = "|".join(sorted((f.alias or n for n, f in FineTuneJobSpec.model_fields.items()), key=len, reverse=True))
    return re.sub(rf"^(\s*(?:- )?)(?=(?:{tops})[.\[:])", rf"\g<1>{SPEC}.", message, flags=re.M)


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
        if isinstance(part, int):  # an item of a list of sections (spec.volumes[0])
            continue
        fields = {f.alias or n: f for n, f in model.model_fields.items()}
        f = fields.get(part)
        ann = getattr(f, "annotation", None)
        ann = next((a for a in (ann, *get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)), ann)
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
        close = difflib.get_close_matches(to_camel(str(loc[-1])), allowed, n=1)
        hint = f"did you mean `{close[0]}`?" if close else f"allowed here: {', '.join(allowed)}"
        return f"{where}: unknown field; {hint}"
    if kind == "missing":
        return f"{where}: required field is missing; add it"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"{where}: {short(got)} is not allowed; use one of {expected}"
    msg = err["msg"]
    return f"{where}: {msg} (got {short(got)}); fix the value"


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
        problems.append("dataset.template: not used with format chat (the chat template is: the tokenizer's, or "
                        "dataset.chatTemplate); remove dataset.template")
    problems += _chat_template_problems(data.get("chatTemplate"), fmt)
    has_eval = any(data.get(k) is not None for k in ("evalSource", "evalSplit", "evalFraction"))
    needs_eval = [(f, why) for f, given, why in (
        ("training.earlyStopping", section("training").get("earlyStopping") is not None, "watches the eval loss"),
        ("output.publish", out.get("publish") == "best", "best picks the checkpoint by its eval loss"),
    ) if given]
    for field, why in needs_eval if not has_eval else []:
        problems.append(f"{field}: {why}, and this job has no eval set; set dataset.evalSource, dataset.evalSplit or "
                        f"dataset.evalFraction (e.g. evalFraction: 0.1), or remove {field}"
                        + (" (or set it to last)" if field == "output.publish" else ""))
    if fmt == "text" and (template.get("prompt") or template.get("completion")):
        problems.append("dataset.format: `text` has no prompt/completion split; use prompt-completion")

    problems += _checkpoint_place_problems(out)
    problems += _template_problems(template)
    problems += _target_problems(section("lora").get("targetModules"))
    seed = section("training").get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool) and not 0 <= seed <= SEED_MAX:
        problems.append(f"training.seed: {short(seed)} is outside 0..{SEED_MAX} (the seeds numpy takes); "
                        "pick a seed in that range, e.g. 42")
    merge = section("merge")
    if merge.get("enabled") is False and out.get("pushAdapter") is False:
        problems.append(
            "output.pushAdapter: with merge.enabled false the adapter is the only result; set it true"
        )
    training = section("training")
    if training.get("compile") is True and training.get("strategy") == "fsdp":
        problems.append("training.compile: compiled layers do not run under FSDP (it shards their weights); set "
                        "training.strategy to data or auto, or remove compile")
    problems += _bits_problems(section("quantization"), training, merge)
    return problems


def _bits_problems(q: dict, training: dict, merge: dict) -> list[str]:
    """Settings that mean something only for another quantization.bits."""
    bits = q.get("bits", 4)
    if bits not in (8, 16) or isinstance(bits, bool):
        return []
    problems = []
    for name in ("quant_type", "double_quant", "storage_dtype"):
        key, default = to_camel(name), QuantizationSpec.model_fields[name].default
        if key in q and q[key] != default:
            problems.append(f"quantization.{key}: applies to 4-bit quantization only, and quantization.bits is {bits}; "
                            "remove it or set bits: 4")
    if bits == 8 and training.get("strategy") == "fsdp":
        problems.append("training.strategy: fsdp cannot shard 8-bit (LLM.int8) weights; use data or auto, or "
                        "quantization.bits 4 or 16")
    if bits == 16 and merge.get("enabled") is not False and merge.get("base") == "dequantized":
        problems.append("merge.base: dequantized means the base rounded as quantized training saw it; with "
                        "quantization.bits 16 nothing was rounded: use original")
    return problems


def _checkpoint_place_problems(out: dict) -> list[str]:
    """Checkpoints live only where the scheme table (runner/api/uris.py) says a store can hold them."""
    def place(value: Any) -> Location | None:
        try:
            return Location.parse(value) if isinstance(value, str) else None
        except ValueError:
            return None  # reported with its field above

    dest, ckpt = place(out.get("destination")), place(out.get("checkpoints"))
    where = Location.checkpoint_schemes()
    if dest is not None and not dest.holds_checkpoints and out.get("checkpoints") is None:
        return [f"output.checkpoints: required when output.destination is {dest.rule.noun} ({dest.rule.title} "
                f"cannot hold checkpoints, so they cannot go beside it); set one of {where}, e.g. a path on a "
                "mounted volume"]
    if ckpt is not None and not ckpt.holds_checkpoints:
        return [f"output.checkpoints: {ckpt.rule.title} cannot hold checkpoints; use one of {where}"]
    return []


def _template_problems(template: dict) -> list[str]:
    problems = []
    for key in ("text", "prompt", "completion"):
        t = template.get(key)
        if not isinstance(t, str) or not ("{{" in t or "{%" in t):
            continue
        where = f"dataset.template.{key}"
        mixed = _PLACEHOLDER.search(t)
        if mixed:
            column = mixed.group().strip("{} ")
            problems.append(f"{where}: mixes a `{mixed.group()}` placeholder with Jinja (`{{{{ ... }}}}`); in a Jinja "
                            f"template `{mixed.group()}` would stay literal text: write `{{{{ {column} }}}}`")
    return problems  # Jinja syntax: runner.data.dataset.template_problems (the contract does not import jinja2)


def _chat_template_problems(value: Any, fmt: Any) -> list[str]:
    if not isinstance(value, str):
        return []
    if fmt not in ("auto", "chat"):
        return [f"dataset.chatTemplate: used only with format chat, and dataset.format is {short(fmt)}; remove "
                "dataset.chatTemplate, or set dataset.format: chat"]
    if value in CHAT_TEMPLATE_NAMES or "{{" in value or "{%" in value:
        return []  # Jinja syntax: runner.data.dataset.template_problems
    close = difflib.get_close_matches(value.strip().lower(), CHAT_TEMPLATE_NAMES, n=1, cutoff=0.5)
    hint = f"did you mean `{close[0]}`? " if close else ""
    return [f"dataset.chatTemplate: {short(value)} is neither a built-in template ({', '.join(CHAT_TEMPLATE_NAMES)}) "
            f"nor a Jinja chat template (no `{{{{ ... }}}}` or `{{% ... %}}` in it); {hint}use one of those names, "
            "or write the template in Jinja over `messages` (README: Chat templates)"]


def _target_problems(targets: Any) -> list[str]:
    names = [targets] if isinstance(targets, str) else targets if isinstance(targets, list) else []
    heads = [t for t in names if isinstance(t, str) and t in OUTPUT_HEADS]
    if not heads:
        return []
    return [f"lora.targetModules: {', '.join(heads)} is the model's output head, which the runner does not adapt: "
            "all-linear leaves heads out, and in QLoRA the head is not one of the 4-bit layers (bitsandbytes keeps "
            "it in 16 bits, often tied to the input embeddings), so peft would train and merge it differently from "
            f"every other adapter; remove {heads[0]} from lora.targetModules (or use all-linear)"]


def manifest(name: str, spec: dict, *, namespace: str | None = None) -> dict:
    """A FineTuneJob manifest holding `spec` (a mapping by alias): what the runner reads and reports."""
    metadata = {"name": name} if namespace is None else {"name": name, "namespace": namespace}
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec}
