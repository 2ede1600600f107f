"""Every dataset format becomes text plus a loss mask; the examples' column names and templates work."""
from __future__ import annotations

import datasets
import pytest

from runner.data import dataset as data_phase
from runner.model import load as model_load
from runner.data.dataset import DataError
from runner.api.spec import DatasetSpec, ModelSpec


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return model_load.load_tokenizer(tiny_llama, ModelSpec(source=str(tiny_llama)))


def _prepare(tok, rows, **spec):
    spec.setdefault("source", "data.jsonl")
    return data_phase.prepare(DatasetSpec(**spec), datasets.Dataset.from_list(rows), None, tok, seed=0)


def _trained_text(tok, example) -> str:
    ids = [i for i, m in zip(example["input_ids"], example["completion_mask"]) if m]
    return tok.decode(ids)


def test_prompt_completion_loss_only_on_completion(tok):
    out = _prepare(tok, [{"prompt": "What is 3 plus 4 ?", "completion": " 7"}])
    assert out.fmt == "prompt-completion"
    assert _trained_text(tok, out.train[0]) == "7 </s>"  # the answer and EOS, nothing of the prompt


def test_seed_000_columns_and_korean_template(tok):
    rows = [{"commands": "hello there", "actions": "yes"}]
    out = _prepare(
        tok, rows,
        template={"prompt": "### 명령어: 당신은 게이머입니다\n\n### 맥락: {commands}\n\n### 답변:",
                  "completion": " {actions}"},
    )
    ex = out.train[0]
    assert "명령어" in tok.decode(ex["input_ids"]) and "맥락" in tok.decode(ex["input_ids"])
    assert _trained_text(tok, ex) == "yes </s>"


def test_column_mapping_input_output_as_prompt_completion(tok):
    rows = [{"input": "What is 1 plus 1 ?", "output": " 2"}]
    out = _prepare(tok, rows, format="prompt-completion", columns={"prompt": "input", "completion": "output"})
    assert _trained_text(tok, out.train[0]) == "2 </s>"


def test_instruction_format_with_and_without_input(tok):
    rows = [{"instruction": "sum", "input": "3 4", "output": "7"}, {"instruction": "hello", "input": "", "output": "hi"}]
    out = _prepare(tok, rows)
    assert out.fmt == "instruction"
    first, second = (tok.decode(e["input_ids"]) for e in out.train)
    assert "Input:" in first and "Input:" not in second
    assert [_trained_text(tok, e) for e in out.train] == ["7 </s>", "hi </s>"]


def test_text_format_trains_on_everything(tok):
    out = _prepare(tok, [{"note": "blue sky"}], template={"text": "The following is a note by Eevee the Dog : {note}"})
    assert out.fmt == "text" and not out.has_completion_mask
    assert "completion_mask" not in out.train.column_names


def test_text_column_mapping_seed_002_quote(tok):
    out = _prepare(tok, [{"quote": "good bad"}], format="text", columns={"text": "quote"})
    assert tok.decode(out.train[0]["input_ids"]) == "<s> good bad </s>"


def test_jinja_template_picks_the_labelled_solution_seed_003(tok):
    rows = [{"goal": "sky", "sol1": "blue", "sol2": "red", "label": 0}, {"goal": "sky", "sol1": "red", "sol2": "blue", "label": 1}]
    out = _prepare(tok, rows, template={"prompt": "Question: {{ goal }}\nAnswer:",
                                        "completion": " {{ sol1 if label == 0 else sol2 }}"})
    assert [_trained_text(tok, e) for e in out.train] == ["blue </s>", "blue </s>"]


def test_chat_loss_only_on_assistant_turns(tok):
    rows = [{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"},
                          {"role": "user", "content": "sky"}, {"role": "assistant", "content": "blue"}]}]
    out = _prepare(tok, rows)
    assert out.fmt == "chat"
    trained = _trained_text(tok, out.train[0])
    assert "hi there" in trained and "blue" in trained
    assert "hello" not in trained and "sky" not in trained


def test_truncation_and_lengths_recorded(tok):
    rows = [{"text": " ".join(["sky"] * 100)}, {"text": "blue"}]
    out = _prepare(tok, rows, max_length=16)
    assert max(len(e["input_ids"]) for e in out.train) == 16
    assert out.truncated == 1 and out.lengths[0] > 100


def test_eval_fraction_holds_out_rows(tok):
    rows = [{"text": f"sky {i}"} for i in range(20)]
    out = _prepare(tok, rows, eval_fraction=0.25)
    assert len(out.train) == 15 and len(out.eval) == 5


@pytest.mark.parametrize(
    "spec, rows, needle",
    [
        ({"format": "prompt-completion"}, [{"question": "q", "answer": "a"}], "dataset.columns.prompt"),
        ({"columns": {"text": "body"}, "format": "text"}, [{"text": "x"}], "dataset.columns.text"),
        ({"template": {"prompt": "{commands}", "completion": "{action}"}}, [{"commands": "a", "actions": "b"}],
         "dataset.template.completion: placeholder(s) {action}"),
        ({}, [{"foo": "x", "bar": "y"}], "dataset.format: cannot infer"),
    ],
)
def test_wrong_columns_name_the_field_and_the_columns(tok, spec, rows, needle):
    with pytest.raises(DataError) as e:
        _prepare(tok, rows, **spec)
    assert needle in e.value.message
    assert e.value.exit_code == 2


def test_loads_each_file_type(tmp_path):
    import pandas as pd

    df = pd.DataFrame([{"text": "sky blue"}, {"text": "red"}])
    paths = [tmp_path / "d.csv", tmp_path / "d.parquet", tmp_path / "d.jsonl", tmp_path / "d.json"]
    df.to_csv(paths[0], index=False)
    df.to_parquet(paths[1])
    df.to_json(paths[2], orient="records", lines=True)
    df.to_json(paths[3], orient="records")
    for p in paths:
        rows = data_phase.load_rows(p, split="train")
        assert rows["text"] == ["sky blue", "red"], p.suffix
    assert len(data_phase.load_rows(paths[2], split="train[:50%]")) == 1


def test_unsupported_file_is_a_clear_error(tmp_path):
    p = tmp_path / "data.txt"
    p.write_text("x")
    with pytest.raises(DataError, match="use .jsonl, .json, .csv or .parquet"):
        data_phase.load_rows(p, split="train")


def test_a_chat_template_on_data_that_is_not_chat_names_the_field(tok):
    with pytest.raises(DataError, match=r"^dataset\.chatTemplate: used only with format chat, and this job's format "
                                        r"is prompt-completion"):
        _prepare(tok, [{"prompt": "What is 3 plus 4 ?", "completion": " 7"}], chat_template="chatml")
