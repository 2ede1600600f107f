"""What a job writes cannot hang its runner or pass for a retryable failure: a model file that is a device or a
FIFO, and templates whose rendering would take forever or fill the memory. Each ends `validate` and `run` with
exit 2 naming the field, fast, with no traceback - through the real `python -m runner` commands."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import yaml

from runner.api import errors
from tests.conftest import ROOT, job_doc, run_cli

HANG_BOUND_S = 120  # a hang would be killed here; the refusals take a second or two


def _validate(tmp_path, doc) -> tuple[int, str]:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    proc = subprocess.run([sys.executable, "-m", "runner", "validate", str(job)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=HANG_BOUND_S, cwd=tmp_path)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("odd", ["dev-zero", "fifo"])
def test_a_model_file_that_is_dev_zero_or_a_fifo_is_a_permanent_error_naming_the_model(odd, tiny_llama, qa_jsonl,
                                                                                          tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    (model / "tokenizer_config.json").unlink()
    if odd == "dev-zero":
        (model / "tokenizer_config.json").symlink_to("/dev/zero")
    else:
        os.mkfifo(model / "tokenizer_config.json")
    doc = job_doc(model, qa_jsonl, tmp_path / "out")
    code, text = _validate(tmp_path, doc)
    assert code == errors.EXIT_PERMANENT, text
    assert "model.source" in text and "tokenizer_config.json" in text and "Traceback" not in text, text
    assert ("/dev/zero" in text and "character device" in text) if odd == "dev-zero" else "a FIFO" in text

    code, events, stderr, result = run_cli(tmp_path, doc)
    assert code == errors.EXIT_PERMANENT, stderr
    assert result["reason"] == errors.INVALID_SPEC and "model.source" in result["message"], result
    assert "tokenizer_config.json" in result["message"] and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- templates
STATIC = {  # refused by validate from the template's text alone
    "repetition": ("prompt", "{{ 'A' * 3000000000 }}Q: {{ question }}", "3000000000 times"),
    "nested-loops": ("text", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
                             "{{ question }} {{ answer }}", "nested loops"),
    "lipsum": ("completion", "{{ lipsum(n=3000000) }}{{ answer }}", "lipsum"),
    "power": ("prompt", "{{ 10 ** 100000000 }}{{ question }}", "too large"),
    "width": ("prompt", "{{ question|center(3000000000) }}", "center"),
}
DYNAMIC = {  # sizes only rendering knows: refused by run on the first example
    "repetition": ("prompt", "{{ 'A' * (3e9|int) }}Q: {{ question }}", "3000000000 times"),
    "nested-loops": ("prompt", "{% set n = 100000 %}{% for i in range(n) %}{% for j in range(n) %}{% endfor %}"
                               "{% endfor %}{{ question }}", "took more than"),
    "growing-text": ("completion", "{% set s = answer * 1000000 %}{% for i in range(100) %}{{ s }}{% endfor %}",
                     "exceed"),
}


def _template_doc(model, data, out, key: str, template: str) -> dict:
    halves = {"prompt": "Q: {{ question }}\nA:", "completion": " {{ answer }}"}
    return job_doc(model, data, out, dataset={"template": {key: template} if key == "text" else {**halves, key: template}})


@pytest.mark.parametrize("case", STATIC)
def test_validate_refuses_templates_that_would_render_forever_or_fill_the_memory(case, tiny_llama, qa_jsonl, tmp_path):
    key, template, words = STATIC[case]
    code, text = _validate(tmp_path, _template_doc(tiny_llama, qa_jsonl, tmp_path / "out", key, template))
    assert code == errors.EXIT_PERMANENT and f"dataset.template.{key}" in text and words in text, text
    assert "Traceback" not in text


def test_validate_refuses_a_chat_template_asking_for_too_much_lipsum(tiny_llama, qa_jsonl, tmp_path):
    doc = job_doc(tiny_llama, qa_jsonl, tmp_path / "out", dataset={"chatTemplate": "{{ lipsum(3000000) }}"})
    code, text = _validate(tmp_path, doc)
    assert code == errors.EXIT_PERMANENT and "dataset.chatTemplate" in text and "lipsum" in text, text


@pytest.mark.parametrize("case", DYNAMIC)
def test_run_stops_a_runaway_template_with_a_permanent_error_naming_the_field(case, tiny_llama, qa_jsonl, tmp_path):
    key, template, words = DYNAMIC[case]
    doc = _template_doc(tiny_llama, qa_jsonl, tmp_path / "out", key, template)
    code, text = _validate(tmp_path, doc)
    assert code == 0, text  # nothing in its text alone says how large it renders
    code, events, stderr, result = run_cli(tmp_path, doc)
    assert code == errors.EXIT_PERMANENT, stderr[-3000:]
    assert result["reason"] == errors.INVALID_SPEC and f"dataset.template.{key}" in result["message"], result
    assert words in result["message"] and "MemoryError" not in result["message"], result
    assert not (tmp_path / "out").exists()
