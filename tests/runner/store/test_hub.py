import json
import os
import socket

import pytest

import runner.store as storage
from runner.api.errors import DOWNLOAD_FAILED, UPLOAD_FAILED, PermanentError, RetryableError
from runner.store import MANIFEST_NAME, Location
from tests.runner.store.helpers import bytes_digests, digests, make_output


def model_files(big: int = 0) -> dict[str, bytes]:
    return {
        "config.json": b'{"model_type": "llama"}',
        "tokenizer/tokenizer.json": b'{"version": "1.0"}',
        "empty.txt": b"",
        "model.safetensors": os.urandom(big or 4096),
    }


def test_download_revision_dataset_and_patterns(hub_server, tmp_path):
    first = hub_server.seed("org/data", {"train.jsonl": b'{"a": 1}\n'}, repo_type="dataset")
    hub_server.seed("org/data", {"train.jsonl": b'{"a": 2}\n', "eval.jsonl": b"{}\n"}, repo_type="dataset")
    # hf://datasets/... picks the dataset repo whatever repo_type the caller gives
    pinned = Location.parse(f"hf://datasets/org/data@{first}")
    storage.check_source(pinned)
    old = storage.download(pinned, tmp_path / "old")
    assert digests(old) == bytes_digests({"train.jsonl": b'{"a": 1}\n'})
    new = storage.download(Location.parse("hf://org/data"), tmp_path / "new", repo_type="dataset",
                           allow_patterns=["train*"])
    assert digests(new) == bytes_digests({"train.jsonl": b'{"a": 2}\n'})


def test_publish_creates_a_private_repo_in_one_commit(hub_server, tmp_path):
    src = make_output(tmp_path / "out", big_mib=1)
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a model\n")
    dest = Location.parse("hf://org/finetuned")
    storage.check_destination(dest)
    url = storage.publish(src, dest, private=True, commit_message="FineTuneJob x")
    assert url == f"{hub_server.url}/org/finetuned"
    assert hub_server.exists("org/finetuned") and hub_server.is_private("org/finetuned")
    assert hub_server.commits("org/finetuned") == 1
    files = hub_server.files("org/finetuned")
    manifest = json.loads(files.pop(MANIFEST_NAME))
    assert bytes_digests(files) == digests(src)
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == digests(src)
    assert storage.is_complete(dest)
    assert all(authed for _, _, authed in hub_server.requests)  # the token went with every request


def test_publish_public_and_republish_replaces_content(hub_server, tmp_path):
    dest = Location.parse("hf://org/pub")
    v1 = make_output(tmp_path / "v1")
    (v1 / "shard-2.bin").write_bytes(b"old")
    storage.publish(v1, dest, private=False)
    assert not hub_server.is_private("org/pub")
    v2 = make_output(tmp_path / "v2")
    storage.publish(v2, dest, private=False)
    assert hub_server.commits("org/pub") == 2
    files = hub_server.files("org/pub")
    assert "shard-2.bin" not in files  # one commit adds the new files and deletes the stale ones
    files.pop(MANIFEST_NAME)
    assert bytes_digests(files) == digests(v2)


def test_publish_private_output_into_existing_public_repo_is_refused(hub_server, tmp_path):
    hub_server.seed("org/public", {"README.md": b"hi"}, private=False)
    with pytest.raises(PermanentError) as e:
        storage.publish(make_output(tmp_path / "o"), Location.parse("hf://org/public"), private=True)
    assert "is public" in str(e.value) and "output.private" in str(e.value)
    assert hub_server.commits("org/public") == 0


def test_publish_to_a_branch(hub_server, tmp_path):
    dest = Location.parse("hf://org/branchy@experiment")
    url = storage.publish(make_output(tmp_path / "o"), dest)
    assert url.endswith("/org/branchy/tree/experiment")
    assert MANIFEST_NAME in hub_server.files("org/branchy", revision="experiment")
    assert hub_server.files("org/branchy", revision="main") == {}
    assert storage.is_complete(dest) and not storage.is_complete(Location.parse("hf://org/branchy"))


def test_is_complete(hub_server):
    assert not storage.is_complete(Location.parse("hf://org/missing"))
    hub_server.seed("org/partial", {"config.json": b"{}"})
    assert not storage.is_complete(Location.parse("hf://org/partial"))


# ------------------------------------------------------------------------------------------ errors
def test_repo_not_found_is_permanent(hub_server, tmp_path):
    loc = Location.parse("hf://org/does-not-exist")
    with pytest.raises(PermanentError) as e:
        storage.check_source(loc)
    assert e.value.reason == DOWNLOAD_FAILED
    assert "hf://org/does-not-exist" in str(e.value) and "repo not found" in str(e.value)
    assert "HF_TOKEN" in str(e.value)
    assert hub_server.token not in str(e.value)
    with pytest.raises(PermanentError, match="repo not found"):
        storage.download(loc, tmp_path / "d")


def test_revision_not_found_is_permanent(hub_server, tmp_path):
    hub_server.seed("org/model", model_files())
    loc = Location.parse("hf://org/model@no-such-branch")
    with pytest.raises(PermanentError, match="revision not found"):
        storage.check_source(loc)
    with pytest.raises(PermanentError, match="revision not found"):
        storage.download(loc, tmp_path / "d")


def test_private_repo_without_token(hub_server, tmp_path, monkeypatch):
    hub_server.seed("org/secret", model_files(), private=True)
    hub_server.anonymous_reads = True  # public repos readable without a token, like the real Hub
    hub_server.seed("org/open", model_files())
    monkeypatch.delenv("HF_TOKEN")
    storage.check_source(Location.parse("hf://org/open"))
    assert digests(storage.download(Location.parse("hf://org/open"), tmp_path / "open"))
    with pytest.raises(PermanentError) as e:
        storage.check_source(Location.parse("hf://org/secret"))
    assert "HF_TOKEN" in str(e.value)
    with pytest.raises(PermanentError) as e:
        storage.download(Location.parse("hf://org/secret"), tmp_path / "secret")
    assert "HF_TOKEN" in str(e.value)


def test_wrong_token_is_permanent_and_never_shown(hub_server, monkeypatch):
    hub_server.seed("org/model", model_files())
    wrong = "hf_WrongTokenValue1234567890abcdef"
    monkeypatch.setenv("HF_TOKEN", wrong)
    for call in (lambda: storage.check_source(Location.parse("hf://org/model")),
                 lambda: storage.check_destination(Location.parse("hf://org/out"))):
        with pytest.raises(PermanentError) as e:
            call()
        assert "HF_TOKEN" in str(e.value) and "401" in str(e.value)
        assert wrong not in str(e.value) and "WrongTokenValue" not in str(e.value)


def test_missing_token_for_a_hub_destination(hub_server, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN")
    for call in (lambda: storage.check_destination(Location.parse("hf://org/out")),
                 lambda: storage.publish(make_output(tmp_path / "o"), Location.parse("hf://org/out"))):
        with pytest.raises(PermanentError) as e:
            call()
        assert e.value.reason == UPLOAD_FAILED
        assert "set HF_TOKEN" in str(e.value) and "write" in str(e.value)
    assert not hub_server.exists("org/out")


def test_server_error_is_retryable(hub_server, tmp_path):
    hub_server.seed("org/model", model_files())
    hub_server.fail_next(503)
    with pytest.raises(RetryableError) as e:
        storage.check_source(Location.parse("hf://org/model"))
    assert "503" in str(e.value)
    hub_server.fail_next(500, count=1)
    with pytest.raises(RetryableError):
        storage.download(Location.parse("hf://org/model"), tmp_path / "d")
    storage.check_source(Location.parse("hf://org/model"))  # and then it works


def test_unreachable_hub_is_retryable(hub_server, monkeypatch, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    for call in (lambda: storage.check_source(Location.parse("hf://org/model")),
                 lambda: storage.check_destination(Location.parse("hf://org/out")),
                 lambda: storage.download(Location.parse("hf://org/model"), tmp_path / "d")):
        with pytest.raises(RetryableError) as e:
            call()
        assert f"127.0.0.1:{port}" in str(e.value) and "HF_ENDPOINT" in str(e.value)


def test_offline_mode_skips_the_remote_check(hub_server, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    storage.check_source(Location.parse("hf://org/not-even-there"))  # nothing asked of the Hub
    assert hub_server.requests == []
