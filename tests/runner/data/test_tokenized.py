"""The tokenized dataset: memory-mapped Arrow files in the work folder, made once per dataset and kept where a
retry (on any node) and the next job find it, only the rows maxSteps needs, shards read from a folder or prefix."""
from __future__ import annotations

import json
import random
import shutil

import pytest
import pyarrow as pa

from runner.train import tokens
from runner.api.parse import parse_job
from runner.data import files, tokenized
from runner.model import load as model_load
from tests.conftest import job_doc, write_jsonl


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    return [{"question": " ".join(rng.choices(words, k=rng.randint(2, 8))) + f" {i}",
             "answer": " ".join(rng.choices(words, k=rng.randint(1, 5)))} for i in range(n)]


def _job(model_dir, data, out, *, model=None, **overrides):
    doc = job_doc(model_dir, data, out, **overrides)
    doc["spec"]["model"].update(model or {})
    return parse_job(doc)


def _prepare(job, data, model, work, logs, eval_path=None):
    tok = model_load.load_tokenizer(model, job.spec.model)
    return tokens.tokenized_data(job, data, eval_path, model, tok, work, logs.append)


@pytest.fixture
def corpus(tmp_path):
    return write_jsonl(tmp_path / "data" / "train.jsonl", _rows(300))


def test_tokens_are_memory_mapped_from_arrow_files_in_the_work_folder(tiny_llama, corpus, tmp_path):
    job = _job(tiny_llama, corpus, tmp_path / "out", training={"maxSteps": None, "epochs": 1})
    logs: list[str] = []
    data = _prepare(job, corpus, tiny_llama, tmp_path / "work", logs)
    assert len(data.train) == 300 and data.tokenized == 300
    files_ = [f["filename"] for f in data.train.cache_files]
    assert files_ and all(f.startswith(str(tmp_path / "work" / "tokenized")) for f in files_)
    assert isinstance(data.train.data.table, pa.Table) and type(data.train.data).__name__ == "MemoryMappedTable"
    marker = json.loads((tmp_path / "work" / "tokenized").glob("*/tokenized.json").__next__().read_text())
    assert marker["rows"] == 300 and all(f["size"] > 0 for f in marker["files"])
    assert any("tokenized 300 rows" in line for line in logs)


def test_a_retry_on_another_node_finds_the_tokens_in_the_checkpoint_location(tiny_llama, corpus, tmp_path):
    job = _job(tiny_llama, corpus, tmp_path / "out", training={"maxSteps": None, "epochs": 1})
    first: list[str] = []
    made = _prepare(job, corpus, tiny_llama, tmp_path / "node-a", first)
    kept = list((tmp_path / "out.checkpoints" / "tokenized").glob("*/tokenized.json"))
    assert len(kept) == 1, first
    second: list[str] = []
    again = _prepare(job, corpus, tiny_llama, tmp_path / "node-b", second)  # a fresh work folder: another node
    assert again.tokenized == 0 and len(again.train) == len(made.train)
    assert any("tokenized 0 rows" in line and "output.checkpoints" in line for line in second), second
    assert again.train[5]["input_ids"] == made.train[5]["input_ids"]


def test_a_changed_setting_or_data_is_tokenized_again(tiny_llama, corpus, tmp_path):
    job = _job(tiny_llama, corpus, tmp_path / "out", training={"maxSteps": None, "epochs": 1})
    _prepare(job, corpus, tiny_llama, tmp_path / "w1", [])
    longer = _job(tiny_llama, corpus, tmp_path / "out", dataset={"maxLength": 48},
                  training={"maxSteps": None, "epochs": 1})
    assert _prepare(longer, corpus, tiny_llama, tmp_path / "w2", []).tokenized == 300
    write_jsonl(corpus, _rows(300, seed=1))
    assert _prepare(job, corpus, tiny_llama, tmp_path / "w3", []).tokenized == 300


def test_an_incomplete_copy_in_the_checkpoint_location_is_not_used(tiny_llama, corpus, tmp_path):
    job = _job(tiny_llama, corpus, tmp_path / "out", training={"maxSteps": None, "epochs": 1})
    _prepare(job, corpus, tiny_llama, tmp_path / "w1", [])
    entry = next((tmp_path / "out.checkpoints" / "tokenized").iterdir())
    arrow = next(entry.glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:100])  # cut short, as a killed upload leaves it
    assert _prepare(job, corpus, tiny_llama, tmp_path / "w2", []).tokenized == 300


def test_the_next_job_on_the_same_data_reads_the_model_cache_but_trust_remote_code_never_writes_it(
        tiny_llama, corpus, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("FINETUNE_MODEL_CACHE", str(cache))
    risky = _job(tiny_llama, corpus, tmp_path / "a", model={"source": str(tiny_llama), "trustRemoteCode": True},
                 training={"maxSteps": None, "epochs": 1})
    _prepare(risky, corpus, tiny_llama, tmp_path / "w0", [])
    assert not list(cache.glob("tokenized/*/tokenized.json"))
    job = _job(tiny_llama, corpus, tmp_path / "b", training={"maxSteps": None, "epochs": 1})
    _prepare(job, corpus, tiny_llama, tmp_path / "w1", [])
    assert len(list(cache.glob("tokenized/*/tokenized.json"))) == 1
    other = _job(tiny_llama, corpus, tmp_path / "c", training={"maxSteps": None, "epochs": 1})
    logs: list[str] = []
    assert _prepare(other, corpus, tiny_llama, tmp_path / "w2", logs).tokenized == 0
    assert any("model cache" in line and "tokenized 0 rows" in line for line in logs), logs


def test_max_steps_tokenizes_only_the_rows_the_steps_use(tiny_llama, corpus, tmp_path):
    job = _job(tiny_llama, corpus, tmp_path / "out", training={"maxSteps": 3, "batchSize": 2})
    logs: list[str] = []
    data = _prepare(job, corpus, tiny_llama, tmp_path / "w", logs)
    assert 6 <= len(data.train) < 300 and data.tokenized == len(data.train) and data.rows_total == 300
    assert any(f"uses {len(data.train)} of 300 training rows" in line for line in logs), logs


def test_tokenizing_uses_the_cgroup_cpu_quota(monkeypatch, tmp_path):
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    real = tokenized.Path

    def fake(p, *a):
        return real(quota) if str(p) == "/sys/fs/cgroup/cpu.max" else real(p, *a)

    monkeypatch.setattr(tokenized, "Path", fake)
    monkeypatch.setattr(tokenized.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert tokenized.cpus() == 2
    quota.write_text("max 100000\n")
    assert tokenized.cpus() == 16


def test_a_folder_of_shards_is_read_shard_by_shard(tiny_llama, tmp_path):
    rows = _rows(90)
    folder = tmp_path / "shards"
    for i in range(3):
        write_jsonl(folder / f"part-{i:05d}.jsonl", rows[i * 30:(i + 1) * 30])
    found = files.shards(folder)
    assert found is not None and len(found.files) == 3 and files.count_rows(found) == 90
    job = _job(tiny_llama, folder, tmp_path / "out", training={"maxSteps": None, "epochs": 1})
    data = _prepare(job, folder, tiny_llama, tmp_path / "w", [])
    assert len(data.train) == 90


def test_parquet_shards_under_an_s3_prefix(tiny_llama, s3_server, tmp_path):
    import io

    import pyarrow.parquet as pq

    from runner import store
    from runner.api.uris import Location

    rows = _rows(60)
    for i in range(2):
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows[i * 30:(i + 1) * 30]), buf)
        s3_server.client.put_object(Bucket=s3_server.bucket, Key=f"corpus/part-{i}.parquet", Body=buf.getvalue())
    source = f"s3://{s3_server.bucket}/corpus/"
    local = store.download(Location.parse(source), tmp_path / "w" / "data")
    job = _job(tiny_llama, source, tmp_path / "out", training={"maxSteps": None, "epochs": 1})
    data = _prepare(job, local, tiny_llama, tmp_path / "w", [])
    assert len(data.train) == 60


def test_preview_states_a_sample_and_full_reads_every_row(tiny_llama, tmp_path, capsys):
    import yaml

    from runner.__main__ import main

    data = write_jsonl(tmp_path / "big.jsonl", _rows(5000))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_doc(tiny_llama, data, tmp_path / "out")))
    assert main(["preview", str(job), "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "sample of 2,000 of 5,000 rows (the first 1,000 and 1,000 at random); `--full` reads every row" in out
    assert "5000 training rows" in out
    assert main(["preview", str(job), "--color", "never", "--full"]) == 0
    out = capsys.readouterr().out
    assert "sample of" not in out and "5000 examples: min" in out


def test_data_that_cannot_fit_the_work_folder_names_it_and_the_sizes(tiny_llama, corpus, tmp_path, monkeypatch):
    from collections import namedtuple

    from runner.api.errors import PermanentError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(tokens.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(PermanentError, match=r"FINETUNE_WORK_DIR.*0\.0 GiB free"):
        tokens.check_disk(tmp_path / "w", corpus)


def test_a_retry_finds_the_tokens_in_an_s3_checkpoint_location(tiny_llama, corpus, s3_server, tmp_path):
    ckpt = f"s3://{s3_server.bucket}/runs/ckpt"
    job = _job(tiny_llama, corpus, tmp_path / "out", training={"maxSteps": None, "epochs": 1},
               output={"checkpoints": ckpt})
    made = _prepare(job, corpus, tiny_llama, tmp_path / "node-a", [])
    keys = [o["Key"] for o in s3_server.client.list_objects_v2(Bucket=s3_server.bucket)["Contents"]]
    assert any(k.startswith("runs/ckpt/tokenized/") and k.endswith("/tokenized.json") for k in keys), keys
    logs: list[str] = []
    again = _prepare(job, corpus, tiny_llama, tmp_path / "node-b", logs)
    assert again.tokenized == 0 and again.train[7]["input_ids"] == made.train[7]["input_ids"]
    assert any("tokenized 0 rows" in line and ckpt in line for line in logs), logs


def test_several_processes_tokenize_exactly_as_one(tiny_llama, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", _rows(2500))
    job = _job(tiny_llama, data, tmp_path / "out", training={"maxSteps": None, "epochs": 1})
    one = _prepare(job, data, tiny_llama, tmp_path / "w1", [])
    monkeypatch.setattr(tokenized, "_PARALLEL_FROM", 100)
    monkeypatch.setattr(tokenized, "cpus", lambda: 2)
    shutil.rmtree(tmp_path / "out.checkpoints")
    logs: list[str] = []
    two = _prepare(job, data, tiny_llama, tmp_path / "w2", logs)
    assert any("on 2 process(es)" in line for line in logs), logs
    assert len({f["filename"] for f in two.train.cache_files}) == 2  # one Arrow file per process
    assert two.train["input_ids"] == one.train["input_ids"]
    assert two.train["completion_mask"] == one.train["completion_mask"]


def test_a_resumed_attempt_on_another_node_tokenizes_0_rows_and_says_so(tiny_llama, corpus, tmp_path):
    import io

    from runner.api.errors import Preempted
    from runner.job import run_job
    from runner.report.events import Reporter
    from runner.train.trainer import StopFlag

    job = _job(tiny_llama, corpus, tmp_path / "out", training={"maxSteps": 4, "saveSteps": 2, "loggingSteps": 1})
    stop = StopFlag()

    def preempt(event):
        if event.get("event") == "progress" and event["step"] == 1:
            stop.requested = True

    def reporter(sinks=()):
        err = io.StringIO()
        return Reporter(stdout=io.StringIO(), stderr=err, termination_log=str(tmp_path / "term.log"),
                        sinks=list(sinks)), err

    first, first_log = reporter([preempt])
    with pytest.raises(Preempted):
        run_job(job, first, work_dir=tmp_path / "node-a", stop=stop)
    assert "data: tokenized" in first_log.getvalue()
    second, second_log = reporter()
    run_job(job, second, work_dir=tmp_path / "node-b")
    lines = second_log.getvalue().splitlines()
    assert any("reused the tokenized data from output.checkpoints" in ln and "tokenized 0 rows" in ln
               for ln in lines), lines
    assert not any("data: tokenized" in ln for ln in lines)
