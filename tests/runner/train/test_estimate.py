"""The cost estimate as the runner makes it (runner/train/estimate.py): the data's tokens after packing, the model's
own config and the memory plan on a GPU kind; shown by `runner preview` and `runner validate --json`."""
from __future__ import annotations

import json
import shutil

import pytest
import yaml

from runner.__main__ import main
from runner.api import cost
from runner.train.estimate import DataSize
from tests.conftest import QA_ROWS, job_doc, write_jsonl

LLAMA_3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256, head_dim=128, tie_word_embeddings=False)


def test_packed_data_counts_every_token_once_and_its_context_within_each_example():
    d = DataSize.of([10, 30, 5000], examples=3, max_length=100, packing=True, batch=4, packed_rows=2)
    assert (d.rows, d.tokens) == (2, 140)  # 5000 is cut to maxLength
    assert d.context == pytest.approx((10 * 10 + 30 * 30 + 100 * 100) / 2 / 140)
    sample = DataSize.of([10, 30], examples=1000, max_length=100, packing=True, batch=4)
    assert (sample.tokens, sample.rows) == (20_000, 200)  # lengths of a sample, scaled to the examples


def test_unpacked_rows_are_padded_to_the_expected_longest_of_their_batch():
    d = DataSize.of([1, 3], examples=2, max_length=100, packing=False, batch=2)
    # two rows drawn: the longest is 1 only when both are the 1 (1/4 of draws), else 3
    assert d.tokens == 5 and d.context == pytest.approx(2.5 / 2)


@pytest.fixture
def job_8b(tiny_llama, tmp_path):
    """The tiny model's tokenizer and weights with a Llama-3-8B config: preview and validate read only the config."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **LLAMA_3_8B}))
    data = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    doc = job_doc(model, data, tmp_path / "out", dataset={"maxLength": 2048}, lora={"r": 32},
                  training={"maxSteps": 30, "batchSize": 4, "gradientCheckpointing": None})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_validate_json_returns_the_estimate_with_the_memory_plan(job_8b, capsys):
    assert main(["validate", "--json", "--gpu", "H200", str(job_8b)]) == 0
    e = json.loads(capsys.readouterr().out)["estimate"]
    assert (e["gpu"], e["gpuSource"], e["row"], e["steps"]) == ("h200", "--gpu", "h200-8b-packed", 30)
    assert e["model"] == "the model's config.json" and e["mode"] == "none" and 30 < e["peakGib"] < 60
    assert e["tokens"] == 30 * 4 * 2048 and e["summary"].endswith("h200-hours")
    assert main(["validate", "--json", "--gpu", "h100", str(job_8b)]) == 0
    on_h100 = json.loads(capsys.readouterr().out)["estimate"]
    assert main(["validate", "--json", str(job_8b)]) == 0  # no --gpu, no nodeSelector: h100 assumed
    assumed = json.loads(capsys.readouterr().out)["estimate"]
    assert assumed["seconds"] == on_h100["seconds"] > e["seconds"] and "assumed" in assumed["gpuSource"]


def test_preview_prints_the_estimate_from_the_data(job_8b, capsys):
    assert main(["preview", "--color", "never", "-n", "0", "--gpu", "l4", str(job_8b)]) == 0
    out = capsys.readouterr().out
    section = out[out.index("Cost estimate"):]
    assert "on 1 x l4 (--gpu): " in section and "l4-hours" in section
    tokens = sum(int(ln.split()[0].replace(",", "")) for ln in out.splitlines() if "tokens per epoch," in ln)
    assert "30 steps, " in section and f"{tokens:,} per epoch after packing" in section
    assert "derived" in section and "planned peak" in section  # l4: no measurement, a row derived from the H100's


@pytest.mark.parametrize("command", ["validate", "preview"])
def test_an_unknown_gpu_kind_is_refused_naming_the_flag_and_the_kinds(job_8b, capsys, command):
    with pytest.raises(SystemExit) as e:
        main([command, "--gpu", "tpu-v5", str(job_8b)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--gpu" in err and "'tpu-v5'" in err and all(k in err for k in cost.gpu_kinds())
