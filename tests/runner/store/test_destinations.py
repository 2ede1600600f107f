"""Destinations on S3 and the Hub, what only those stores have: a user's file added to an earlier output, a
publish marker left by a cut publish, a repo holding only .gitattributes. That every store refuses a
destination holding a user's files or another job's output, and replaces this job's own earlier output whole,
is the contract suite's (test_contract.py)."""
from __future__ import annotations

import json

import pytest

import runner.store as storage
from runner.api.errors import INVALID_SPEC, PermanentError
from runner.store import MANIFEST_NAME, Location
from tests.runner.store.helpers import digests, make_output

JOB = {"name": "job-a", "spec": "f" * 64}
OTHER = {"name": "job-b", "spec": "e" * 64}


def _objects(s3_server, prefix: str) -> dict[str, bytes]:
    c, b = s3_server.client, s3_server.bucket
    return {o["Key"]: c.get_object(Bucket=b, Key=o["Key"])["Body"].read()
            for o in c.list_objects_v2(Bucket=b, Prefix=prefix).get("Contents", [])}


def _refused(fn, *words):
    with pytest.raises(PermanentError) as e:
        fn()
    assert e.value.reason == INVALID_SPEC and e.value.exit_code == 2
    assert "output.destination" in e.value.message and "never deletes" in e.value.message
    for w in words:
        assert w in e.value.message
    return e.value


# ------------------------------------------------------------------------------------------ S3


def test_s3_own_earlier_output_with_a_users_file_added_is_refused(s3_server, tmp_path):
    dest = Location.parse(f"s3://{s3_server.bucket}/out")
    storage.publish(make_output(tmp_path / "o"), dest, job=JOB)
    s3_server.client.put_object(Bucket=s3_server.bucket, Key="out/eval-notes.md", Body=b"mine")
    _refused(lambda: storage.check_destination(dest, JOB), "eval-notes.md")
    assert _objects(s3_server, "out/eval-notes.md") == {"out/eval-notes.md": b"mine"}


def test_s3_publish_cut_short_is_recognised_and_finished_by_the_next_run(s3_server, tmp_path):
    """A first publish killed after its marker and some files: the keys are the runner's, the next run goes on."""
    from runner.store import objects

    dest = Location.parse(f"s3://{s3_server.bucket}/out")
    out = make_output(tmp_path / "o")
    files = sorted(digests(out))
    marker = {"format": "finetune-manifest/v1", "publishing": True, "job": JOB,
              "files": [{"path": p} for p in files + ["gone.bin"]]}
    c, b = s3_server.client, s3_server.bucket
    c.put_object(Bucket=b, Key=f"out/{objects.MARKER}", Body=json.dumps(marker).encode())
    c.put_object(Bucket=b, Key="out/gone.bin", Body=b"half")
    c.put_object(Bucket=b, Key=f"out/{files[0]}", Body=b"half")
    _refused(lambda: storage.check_destination(dest, OTHER), "job-a")
    storage.check_destination(dest, JOB)
    storage.publish(out, dest, job=JOB)
    assert storage.is_complete(dest)
    assert set(_objects(s3_server, "out/")) == {f"out/{p}" for p in files} | {f"out/{MANIFEST_NAME}"}


# ------------------------------------------------------------------------------------------ the Hub


def test_hub_repo_with_only_gitattributes_counts_as_empty(hub_server, tmp_path):
    hub_server.seed("acme/new", {".gitattributes": b"*.bin lfs"}, private=True)
    dest = Location.parse("hf://acme/new")
    storage.check_destination(dest, JOB)
    storage.publish(make_output(tmp_path / "o"), dest, job=JOB)
    assert storage.read_manifest(dest)["job"] == JOB

