"""dataset.chatTemplate: a chat job on a base tokenizer with no chat template names a built-in or writes its own;
each built-in renders exactly what the README says, the loss is on the assistant turns, the published tokenizer
carries the template, and a wrong value is refused at validate with the field and the fix."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
from pathlib import Path

import datasets
import pytest
import yaml

from runner.data import dataset as data_phase
from runner.model import load as model_load
from runner.__main__ import main
from runner.api import errors
from runner.api.errors import PermanentError
from runner.api.parse import manifest, parse_job
from runner.api.spec import DatasetSpec, ModelSpec
from runner.data.dataset import DataError
from runner.job import run_job
from runner.report.events import Reporter
from tests.conftest import job_doc, write_jsonl

TALK = [{"role": "system", "content": "you are good"}, {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi there"}, {"role": "user", "content": "sky"},
        {"role": "assistant", "content": "blue"}]
# What the README's "Chat templates" table says each built-in renders, for the tiny tokenizer (<s>, </s>).
RENDERED = {
    "chatml": "<|im_start|>system\nyou are good<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
              "hi there<|im_end|>\n<|im_start|>user\nsky<|im_end|>\n<|im_start|>assistant\nblue<|im_end|>\n",
    "llama-2": "<s>[INST] <<SYS>>\nyou are good\n<</SYS>>\n\nhello [/INST] hi there </s><s>[INST] sky [/INST] blue </s>",
    "alpaca": "you are good\n\n### Instruction:\nhello\n\n### Response:\nhi there</s>\n\n### Instruction:\nsky\n\n"
              "### Response:\nblue</s>",
}
PROMPT = {  # the conversation up to the last user turn, with add_generation_prompt
    "chatml": "<|im_start|>user\nsky<|im_end|>\n<|im_start|>assistant\n",
    "llama-2": "<s>[INST] sky [/INST]",
    "alpaca": "### Instruction:\nsky\n\n### Response:\n",
}

# The loss: each answer and its end marker, nothing of the system or user turns. llama-2 and alpaca end answers
# with EOS (the model learns to stop); ChatML with <|im_end|> (unknown to this word-level tokenizer: one piece).
TRAINED = {
    "chatml": ["hi", "there<|im_end|>", "blue<|im_end|>"],
    "llama-2": ["hi", "there", "</s>", "blue", "</s>"],
    "alpaca": ["hi", "there", "</s>", "blue", "</s>"],
}


@pytest.fixture()
def base_tok(tiny_llama):
    """The tiny Llama's tokenizer as a base model's: no chat template."""
    tok = model_load.load_tokenizer(tiny_llama, ModelSpec(source=str(tiny_llama)))
    tok.chat_template = None
    return tok


def _prepare(tok, rows, **spec):
    return data_phase.prepare(DatasetSpec(source="chat.jsonl", **spec), datasets.Dataset.from_list(rows), None, tok,
                              seed=0)


def _trained(text: str, tok, example) -> list[str]:
    """The pieces of the text whose tokens carry loss (by offsets, so that unknown words show as written)."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == example["input_ids"]
    return [text[a:b] for (a, b), m in zip(enc["offset_mapping"], example["completion_mask"]) if m]


def test_a_base_tokenizer_without_a_chat_template_names_the_field_and_the_fix(base_tok):
    with pytest.raises(DataError) as e:
        _prepare(base_tok, [{"messages": TALK}])
    assert e.value.message.startswith("dataset.chatTemplate: ")
    assert "chatml, llama-2, alpaca" in e.value.message


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_each_built_in_renders_as_documented_and_trains_on_the_assistant_turns(name, base_tok):
    tok = copy.deepcopy(base_tok)
    out = _prepare(tok, [{"messages": TALK}], chat_template=name)
    assert out.fmt == "chat"
    # The tokenizer now carries the template: apply_chat_template (what users call) renders what training saw.
    assert tok.apply_chat_template(TALK, tokenize=False) == RENDERED[name]
    assert tok.apply_chat_template(TALK[3:4], tokenize=False, add_generation_prompt=True) == PROMPT[name]
    assert _trained(RENDERED[name], tok, out.train[0]) == TRAINED[name]


def test_a_jinja_template_of_ones_own_is_rendered_in_the_sandbox(base_tok):
    own = "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}{{ eos_token if m['role'] == " \
          "'assistant' }}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    tok = copy.deepcopy(base_tok)
    out = _prepare(tok, [{"messages": TALK[1:3]}], chat_template=own)
    text = "USER: hello\nASSISTANT: hi there</s>\n"
    assert tok.apply_chat_template(TALK[1:3], tokenize=False) == text
    assert _trained(text, tok, out.train[0]) == ["hi", "there", "</s>"]
    # the sandbox: a template that reaches for Python internals fails as the user's error, naming the field
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(PermanentError, match=r"^dataset\.chatTemplate: the template failed") as e:
        _prepare(copy.deepcopy(base_tok), [{"messages": TALK[1:3]}], chat_template=escape)
    assert e.value.reason == errors.INVALID_SPEC


def test_the_spec_tokenizers_own_template_is_overridden(tiny_llama):
    tok = model_load.load_tokenizer(tiny_llama, ModelSpec(source=str(tiny_llama)))
    assert tok.chat_template  # the tiny Llama has one; the job's wins
    _prepare(tok, [{"messages": TALK}], chat_template="alpaca")
    assert tok.apply_chat_template(TALK, tokenize=False) == RENDERED["alpaca"]


def _validate(tmp_path: Path, dataset: dict) -> tuple[int, str]:
    spec = {"model": {"source": "hf://org/base"}, "dataset": {"source": "hf://datasets/org/chat", **dataset},
            "output": {"destination": "s3://bucket/out"}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest("chat-job", spec)))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(["validate", "--spec-only", str(path)])
    return code, out.getvalue()


@pytest.mark.parametrize("dataset, needle", [
    ({"chatTemplate": "chat-ml"}, "spec.dataset.chatTemplate: 'chat-ml' is neither a built-in template (chatml, "
                                  "llama-2, alpaca) nor a Jinja chat template"),
    ({"chatTemplate": "chat-ml"}, "did you mean `chatml`?"),
    ({"chatTemplate": "chatml", "format": "text"}, "spec.dataset.chatTemplate: used only with format chat"),
    ({"chatTemplate": "{% for m in messages %}{{ m.content }"}, "dataset.chatTemplate: Jinja syntax error on line 1"),
])
def test_a_wrong_chat_template_is_refused_at_validate(dataset, needle, tmp_path):
    code, text = _validate(tmp_path, dataset)
    assert code == errors.EXIT_PERMANENT, text
    assert needle in text and "Traceback" not in text


def test_built_in_names_validate(tmp_path):
    for name in RENDERED:
        code, text = _validate(tmp_path, {"chatTemplate": name, "format": "chat"})
        assert code == 0, text


def test_a_chat_job_on_a_base_model_publishes_a_tokenizer_with_the_template(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    (base / "chat_template.jinja").unlink(missing_ok=True)
    rows = [{"messages": [{"role": "user", "content": f"what is {a} plus {b} ?"},
                          {"role": "assistant", "content": str(a + b)}]} for a in range(1, 9) for b in range(1, 5)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "out"
    doc = job_doc(base, data, out, dataset={"format": "chat", "chatTemplate": "alpaca"},
                  training={"maxSteps": 2, "saveSteps": 2})
    del doc["spec"]["dataset"]["template"]
    job = parse_job(doc)
    run_job(job, Reporter(stdout=io.StringIO(), stderr=io.StringIO(), termination_log=str(tmp_path / "t")),
            work_dir=tmp_path / "work")
    published = AutoTokenizer.from_pretrained(out)
    assert published.apply_chat_template(rows[0]["messages"][:1], tokenize=False, add_generation_prompt=True) == \
        "### Instruction:\nwhat is 1 plus 1 ?\n\n### Response:\n"
    card = (out / "README.md").read_text()
    assert "built-in `alpaca` chat template" in card and "apply_chat_template" in card
