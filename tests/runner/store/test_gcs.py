"""What only gs:// has, against a real GCS API on loopback (fake-gcs-server, tests/runner/store/gcs_server.py):
its credentials (a service-account key file named by GOOGLE_APPLICATION_CREDENTIALS), generation preconditions,
resumable transfers, and the endpoint in the model cache's key. What every store does is the contract suite's."""
from __future__ import annotations

import hashlib
import json

import pytest

from runner.api.errors import DOWNLOAD_FAILED, UPLOAD_FAILED, PermanentError, RetryableError
from runner.api.uris import Location
from runner.store import MANIFEST_NAME
from runner.store.backend import backend_for
from tests.runner.store.gcs_server import GcsServer, point_gcs_clients_at, service_account_key
from tests.runner.store.helpers import MIB, digests, make_output

GCS = backend_for("gs")


def names(server: GcsServer, prefix: str = "") -> list[str]:
    return sorted(b.name for b in server.client().list_blobs(server.bucket, prefix=prefix))


def test_a_resumable_upload_round_trips_and_the_manifest_lists_every_file(gcs_server, tmp_path):
    src = make_output(tmp_path / "out", big_mib=20)  # above 8 MiB: a resumable upload in 16 MiB parts
    dest = Location.parse(f"gs://{gcs_server.bucket}/models/run-1")
    GCS.check_destination(dest, {"name": "job-1"})
    assert GCS.publish(src, dest, job={"name": "job-1"}) == f"gs://{gcs_server.bucket}/models/run-1"
    assert names(gcs_server) == sorted(f"models/run-1/{k}" for k in [
        "config.json", "empty.txt", "model.safetensors", "tokenizer/tokenizer.json", MANIFEST_NAME])
    got = GCS.download(dest, tmp_path / "dl")
    have = digests(got)
    manifest = json.loads(have and (got / MANIFEST_NAME).read_text())
    assert have.pop(MANIFEST_NAME) and have == digests(src)
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == digests(src)
    assert manifest["job"] == {"name": "job-1"}
    assert not [p for p in got.rglob("*") if ".part-" in p.name]


def test_a_single_object_downloads_as_its_file(gcs_server, tmp_path):
    gcs_server.client().bucket(gcs_server.bucket).blob("data/train.jsonl").upload_from_string(b'{"a": 1}\n')
    one = Location.parse(f"gs://{gcs_server.bucket}/data/train.jsonl")
    GCS.check_source(one)
    assert GCS.list_names(one) == []
    path = GCS.download(one, tmp_path / "one")
    assert path == tmp_path / "one" / "train.jsonl" and path.read_bytes() == b'{"a": 1}\n'
    assert GCS.revision(one).revision


def test_the_lease_writes_are_generation_preconditions(gcs_server):
    loc = Location.parse(f"gs://{gcs_server.bucket}/ckpt")
    first = GCS.create_if_absent(loc, "LEASE", b"one")
    assert first and GCS.create_if_absent(loc, "LEASE", b"two") is None  # ifGenerationMatch=0: it exists
    blob = gcs_server.client().bucket(gcs_server.bucket).get_blob("ckpt/LEASE")
    assert str(blob.generation) == first and blob.download_as_bytes() == b"one"
    second = GCS.replace_if_unchanged(loc, "LEASE", b"three", first)
    assert second and second != first
    assert GCS.replace_if_unchanged(loc, "LEASE", b"four", first) is None  # a stale generation is refused
    assert GCS.read_versioned(loc, "LEASE").data == b"three"
    assert GCS.replace_if_unchanged(loc, "GONE", b"x", first) is None  # never absent in between
    assert GCS.delete_if_unchanged(loc, "LEASE", second) and GCS.read_versioned(loc, "LEASE") is None
    assert GCS.delete_if_unchanged(loc, "LEASE", second) is False


def test_the_cache_key_names_the_endpoint(gcs_server, monkeypatch, tmp_path):
    """The same bucket, key and bytes behind two endpoints are two cache entries: a fake endpoint can never
    fill the entry a job reading the real one is handed."""
    src = Location.parse(f"gs://{gcs_server.bucket}/bases/m")
    gcs_server.client().bucket(gcs_server.bucket).blob("bases/m/config.json").upload_from_string(b"{}")
    here = GCS.revision(src)
    other = GcsServer().start()
    try:
        other.reset()
        other.client().bucket(other.bucket).blob("bases/m/config.json").upload_from_string(b"{}")
        point_gcs_clients_at(other, monkeypatch)
        there = GCS.revision(src)
    finally:
        other.stop()
    assert gcs_server.url in here.identity and other.url in there.identity
    assert here.identity != there.identity


def test_credentials_come_from_the_key_file_and_a_broken_one_is_named_not_shown(gcs_server, monkeypatch, tmp_path):
    loc = Location.parse(f"gs://{gcs_server.bucket}/models/run-1")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(service_account_key(tmp_path / "key.json")))
    GCS.check_destination(loc)  # a real key file is read (an emulator then takes the requests anonymously)

    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "absent.json"))
    with pytest.raises(PermanentError) as e:
        GCS.check_source(loc)
    assert e.value.reason == DOWNLOAD_FAILED
    assert "GOOGLE_APPLICATION_CREDENTIALS" in str(e.value) and "absent.json: no such file" in str(e.value)

    secret = "-----BEGIN PRIVATE KEY-----\nTOPSECRET" + hashlib.sha256(b"x").hexdigest()
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"type": "service_account", "client_email": "a@b", "private_key": secret}))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(broken))
    with pytest.raises(PermanentError) as e:
        GCS.publish(make_output(tmp_path / "out"), loc)
    assert e.value.reason == UPLOAD_FAILED
    assert "is not a usable service-account JSON key" in str(e.value) and "spec.gcsSecretRef" in str(e.value)
    assert "TOPSECRET" not in str(e.value) and "TOPSECRET" not in repr(e.value.__cause__)


def test_a_missing_bucket_is_named(gcs_server, tmp_path):
    for call, reason in ((lambda loc: GCS.check_source(loc), DOWNLOAD_FAILED),
                         (lambda loc: GCS.check_destination(loc), UPLOAD_FAILED),
                         (lambda loc: GCS.check_writable(loc), UPLOAD_FAILED)):
        with pytest.raises(PermanentError) as e:
            call(Location.parse("gs://no-such-bucket/x"))
        assert e.value.reason == reason
        assert "bucket 'no-such-bucket' does not exist at the GCS emulator" in str(e.value)


def test_an_endpoint_that_is_not_there_is_retryable(gcs_server, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("FINETUNE_STORE_TIMEOUTS", "connect=1,read=1,deadline=3")
    with pytest.raises(RetryableError) as e:
        GCS.list_names(Location.parse(f"gs://{gcs_server.bucket}/x"))
    assert "127.0.0.1:9" in str(e.value)


def test_a_publish_over_an_earlier_output_copies_large_files_server_side(gcs_server, tmp_path):
    dest = Location.parse(f"gs://{gcs_server.bucket}/out")
    GCS.publish(make_output(tmp_path / "a"), dest, job={"name": "j"})
    new = make_output(tmp_path / "b", big_mib=9)
    GCS.publish(new, dest, job={"name": "j"})
    assert names(gcs_server, "out/.finetune-staging") == []
    blob = gcs_server.client().bucket(gcs_server.bucket).get_blob("out/model.safetensors")
    assert blob.size == 9 * MIB + 12345
    assert GCS.read_manifest(dest)["totalBytes"] == sum(p.stat().st_size for p in new.rglob("*") if p.is_file())


def test_a_job_reads_and_writes_only_gcs(gcs_server, tiny_llama, qa_jsonl, tmp_path):
    """`python -m runner run` with gs:// model, data, checkpoints and destination, a service-account key named by
    GOOGLE_APPLICATION_CREDENTIALS: the merged model and its manifest are published under gs://, the checkpoints
    saved there and the lease released; the same job again is already complete."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import job_doc, run_cli

    bucket = gcs_server.client().bucket(gcs_server.bucket)
    for p in sorted(tiny_llama.rglob("*")):
        if p.is_file():
            bucket.blob(f"bases/tiny-llama/{p.relative_to(tiny_llama).as_posix()}").upload_from_filename(str(p))
    bucket.blob("data/qa.jsonl").upload_from_filename(str(qa_jsonl))
    gs = f"gs://{gcs_server.bucket}"
    doc = job_doc(f"{gs}/bases/tiny-llama", f"{gs}/data/qa.jsonl", f"{gs}/models/run-1",
                  output={"checkpoints": f"{gs}/checkpoints/run-1"})
    env = {"GOOGLE_APPLICATION_CREDENTIALS": str(service_account_key(tmp_path / "key.json"))}
    (tmp_path / "first").mkdir()
    (tmp_path / "again").mkdir()

    code, events, stderr, result = run_cli(tmp_path / "first", doc, env=env)
    assert code == 0, stderr[-3000:]
    assert result["output"] == f"{gs}/models/run-1"
    published = GCS.download(Location.parse(f"{gs}/models/run-1"), tmp_path / "published")
    manifest = json.loads((published / MANIFEST_NAME).read_text())
    have = digests(published)
    have.pop(MANIFEST_NAME)
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == have  # every file, as the manifest says
    for name in ("config.json", "model.safetensors", "tokenizer.json", "adapter/adapter_config.json",
                 "report/metrics.json"):
        assert name in have, name
    assert AutoModelForCausalLM.from_pretrained(published).config.model_type == "llama"
    saved = names(gcs_server, "checkpoints/run-1/")
    assert {"checkpoints/run-1/checkpoint-3/COMPLETE", "checkpoints/run-1/checkpoint-6/COMPLETE"} <= set(saved)
    assert "checkpoints/run-1/LEASE" not in saved  # released

    code, _, stderr, again = run_cli(tmp_path / "again", doc, env=env)
    assert code == 0 and again["alreadyComplete"] is True, stderr[-3000:]
