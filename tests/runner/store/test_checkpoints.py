"""What checkpoints do on one store only: local metadata written atomically, the leftovers of an earlier runner's
killed local save, S3's errors. Saving, listing, fetching and pruning on every store is the contract suite's."""
import json
import os
from pathlib import Path

import pytest

from runner.api.errors import PermanentError, RetryableError
from runner.store import CheckpointStore, Location


def trainer_checkpoint(root: Path, step: int, big: int = 0) -> Path:
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(os.urandom(big or 2048))
    (d / "optimizer.pt").write_bytes(os.urandom(1024))
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (d / "rng").mkdir()
    (d / "rng" / "state.pth").write_bytes(b"rng")
    return d


def test_local_metadata_is_written_atomically(tmp_path):
    store = CheckpointStore(Location.parse(str(tmp_path / "c")))
    store.write_text("job-fingerprint.json", "x" * 1000)
    assert sorted(os.listdir(tmp_path / "c")) == ["job-fingerprint.json"]  # no temp file left


def test_leftovers_of_a_killed_local_save_are_pruned_once_older_than_the_newest(tmp_path):
    root = tmp_path / "c"
    store = CheckpointStore(Location.parse(str(root)))
    for step in (10, 20):
        store.save(trainer_checkpoint(tmp_path / "w", step))
    for name in (".tmp-checkpoint-15", ".old-checkpoint-5", ".tmp-checkpoint-30"):  # what earlier runners left
        (root / name).mkdir()
        (root / name / "optimizer.pt").write_bytes(b"partial")
    store.prune(keep=1)
    assert store.list_complete() == ["checkpoint-20"]
    assert sorted(p.name for p in root.iterdir()) == [".tmp-checkpoint-30", "checkpoint-20"]


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
