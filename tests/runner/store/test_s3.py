import json
import socket

import pytest

import runner.store as storage
from runner.api.errors import DOWNLOAD_FAILED, UPLOAD_FAILED, PermanentError, RetryableError
from runner.store import MANIFEST_NAME, Location
from runner.store import s3_client as s3mod
from tests.runner.store.helpers import MIB, digests, make_output


def keys(s3_server, prefix=""):
    pages = s3_server.client.get_paginator("list_objects_v2").paginate(Bucket=s3_server.bucket, Prefix=prefix)
    return sorted(o["Key"] for p in pages for o in p.get("Contents", []))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_publish_then_download_round_trip_multipart(s3_server, tmp_path):
    src = make_output(tmp_path / "out", big_mib=20)  # > 8 MiB: multipart, 3 parts
    dest = Location.parse(f"s3://{s3_server.bucket}/models/run-1")
    storage.check_destination(dest)
    assert not storage.is_complete(dest)
    assert storage.publish(src, dest) == f"s3://{s3_server.bucket}/models/run-1"
    assert storage.is_complete(dest)
    assert keys(s3_server) == sorted(
        f"models/run-1/{k}" for k in ["config.json", "empty.txt", "model.safetensors", "tokenizer/tokenizer.json",
                                      MANIFEST_NAME])
    head = s3_server.client.head_object(Bucket=s3_server.bucket, Key="models/run-1/model.safetensors")
    assert "-" in head["ETag"]  # a multipart upload's ETag is "<md5 of md5s>-<parts>"
    assert head["ETag"].strip('"').endswith("-3")

    storage.check_source(dest)
    got = storage.download(dest, tmp_path / "dl")
    assert got == tmp_path / "dl"
    want = digests(src)
    have = digests(got)
    manifest = json.loads((got / MANIFEST_NAME).read_bytes())
    assert have.pop(MANIFEST_NAME)
    assert have == want
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == want
    assert not [p for p in got.rglob("*") if ".part-" in p.name]  # no temp files left


def test_download_single_key_and_patterns(s3_server, tmp_path):
    c, b = s3_server.client, s3_server.bucket
    c.put_object(Bucket=b, Key="data/train.jsonl", Body=b'{"a": 1}\n')
    c.put_object(Bucket=b, Key="data/extra/eval.jsonl", Body=b'{"a": 2}\n')
    c.put_object(Bucket=b, Key="data/README.md", Body=b"hi")
    c.put_object(Bucket=b, Key="database/other", Body=b"not under data/")

    one = Location.parse(f"s3://{b}/data/train.jsonl")
    storage.check_source(one)
    path = storage.download(one, tmp_path / "one")
    assert path == tmp_path / "one" / "train.jsonl" and path.read_bytes() == b'{"a": 1}\n'

    everything = storage.download(Location.parse(f"s3://{b}/data"), tmp_path / "all")
    assert sorted(p.relative_to(everything).as_posix() for p in everything.rglob("*") if p.is_file()) == [
        "README.md", "extra/eval.jsonl", "train.jsonl"]

    only = storage.download(Location.parse(f"s3://{b}/data"), tmp_path / "some", allow_patterns=["*.jsonl"])
    assert sorted(p.name for p in only.rglob("*") if p.is_file()) == ["eval.jsonl", "train.jsonl"]


def _fail_reading(monkeypatch, name: str, after: int):
    """Make reading one source file fail after `after` bytes (a disk error half-way through an upload)."""
    real_open = s3mod._open_source

    class Failing:
        def __init__(self, f):
            self._f, self._read = f, 0

        def read(self, n=-1):
            data = self._f.read(n)
            self._read += len(data)
            if self._read > after:
                raise OSError(5, f"Input/output error reading {name}")
            return data

        def __getattr__(self, attr):
            return getattr(self._f, attr)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    def open_source(path):
        f = real_open(path)
        return Failing(f) if path.name == name else f

    monkeypatch.setattr(s3mod, "_open_source", open_source)


def test_interrupted_republish_leaves_the_old_output_complete_and_a_rerun_completes(s3_server, tmp_path,
                                                                                     monkeypatch):
    dest = Location.parse(f"s3://{s3_server.bucket}/out")
    v1 = make_output(tmp_path / "v1")
    (v1 / "only-in-v1.bin").write_bytes(b"old")
    storage.publish(v1, dest)
    before = {k: s3_server.client.get_object(Bucket=s3_server.bucket, Key=k)["Body"].read() for k in keys(s3_server)}

    v2 = make_output(tmp_path / "v2", big_mib=20)
    real_open_source = s3mod._open_source
    _fail_reading(monkeypatch, "model.safetensors", after=12 * MIB)  # dies in the second 8 MiB part
    with pytest.raises(OSError, match="Input/output error"):
        storage.publish(v2, dest)
    # The new output was staged beside the old one: the old one is still complete and unchanged.
    assert storage.is_complete(dest)
    for key, data in before.items():
        assert s3_server.client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read() == data, key
    # The failed multipart upload was aborted: no parts left behind.
    assert s3_server.client.list_multipart_uploads(Bucket=s3_server.bucket).get("Uploads", []) == []

    monkeypatch.setattr(s3mod, "_open_source", real_open_source)
    storage.publish(v2, dest)
    assert storage.is_complete(dest)
    assert "out/only-in-v1.bin" not in keys(s3_server)  # listed by the old manifest: the runner's to remove
    assert not [k for k in keys(s3_server) if "finetune-staging" in k or "finetune-publishing" in k]
    have = digests(storage.download(dest, tmp_path / "dl"))
    assert have.pop(MANIFEST_NAME)
    assert have == digests(v2)


def test_republish_removes_files_the_old_manifest_listed(s3_server, tmp_path):
    dest = Location.parse(f"s3://{s3_server.bucket}/out")
    v1 = make_output(tmp_path / "v1")
    (v1 / "shard-2.bin").write_bytes(b"old shard")
    storage.publish(v1, dest)
    storage.publish(make_output(tmp_path / "v2"), dest)
    assert "out/shard-2.bin" not in keys(s3_server)
    assert storage.is_complete(dest)


def test_manifest_is_written_last(s3_server, tmp_path):
    """Record the order of writes as the real client sends them (botocore's before-send event)."""
    order = []

    def record(request, **kwargs):
        order.append((request.method, request.url.split("?")[0].rsplit("/out/", 1)[-1]))

    c = s3mod.client()  # the client publish() will use for this environment
    c.meta.events.register("before-send.s3", record)
    try:
        storage.publish(make_output(tmp_path / "v", big_mib=9), Location.parse(f"s3://{s3_server.bucket}/out"))
    finally:
        c.meta.events.unregister("before-send.s3", record)
    writes = [path for method, path in order if method in ("PUT", "POST")]
    assert writes[-1] == MANIFEST_NAME
    assert writes.count(MANIFEST_NAME) == 1
    assert {"config.json", "empty.txt", "model.safetensors", "tokenizer/tokenizer.json"} <= set(writes)
    assert writes.count("model.safetensors") >= 3  # create, 2 parts, complete: multipart


# ------------------------------------------------------------------------------------------ errors
def test_missing_bucket_is_permanent(s3_server, tmp_path):
    loc = Location.parse("s3://no-such-bucket/x")
    for check, reason in ((storage.check_source, DOWNLOAD_FAILED), (storage.check_destination, UPLOAD_FAILED)):
        with pytest.raises(PermanentError) as e:
            check(loc)
        assert e.value.reason == reason
        assert "bucket 'no-such-bucket' does not exist" in str(e.value)
        assert "create it" in str(e.value)
        assert s3_server.secret_key not in str(e.value)
    with pytest.raises(PermanentError, match="does not exist"):
        storage.download(loc, tmp_path / "d")
    with pytest.raises(PermanentError, match="does not exist"):
        storage.publish(make_output(tmp_path / "o"), loc)


def test_missing_prefix_is_permanent(s3_server):
    with pytest.raises(PermanentError) as e:
        storage.check_source(Location.parse(f"s3://{s3_server.bucket}/nothing/here"))
    assert "nothing found at s3://test-bucket/nothing/here" in str(e.value)


def test_no_credentials_is_permanent_and_names_the_env_vars(s3_server, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    loc = Location.parse(f"s3://{s3_server.bucket}/x")
    for check in (storage.check_source, storage.check_destination):
        with pytest.raises(PermanentError) as e:
            check(loc)
        assert "AWS_ACCESS_KEY_ID" in str(e.value) and "AWS_SECRET_ACCESS_KEY" in str(e.value)


def test_wrong_credentials_are_permanent(s3_server, monkeypatch):
    """moto checks signatures against its IAM once INITIAL_NO_AUTH_ACTION_COUNT is reached (same process)."""
    import moto.settings

    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    secret = "wrong-secret-" + "x" * 20
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    loc = Location.parse(f"s3://{s3_server.bucket}/x")
    for check in (storage.check_source, storage.check_destination):
        with pytest.raises(PermanentError) as e:
            check(loc)
        msg = str(e.value)
        assert "InvalidAccessKeyId" in msg or "403" in msg or "AccessDenied" in msg
        assert "AWS_ACCESS_KEY_ID" in msg and "AWS_SECRET_ACCESS_KEY" in msg
        assert secret not in msg and s3_server.access_key not in msg


def test_unreachable_endpoint_is_retryable(s3_server, monkeypatch, tmp_path):
    port = closed_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # no backoff in a test
    loc = Location.parse(f"s3://{s3_server.bucket}/x")
    for call in (lambda: storage.check_source(loc), lambda: storage.check_destination(loc),
                 lambda: storage.download(loc, tmp_path / "d"), lambda: storage.is_complete(loc)):
        with pytest.raises(RetryableError) as e:
            call()
        assert f"127.0.0.1:{port}" in str(e.value) and "AWS_ENDPOINT_URL_S3" in str(e.value)
        assert e.value.exit_code == 75


def test_endpoint_from_aws_endpoint_url(s3_server, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    s3_server.client.put_object(Bucket=s3_server.bucket, Key="k", Body=b"v")
    storage.check_source(Location.parse(f"s3://{s3_server.bucket}/k"))


def test_5xx_is_retryable():
    from botocore.exceptions import ClientError

    err = ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."},
                       "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject")
    out = s3mod.translate(err, action="upload to", uri="s3://b/p", bucket="b", reason=UPLOAD_FAILED)
    assert isinstance(out, RetryableError) and "SlowDown" in str(out)
    err = ClientError({"Error": {"Code": "InternalError"}, "ResponseMetadata": {"HTTPStatusCode": 500}}, "GetObject")
    assert isinstance(s3mod.translate(err, action="x", uri="u", bucket="b", reason=DOWNLOAD_FAILED), RetryableError)
