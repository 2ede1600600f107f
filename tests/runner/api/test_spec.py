"""The spec: defaults users expect, every error at once, each naming its field and the fix."""
from __future__ import annotations

import pytest
import yaml

from runner.api.errors import SpecError
from runner.api.spec import FineTuneJobSpec
from runner.api.parse import load_job, parse_job

MINIMAL = {"model": {"source": "hf://org/base"}, "dataset": {"source": "data.jsonl"},
           "output": {"destination": "./out"}}


def _errors(doc) -> list[str]:
    with pytest.raises(SpecError) as e:
        parse_job(doc)
    return e.value.problems


def test_bare_spec_and_manifest_are_both_accepted(tmp_path):
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump(MINIMAL))
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                                        "metadata": {"name": "my-job.v2"}, "spec": MINIMAL}))
    assert load_job(bare).spec == load_job(manifest).spec
    assert load_job(manifest).name == "my-job.v2"
    assert load_job(bare).name == "bare"
    odd = tmp_path / ("My_Job " + "x" * 300 + ".yaml")[-200:]  # a bare spec's name comes from its file name
    odd.write_text(yaml.safe_dump(MINIMAL))
    assert len(load_job(odd).name) <= 63 and load_job(odd).name.isascii()


def test_metadata_name_must_be_a_kubernetes_name():
    for bad in ("My_Job", "-x", "x" * 254, "a/b", 42, ""):
        doc = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": bad}, "spec": MINIMAL}
        assert any(p.startswith("metadata.name:") for p in _errors(doc)), bad
    doc = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": ["x"], "spec": MINIMAL}
    assert _errors(doc) == ["metadata: must be a mapping such as {name: my-job} (got a list)"]


def test_defaults_are_the_qlora_recipe():
    s = parse_job(MINIMAL).spec
    assert (s.quantization.quant_type, s.quantization.double_quant, s.quantization.compute_dtype) == ("nf4", True, "auto")
    assert s.lora.target_modules == ["all-linear"] and s.lora.r == 16
    assert s.merge.enabled and s.merge.dtype == "float16"
    assert s.output.private and s.output.push_adapter
    assert s.dataset.format == "auto" and s.dataset.split == "train"
    assert s.model.trust_remote_code is False


def test_target_modules_accepts_one_name():
    s = parse_job({**MINIMAL, "lora": {"targetModules": "query_key_value"}}).spec
    assert s.lora.target_modules == ["query_key_value"]


def test_every_problem_is_reported_at_once_with_field_and_fix():
    doc = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "x"}, "spec": {
        "model": {"sorce": "hf://a/b"},
        "dataset": {"source": "d.jsonl", "format": "csvv", "evalSplit": "v", "evalFraction": 0.1},
        "lora": {"r": 0},
        "training": {"learningRate": -1, "optimiser": "adamw"},
        "output": {"destination": "hf://org/model"},
    }}
    problems = _errors(doc)
    text = "\n".join(problems)
    assert "spec.model.sorce: unknown field; did you mean `source`?" in text
    assert "spec.model.source: required field is missing; add it" in text
    assert "spec.dataset.format: 'csvv' is not allowed; use one of" in text
    assert "spec.lora.r:" in text and "greater than or equal to 1" in text
    assert "spec.training.learningRate:" in text
    assert "spec.training.optimiser: unknown field; did you mean `optimizer`?" in text
    assert "spec.dataset: evalSplit and evalFraction are alternatives" in text
    assert "spec.output.checkpoints: required when output.destination is a Hub repo" in text
    assert len(problems) == 8


@pytest.mark.parametrize("uri, needle", [
    ("az://bucket/x", "model.source"),
    ("s3://", "model.source"),
    ("hf://justaname", "model.source"),
])
def test_malformed_uris(uri, needle):
    problems = _errors({**MINIMAL, "model": {"source": uri}})
    assert any(p.startswith(needle) for p in problems), problems


def test_template_halves_and_format_conflicts():
    problems = _errors({**MINIMAL, "dataset": {"source": "d.jsonl", "format": "chat", "template": {"prompt": "{a}"}}})
    text = "\n".join(problems)
    assert "dataset.template.completion: required together" in text
    assert "not used with format chat" in text


def test_wrong_kind_and_api_version():
    problems = _errors({"apiVersion": "v1", "kind": "Pod", "spec": MINIMAL})
    assert any(p.startswith("kind:") for p in problems) and any(p.startswith("apiVersion:") for p in problems)


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(SpecError, match="cannot read the job file"):
        load_job(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_job(bad)


def test_schema_has_camel_case_fields_descriptions_and_enums():
    schema = FineTuneJobSpec.model_json_schema(by_alias=True)
    lora = schema["$defs"]["LoraSpec"]["properties"]
    assert "targetModules" in lora and lora["r"]["minimum"] == 1 and lora["r"]["description"]
    assert set(schema["$defs"]["QuantizationSpec"]["properties"]["quantType"]["enum"]) == {"nf4", "fp4"}
    assert {"model", "dataset", "output"} <= set(schema["required"])
