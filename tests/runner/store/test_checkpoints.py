import json
import os
from pathlib import Path

import pytest

from runner.api.errors import INVALID_SPEC, PermanentError, RetryableError
from runner.store import CheckpointStore, Location
from tests.runner.store.helpers import MIB, digests


def trainer_checkpoint(root: Path, step: int, big: int = 0) -> Path:
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(os.urandom(big or 2048))
    (d / "optimizer.pt").write_bytes(os.urandom(1024))
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (d / "rng").mkdir()
    (d / "rng" / "state.pth").write_bytes(b"rng")
    return d


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return CheckpointStore(Location.parse(str(tmp_path / "ckpts")))
    s3_server = request.getfixturevalue("s3_server")
    return CheckpointStore(Location.parse(f"s3://{s3_server.bucket}/jobs/j1.checkpoints"))


def make_incomplete(store: CheckpointStore, step: int, tmp_path: Path) -> None:
    """What a save killed half-way leaves: files without the COMPLETE marker (and locally a .tmp- dir)."""
    if store.loc.scheme == "local":
        root = Path(store.loc.path)
        (root / f".tmp-checkpoint-{step}").mkdir(parents=True)
        (root / f".tmp-checkpoint-{step}" / "optimizer.pt").write_bytes(b"partial")
        (root / f"checkpoint-{step}").mkdir()  # e.g. a Trainer writing straight into the store
        (root / f"checkpoint-{step}" / "optimizer.pt").write_bytes(b"partial")
    else:
        from runner.store import s3

        s3.client().put_object(Bucket=store.loc.bucket, Key=f"{store.loc.path}/checkpoint-{step}/optimizer.pt",
                               Body=b"partial")


def remaining_names(store: CheckpointStore) -> set[str]:
    if store.loc.scheme == "local":
        return {p.name for p in Path(store.loc.path).iterdir() if p.is_dir()}
    from runner.store import s3

    objs = s3.list_objects(s3.client(), store.loc.bucket, store.loc.path)
    return {k[len(store.loc.path) + 1:].split("/")[0] for k, _ in objs if "/" in k[len(store.loc.path) + 1:]}


def test_save_list_fetch(store, tmp_path):
    assert store.list_complete() == []
    work = tmp_path / "work"
    for step in (10, 5, 100, 20):
        assert store.save(trainer_checkpoint(work, step, big=(9 * MIB if step == 100 else 0))) == f"checkpoint-{step}"
    assert store.list_complete() == ["checkpoint-5", "checkpoint-10", "checkpoint-20", "checkpoint-100"]

    got = store.fetch("checkpoint-100", tmp_path / "resume")
    assert got == tmp_path / "resume" / "checkpoint-100"
    assert digests(got) == digests(work / "checkpoint-100")  # same files, no COMPLETE marker
    assert not list((tmp_path / "resume").glob(".tmp-*"))
    # fetching again replaces what is there
    (got / "stray").write_text("x")
    assert digests(store.fetch("checkpoint-100", tmp_path / "resume")) == digests(work / "checkpoint-100")


def test_incomplete_checkpoints_are_ignored(store, tmp_path):
    store.save(trainer_checkpoint(tmp_path / "w", 10))
    make_incomplete(store, 20, tmp_path)
    assert store.list_complete() == ["checkpoint-10"]
    with pytest.raises(PermanentError, match="not complete"):
        store.fetch("checkpoint-20", tmp_path / "resume")
    # a later save of the same step completes it
    store.save(trainer_checkpoint(tmp_path / "w2", 20))
    assert store.list_complete() == ["checkpoint-10", "checkpoint-20"]
    assert digests(store.fetch("checkpoint-20", tmp_path / "r")) == digests(tmp_path / "w2" / "checkpoint-20")


def test_resave_replaces_files(store, tmp_path):
    first = trainer_checkpoint(tmp_path / "a", 30)
    (first / "extra.bin").write_bytes(b"only in the first save")
    store.save(first)
    second = trainer_checkpoint(tmp_path / "b", 30)
    store.save(second)
    assert digests(store.fetch("checkpoint-30", tmp_path / "r")) == digests(second)


def test_prune(store, tmp_path):
    for step in (10, 20, 30, 40):
        store.save(trainer_checkpoint(tmp_path / "w", step))
    make_incomplete(store, 25, tmp_path)  # older than the newest complete: stale
    make_incomplete(store, 50, tmp_path)  # newer: maybe a save in progress, left alone
    store.prune(keep=2)
    assert store.list_complete() == ["checkpoint-30", "checkpoint-40"]
    left = remaining_names(store)
    assert {"checkpoint-10", "checkpoint-20", "checkpoint-25", ".tmp-checkpoint-25"}.isdisjoint(left)
    assert "checkpoint-50" in left
    store.prune(keep=1)
    assert store.list_complete() == ["checkpoint-40"]
    store.prune(keep=5)
    assert store.list_complete() == ["checkpoint-40"]


def test_metadata_text(store):
    assert store.read_text("job-fingerprint.json") is None
    store.write_text("job-fingerprint.json", '{"a": 1}')
    store.write_text("job-fingerprint.json", '{"a": 2}')
    assert store.read_text("job-fingerprint.json") == '{"a": 2}'
    assert store.list_complete() == []  # metadata files are not checkpoints
    for bad in ("../x", "a/b", "", "COMPLETE"):
        with pytest.raises(ValueError):
            store.write_text(bad, "x")


def test_local_metadata_is_written_atomically(tmp_path):
    store = CheckpointStore(Location.parse(str(tmp_path / "c")))
    store.write_text("job-fingerprint.json", "x" * 1000)
    assert sorted(os.listdir(tmp_path / "c")) == ["job-fingerprint.json"]  # no temp file left


def test_hub_is_refused():
    with pytest.raises(PermanentError) as e:
        CheckpointStore(Location.parse("hf://org/name"))
    assert e.value.reason == INVALID_SPEC and "output.checkpoints" in str(e.value)


def test_bad_checkpoint_name(tmp_path):
    store = CheckpointStore(Location.parse(str(tmp_path / "c")))
    (tmp_path / "weird").mkdir()
    with pytest.raises(ValueError, match="checkpoint-<step>"):
        store.save(tmp_path / "weird")


def test_s3_store_errors(s3_server, monkeypatch, tmp_path):
    missing = CheckpointStore(Location.parse("s3://no-such-bucket/c"))
    with pytest.raises(PermanentError, match="does not exist"):
        missing.list_complete()
    with pytest.raises(PermanentError, match="does not exist"):
        missing.save(trainer_checkpoint(tmp_path, 1))
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(RetryableError):
        CheckpointStore(Location.parse(f"s3://{s3_server.bucket}/c")).read_text("job-fingerprint.json")
