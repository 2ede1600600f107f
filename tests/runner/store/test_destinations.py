"""S3 prefixes and Hub repos as destinations follow the rule local ones do: the runner never overwrites or
deletes a file it did not write. A destination holding anything but this job's earlier output is refused
before training (naming output.destination and the fix), and again at publish; an earlier output of the same
job is replaced only once the new one is complete."""
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
def test_s3_prefix_holding_a_users_files_is_refused_and_left_alone(s3_server, tmp_path):
    s3_server.client.put_object(Bucket=s3_server.bucket, Key="team/notes.txt", Body=b"mine")
    s3_server.client.put_object(Bucket=s3_server.bucket, Key="team/config.json", Body=b"also mine")
    dest = Location.parse(f"s3://{s3_server.bucket}/team")
    _refused(lambda: storage.check_destination(dest, JOB), "config.json", "notes.txt")
    _refused(lambda: storage.publish(make_output(tmp_path / "o"), dest, job=JOB))  # same-named config.json
    assert _objects(s3_server, "team/") == {"team/notes.txt": b"mine", "team/config.json": b"also mine"}


def test_s3_prefix_holding_another_jobs_output_is_refused(s3_server, tmp_path):
    dest = Location.parse(f"s3://{s3_server.bucket}/out")
    storage.publish(make_output(tmp_path / "o"), dest, job=OTHER)
    before = _objects(s3_server, "out/")
    _refused(lambda: storage.check_destination(dest, JOB), "job-b")
    _refused(lambda: storage.publish(make_output(tmp_path / "n"), dest, job=JOB), "job-b")
    assert _objects(s3_server, "out/") == before


def test_s3_own_earlier_output_with_a_users_file_added_is_refused(s3_server, tmp_path):
    dest = Location.parse(f"s3://{s3_server.bucket}/out")
    storage.publish(make_output(tmp_path / "o"), dest, job=JOB)
    s3_server.client.put_object(Bucket=s3_server.bucket, Key="out/eval-notes.md", Body=b"mine")
    _refused(lambda: storage.check_destination(dest, JOB), "eval-notes.md")
    assert _objects(s3_server, "out/eval-notes.md") == {"out/eval-notes.md": b"mine"}


def test_s3_own_earlier_output_is_replaced_whole(s3_server, tmp_path):
    dest = Location.parse(f"s3://{s3_server.bucket}/out")
    v1 = make_output(tmp_path / "v1")
    (v1 / "only-v1.bin").write_bytes(b"old")
    storage.publish(v1, dest, job=JOB)
    storage.check_destination(dest, JOB)  # its own: accepted
    v2 = make_output(tmp_path / "v2")
    storage.publish(v2, dest, job=JOB)
    have = {k.removeprefix("out/"): v for k, v in _objects(s3_server, "out/").items()}
    assert storage.read_manifest(dest)["job"] == JOB
    have.pop(MANIFEST_NAME)
    assert set(have) == set(digests(v2))  # no staging keys, no marker, nothing of v1's left


def test_s3_publish_cut_short_is_recognised_and_finished_by_the_next_run(s3_server, tmp_path):
    """A first publish killed after its marker and some files: the keys are the runner's, the next run goes on."""
    from runner.store import s3_output

    dest = Location.parse(f"s3://{s3_server.bucket}/out")
    out = make_output(tmp_path / "o")
    files = sorted(digests(out))
    marker = {"format": "finetune-manifest/v1", "publishing": True, "job": JOB,
              "files": [{"path": p} for p in files + ["gone.bin"]]}
    c, b = s3_server.client, s3_server.bucket
    c.put_object(Bucket=b, Key=f"out/{s3_output.MARKER}", Body=json.dumps(marker).encode())
    c.put_object(Bucket=b, Key="out/gone.bin", Body=b"half")
    c.put_object(Bucket=b, Key=f"out/{files[0]}", Body=b"half")
    _refused(lambda: storage.check_destination(dest, OTHER), "job-a")
    storage.check_destination(dest, JOB)
    storage.publish(out, dest, job=JOB)
    assert storage.is_complete(dest)
    assert set(_objects(s3_server, "out/")) == {f"out/{p}" for p in files} | {f"out/{MANIFEST_NAME}"}


# ------------------------------------------------------------------------------------------ the Hub
def test_hub_repo_holding_a_users_files_is_refused_and_left_alone(hub_server, tmp_path):
    hub_server.seed("acme/space", {".gitattributes": b"*.bin lfs", "README.md": b"my card", "app.py": b"x"},
                    private=True)
    dest = Location.parse("hf://acme/space")
    _refused(lambda: storage.check_destination(dest, JOB), "README.md", "app.py")
    _refused(lambda: storage.publish(make_output(tmp_path / "o"), dest, job=JOB))
    assert hub_server.commits("acme/space") == 0
    assert hub_server.files("acme/space")["README.md"] == b"my card"


def test_hub_repo_with_only_gitattributes_counts_as_empty(hub_server, tmp_path):
    hub_server.seed("acme/new", {".gitattributes": b"*.bin lfs"}, private=True)
    dest = Location.parse("hf://acme/new")
    storage.check_destination(dest, JOB)
    storage.publish(make_output(tmp_path / "o"), dest, job=JOB)
    assert storage.read_manifest(dest)["job"] == JOB


def test_hub_another_jobs_output_is_refused_its_own_replaced(hub_server, tmp_path):
    dest = Location.parse("hf://acme/out")
    v1 = make_output(tmp_path / "v1")
    (v1 / "only-v1.bin").write_bytes(b"old")
    storage.publish(v1, dest, job=JOB)
    _refused(lambda: storage.check_destination(dest, OTHER), "job-a")
    storage.check_destination(dest, JOB)
    storage.publish(make_output(tmp_path / "v2"), dest, job=JOB)
    files = hub_server.files("acme/out")
    assert "only-v1.bin" not in files and MANIFEST_NAME in files
    assert hub_server.commits("acme/out") == 2
