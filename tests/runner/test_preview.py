"""`python -m runner preview job.yaml`: the examples as the model sees them with the loss mask, the format, token
lengths and a histogram, truncation, packing and steps, warnings - from the tokenizer alone, never the weights."""
from __future__ import annotations

import csv
import re
import shutil

import yaml

from runner import preview
from runner.__main__ import main
from runner.api import errors
from runner.api.parse import parse_job
from tests.conftest import QA_ROWS, job_doc, run_cli, write_jsonl

KO_PROMPT = "### 명령어: 당신은 게이머입니다\n\n### 맥락: {commands}\n\n### 답변:"


def _korean_csv(tmp_path, rows=(("hello there", "yes"), ("what is it", "no"), ("how are you", "good"))):
    path = tmp_path / "npc_action_tuning_dataset.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["commands", "actions"])
        w.writerows(rows)
    return path


def _korean_job(model, tmp_path, *, rows=None, **dataset):
    data = _korean_csv(tmp_path, rows) if rows else _korean_csv(tmp_path)
    doc = job_doc(model, data, tmp_path / "out",
                  dataset={"template": {"prompt": KO_PROMPT, "completion": " {actions}"}, "maxLength": 64, **dataset},
                  training={"epochs": 5, "batchSize": 1, "loggingSteps": 1})
    doc["spec"]["training"].pop("maxSteps")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc, allow_unicode=True))
    return job


def _tokenizer_only(model_dir, tmp_path):
    """A copy of the model directory without its weights: preview must not need them."""
    dest = tmp_path / "tokenizer-only"
    shutil.copytree(model_dir, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return dest


def test_korean_csv_template_preview_marks_the_completion_and_counts(tiny_llama, tmp_path, capsys):
    job = _korean_job(_tokenizer_only(tiny_llama, tmp_path), tmp_path)
    assert main(["preview", str(job), "--color", "never", "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert "format     prompt-completion (from dataset.template.prompt/completion)" in out
    assert "loss       on the completion only" in out and "no weights read" in out
    assert "Examples as the model sees them (2 of 3)" in out
    # the prompt (with its Korean instruction, one line per line) is context; answer and EOS carry the loss
    assert "  <s> ### 명령어: 당신은 게이머입니다" in out and "### 맥락: hello there" in out
    assert "### 답변:⟦ yes </s>⟧" in out and "⟦ no </s>⟧" in out and "good" not in out
    assert "3 examples: min " in out and "maxLength 64" in out and "cut at maxLength: 0 (0.0%)" in out
    assert "│" in out and "█" in out  # the histogram
    assert "packing on: about 3.0 examples per 64-token row -> 1 rows" in out
    assert "1 optimizer steps per epoch (batch 1 × accumulation 1); 5 steps in all (5 epochs)" in out
    assert "Warnings" in out and "only 5 optimizer step(s)" in out


def test_colour_on_a_terminal_shows_the_mask_without_markers(tiny_llama, tmp_path):
    job = parse_job(yaml.safe_load(_korean_job(tiny_llama, tmp_path).read_text()))
    text = preview.render(preview.gather(job, n=1), color=True)
    assert "\x1b[32m yes </s>\x1b[0m" in text and "⟦" not in text
    assert "\x1b[2m<s> ### 명령어:" in text


def test_truncation_empty_completions_and_steps_without_packing(tiny_llama, tmp_path, capsys):
    rows = [("hello there " * 8, "yes"), ("what is it", ""), ("how are you", "good")]
    job = _korean_job(tiny_llama, tmp_path, rows=rows, maxLength=24, packing=False)
    assert main(["preview", str(job), "--color", "never", "-n", "3"]) == 0
    out = capsys.readouterr().out
    assert "cut at maxLength: 1 (33.3%), 1 lose their whole completion" in out
    assert "✂ cut at maxLength 24" in out
    assert "1 example(s) lose their whole completion to maxLength 24: they add no loss" in out
    assert "1 example(s) have an empty completion: they train only on the EOS token" in out
    assert "packing off: 3 rows" in out and "3 optimizer steps per epoch" in out and "15 steps in all" in out
    assert "◀ maxLength 24" in out and "cut" in out


def test_every_completion_cut_shows_the_lengths_in_preview_and_run(tiny_llama, tmp_path, capsys):
    rows = [("hello there " * 4, "yes"), ("what is it " * 3, "no")]
    job = _korean_job(tiny_llama, tmp_path, rows=rows, maxLength=16)
    assert main(["preview", str(job), "--color", "never"]) == errors.EXIT_PERMANENT
    out = capsys.readouterr().out
    assert "ERROR: maxLength 16 cuts every example's completion (examples are " in out
    assert "│" in out and "Token lengths" in out
    code, _, _, result = run_cli(tmp_path, yaml.safe_load(job.read_text()))
    assert code == errors.EXIT_PERMANENT
    assert "every example's completion is cut off at 16 tokens (examples are " in result["message"]
    assert "runner preview" in result["message"]


def test_quickstart_preview_matches_the_steps_the_trainer_takes(tmp_path, capsys):
    from runner.quickstart import prepare

    job = prepare(tmp_path / "qs").job
    assert main(["preview", str(job), "--color", "never"]) == 0
    out = capsys.readouterr().out
    # The quickstart's run logs epoch 0.5 at step 1 and ends at step 200 of 200 (tests/runner/report/test_console.py).
    assert "2 optimizer steps per epoch (batch 4 × accumulation 1); 200 steps in all (100 epochs)" in out
    assert "Q: What is the capital of France ? A:⟦ Paris </s>⟧" in out


def test_hub_model_preview_downloads_the_tokenizer_only(tiny_llama, hub_server, tmp_path):
    files = {p.name: p.read_bytes() for p in tiny_llama.iterdir() if p.is_file()}
    assert "model.safetensors" in files
    hub_server.seed("org/tiny", files)
    hub_server.seed("org/qa", {"train.jsonl": write_jsonl(tmp_path / "qa.jsonl", QA_ROWS).read_bytes()},
                    repo_type="dataset")
    job = parse_job(job_doc("hf://org/tiny", "hf://datasets/org/qa", tmp_path / "out"))
    found = preview.gather(job, n=1, work=tmp_path / "work")
    assert found.rows == len(QA_ROWS) and found.fmt == "prompt-completion"
    assert not list((tmp_path / "work").rglob("*.safetensors"))
    assert not [path for _, path, _ in hub_server.requests if "safetensors" in path]


def test_pack_rows_best_fit_decreasing():
    assert preview.pack_rows([10] * 10, 64) == 2  # six per row
    assert preview.pack_rows([40, 30, 30, 24, 20], 64) == 3  # 40+24, 30+30, 20
    assert preview.pack_rows([64, 64], 64) == 2


def test_histogram_marks_max_length_and_the_cut_bins():
    lines = preview.histogram([10, 12, 20, 30, 40, 50], 25, bins=5)
    assert any("◀ maxLength 25" in ln for ln in lines) and lines[-1].endswith("cut")
    assert sum(int(re.search(r"│\S* (\d+)", ln)[1]) for ln in lines) == 6
    assert any("◀ maxLength 24" in ln for ln in preview.histogram([13, 14, 27], 24))  # at a bin's end
