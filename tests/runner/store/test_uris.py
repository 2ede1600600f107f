import pytest

from runner.store import Location


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("hf://org/name", Location("hf", "org/name")),
        ("hf://org/name@v1.0", Location("hf", "org/name", revision="v1.0")),
        ("hf://org/name@refs/pr/1", Location("hf", "org/name", revision="refs/pr/1")),
        ("hf://datasets/org/data", Location("hf", "org/data", repo_type="dataset")),
        ("hf://datasets/org/data@main", Location("hf", "org/data", revision="main", repo_type="dataset")),
        ("s3://bucket", Location("s3", "", bucket="bucket")),
        ("s3://bucket/", Location("s3", "", bucket="bucket")),
        ("s3://bucket/a/b/", Location("s3", "a/b", bucket="bucket")),
        ("s3://my.bucket-1/models/run.1", Location("s3", "models/run.1", bucket="my.bucket-1")),
        ("gs://bucket", Location("gs", "", bucket="bucket")),
        ("gs://my-bucket/runs/a/", Location("gs", "runs/a", bucket="my-bucket")),
        ("file:///abs/path", Location("local", "/abs/path")),
        ("file://localhost/abs/path", Location("local", "/abs/path")),
        ("/abs/path", Location("local", "/abs/path")),
        ("relative/dir", Location("local", "relative/dir")),
        ("data.jsonl", Location("local", "data.jsonl")),
    ],
)
def test_parse(uri, expected):
    loc = Location.parse(uri)
    assert loc == expected
    assert Location.parse(str(loc)) == loc  # str() gives a URI that parses back to the same location


def test_str():
    assert str(Location.parse("hf://org/name@dev")) == "hf://org/name@dev"
    assert str(Location.parse("hf://datasets/org/d")) == "hf://datasets/org/d"
    assert str(Location.parse("s3://b/p/q/")) == "s3://b/p/q"
    assert str(Location.parse("s3://b")) == "s3://b"
    assert str(Location.parse("file:///x/y")) == "/x/y"


@pytest.mark.parametrize(
    "uri, words",
    [
        ("", ["empty"]),
        ("s3://", ["missing bucket", "s3://bucket/prefix"]),
        ("s3:///prefix", ["missing bucket"]),
        ("s3://bucket/a//b", ["prefix"]),
        ("s3://bucket/../x", ["prefix"]),
        ("hf://name", ["hf://org/name", "owner"]),
        ("hf://", ["hf://org/name"]),
        ("hf://a/b/c", ["hf://org/name"]),
        ("hf://org/name@", ["revision"]),
        ("hf://org/na me", ["invalid Hub repo name"]),
        ("az://bucket/x", ["unsupported scheme 'az://'", "s3://bucket/prefix", "gs://bucket/prefix"]),
        ("gs://", ["missing bucket", "gs://bucket/prefix"]),
        ("gs://bucket/a//b", ["GCS prefix"]),
        ("http://example.com/x", ["unsupported scheme"]),
        ("file://host/x", ["file:///absolute/path"]),
        ("file:///", ["names no path"]),
    ],
)
def test_parse_errors(uri, words):
    with pytest.raises(ValueError) as e:
        Location.parse(uri)
    for w in words:
        assert w in str(e.value)


def test_child():
    assert Location.parse("s3://b/p").child("checkpoint-1") == Location("s3", "p/checkpoint-1", bucket="b")
    assert Location.parse("s3://b").child("x/y") == Location("s3", "x/y", bucket="b")
    assert Location.parse("gs://b/p").child("c") == Location("gs", "p/c", bucket="b")
    assert Location.parse("/out/run").child("c") == Location("local", "/out/run/c")
    assert Location.parse("out/").child("c") == Location("local", "out/c")
    with pytest.raises(ValueError, match="Hub repo"):
        Location.parse("hf://org/name").child("x")
    for bad in ("", "../x", "a/../b", "/abs"):
        with pytest.raises(ValueError):
            Location.parse("s3://b/p").child(bad)


def test_frozen():
    loc = Location.parse("s3://b/p")
    with pytest.raises(AttributeError):
        loc.path = "q"  # type: ignore[misc]
    assert hash(loc) == hash(Location.parse("s3://b/p/"))


def test_import_is_cheap():
    import subprocess
    import sys

    code = ("import sys, runner.store; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore', 'huggingface_hub')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
