"""The model card (README.md) and the adapter's card: what was trained on what, how to load and prompt it (code
that compiles), the before/after table, the metrics, the limitations."""
from __future__ import annotations

import re

from runner.report import artifacts
from runner.api.parse import parse_job
from tests.conftest import job_doc

METRICS = {"train_loss": 0.53, "eval_loss": 0.41, "global_step": 200, "num_input_tokens_seen": 48000,
           "examples": 40, "truncated_examples": 2, "format": "prompt-completion", "train_runtime": 80.5,
           "merge_check": {"method": "logits", "relativeLogitError": 0.001, "tolerance": 0.03}}
SAMPLES = [{"prompt": "Q: What is 2 plus 3 ?\nA:", "before": "7 | 8", "after": "5"}]


def _job(**overrides):
    overrides.setdefault("output", {"destination": "hf://me/tuned", "checkpoints": "/tmp/ck"})
    overrides.setdefault("evalPrompts", [SAMPLES[0]["prompt"]])
    return parse_job(job_doc("hf://org/base", "hf://datasets/org/qa", "unused", **overrides))


def _python(card: str) -> str:
    code = re.search(r"```python\n(.*?)```", card, re.S)[1]
    compile(code, "card", "exec")  # the snippet a user pastes is valid Python
    return code


def test_merged_model_card_says_how_to_load_prompt_and_what_changed():
    card = artifacts.model_card(_job(dataset={"evalFraction": 0.1}), METRICS, merged=True, samples=SAMPLES)
    front = card.split("---")[1]
    assert "base_model: org/base" in front and "library_name: transformers" in front and "- org/qa" in front
    assert "[`org/base`](https://huggingface.co/org/base)" in card
    assert "[`org/qa`](https://huggingface.co/datasets/org/qa)" in card and "40 examples" in card
    code = _python(card)
    assert "AutoModelForCausalLM.from_pretrained('me/tuned', device_map='auto')" in code
    assert "prompt = 'Q: What is 2 plus 3 ?\\nA:'" in code
    assert "prompt:     'Q: {question}\\nA:'" in card and "completion: ' {answer}'" in card  # the template
    assert "| Q: What is 2 plus 3 ?<br>A: | 7 \\| 8 | 5 |" in card  # the before/after table, escaped
    assert "| eval loss | 0.41 |" in card and "| mean train loss | 0.53 |" in card
    assert "relative logit error (logits) | 0.001" in card
    assert "## Limitations" in card and "2 training examples were longer than maxLength 32" in card
    assert "No held-out data" not in card  # evalFraction is set
    assert "[More Information Needed]" not in card


def test_adapter_card_beside_a_merged_model_loads_the_base_then_the_adapter():
    card = artifacts.model_card(_job(), METRICS, merged=True, samples=SAMPLES, adapter=True)
    assert "library_name: peft" in card
    code = _python(card)
    assert "base = AutoModelForCausalLM.from_pretrained('org/base', device_map='auto')" in code
    assert "PeftModel.from_pretrained(base, 'me/tuned', subfolder='adapter')" in code
    assert "No held-out data was evaluated" in card


def test_adapter_only_output_from_a_local_base(tmp_path):
    base = tmp_path / "models" / "my-base"
    job = parse_job(job_doc(base, tmp_path / "qa.jsonl", tmp_path / "out", merge={"enabled": False}))
    card = artifacts.model_card(job, {"train_loss": 1.0}, merged=False)
    assert "base_model" not in card.split("---")[1]  # the Hub's metadata takes a Hub id, never a path
    assert f"a local model (`{base}`)" in card and f"a local dataset (`{tmp_path / 'qa.jsonl'}`)" in card
    code = _python(card)
    assert f"base = AutoModelForCausalLM.from_pretrained({str(base)!r}, device_map='auto')" in code
    assert f"PeftModel.from_pretrained(base, {str(tmp_path / 'out')!r})" in code


def test_instruction_and_chat_formats_are_written_out():
    card = artifacts.model_card(_job(dataset={"template": {}, "format": "instruction"}, evalPrompts=[]),
                                {"format": "instruction"}, merged=True)
    assert "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{response}" in card
    _python(card)
    chat = artifacts.model_card(_job(dataset={"template": {}, "format": "chat"}, evalPrompts=[]),
                                {"format": "chat"}, merged=True)
    assert "apply_chat_template" in _python(chat)


def test_eight_bit_base_is_not_called_qlora():
    card = artifacts.model_card(_job(quantization={"bits": 8}), METRICS, merged=True)
    assert "LoRA on an 8-bit (LLM.int8) base" in card and "- qlora" not in card


def test_a_chat_template_of_the_job_is_written_out_in_the_card():
    doc = job_doc("hf://org/base", "hf://datasets/org/chat", "unused", dataset={"format": "chat", "chatTemplate": "llama-2"},
                  output={"destination": "hf://me/tuned", "checkpoints": "/tmp/ck"})
    del doc["spec"]["dataset"]["template"]
    card = artifacts.model_card(parse_job(doc), {**METRICS, "format": "chat"}, merged=True)
    from runner.data.chat import CHAT_TEMPLATES

    assert "built-in `llama-2` chat template" in card and CHAT_TEMPLATES["llama-2"] in card
    assert "apply_chat_template" in _python(card)  # no eval prompt: the worked example is a chat prompt


def test_the_published_step_and_why_and_the_final_loss_are_in_the_results():
    published = {"step": 75, "choice": "best", "lastStep": 200, "evalLoss": 0.38,
                 "reason": "output.publish is best: step 75 had the lowest eval loss (0.38) of 8 evaluations; the "
                           "last step (200) had 0.41"}
    metrics = {**METRICS, "final_train_loss": 0.21, "eval_loss": 0.38, "last_eval_loss": 0.41, "published": published}
    job = _job(dataset={"evalFraction": 0.1}, output={"destination": "hf://me/tuned", "checkpoints": "/tmp/ck",
                                                      "publish": "best"})
    card = artifacts.model_card(job, metrics, merged=True, samples=SAMPLES)
    results = card.split("## Results", 1)[1].split("## Training", 1)[0]
    assert "| final train loss | 0.21 |" in results and "| mean train loss | 0.53 |" in results
    assert "| eval loss | 0.38 |" in results and "| eval loss at the last step | 0.41 |" in results
    assert "| published step | 75 (best) |" in results
    assert f"Published weights: those of step 75. Why: {published['reason']}." in results
