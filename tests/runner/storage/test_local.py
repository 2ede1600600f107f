import json
import os

import pytest

from runner import storage
from runner.api.errors import DOWNLOAD_FAILED, UPLOAD_FAILED, PermanentError
from runner.storage import MANIFEST_NAME, Location
from tests.runner.storage.helpers import digests, make_output


def test_download_returns_the_path_itself(tmp_path):
    src = make_output(tmp_path / "model")
    loc = Location.parse(f"file://{src}")
    storage.check_source(loc)
    assert storage.download(loc, tmp_path / "unused") == src
    assert not (tmp_path / "unused").exists()  # no copy
    f = src / "config.json"
    assert storage.download(Location.parse(str(f)), tmp_path / "unused") == f


def test_check_source_missing_path(tmp_path):
    with pytest.raises(PermanentError) as e:
        storage.check_source(Location.parse(str(tmp_path / "nope")))
    assert e.value.reason == DOWNLOAD_FAILED
    assert str(tmp_path / "nope") in str(e.value) and "does not exist" in str(e.value)
    with pytest.raises(PermanentError):
        storage.download(Location.parse(str(tmp_path / "nope")), tmp_path / "d")


def test_publish_round_trip_and_manifest(tmp_path):
    src = make_output(tmp_path / "out", big_mib=1)
    dest = Location.parse(str(tmp_path / "published" / "run-1"))
    storage.check_destination(dest)
    assert not storage.is_complete(dest)
    assert storage.publish(src, dest) == str(tmp_path / "published" / "run-1")
    assert storage.is_complete(dest)
    got = digests(tmp_path / "published" / "run-1")
    manifest = json.loads((tmp_path / "published" / "run-1" / MANIFEST_NAME).read_text())
    assert got.pop(MANIFEST_NAME)
    assert got == digests(src)
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == got
    assert {f["path"]: f["size"] for f in manifest["files"]}["empty.txt"] == 0
    assert sorted(os.listdir(tmp_path / "published")) == ["run-1"]  # no temp siblings left


def test_publish_replaces_an_existing_output_only_when_complete(tmp_path, monkeypatch):
    dest_dir = tmp_path / "published"
    storage.publish(make_output(tmp_path / "v1"), Location.parse(str(dest_dir)))
    (dest_dir / "only-in-v1.txt").write_text("old")
    v1 = digests(dest_dir)

    v2 = make_output(tmp_path / "v2")
    (v2 / "config.json").write_text('{"v": 2}')

    # A publish that dies while copying leaves the old complete output untouched.
    import shutil

    real_copy = shutil.copy2

    def failing_copy(src, dst, *a, **k):
        if str(src).endswith("model.safetensors"):
            raise OSError(28, "No space left on device")
        return real_copy(src, dst, *a, **k)

    def cross_device(src, dst):  # staging on another filesystem: publish copies instead of linking
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(shutil, "copy2", failing_copy)
    monkeypatch.setattr(os, "link", cross_device)
    with pytest.raises(PermanentError) as e:
        storage.publish(v2, Location.parse(str(dest_dir)))
    assert e.value.reason == UPLOAD_FAILED and "No space left" in str(e.value)
    assert digests(dest_dir) == v1 and storage.is_complete(Location.parse(str(dest_dir)))
    assert sorted(os.listdir(tmp_path)) == ["published", "v1", "v2"]

    monkeypatch.setattr(shutil, "copy2", real_copy)
    storage.publish(v2, Location.parse(str(dest_dir)))
    assert not (dest_dir / "only-in-v1.txt").exists()
    assert json.loads((dest_dir / "config.json").read_text()) == {"v": 2}


def test_publish_in_place_adds_the_manifest(tmp_path):
    src = make_output(tmp_path / "out")
    storage.publish(src, Location.parse(str(src)))
    assert storage.is_complete(Location.parse(str(src)))


def test_publish_into_its_own_source_is_refused(tmp_path):
    src = make_output(tmp_path / "out")
    with pytest.raises(PermanentError, match="contain one another"):
        storage.publish(src, Location.parse(str(src / "nested")))


def test_check_destination_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(PermanentError, match="is a file"):
        storage.check_destination(Location.parse(str(tmp_path / "file")))
    with pytest.raises(PermanentError, match="not a directory"):
        storage.check_destination(Location.parse(str(tmp_path / "file" / "sub" / "out")))
    storage.check_destination(Location.parse(str(tmp_path / "new" / "deep" / "out")))  # parents get created


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc (a place even root cannot write)")
def test_check_destination_not_writable():
    with pytest.raises(PermanentError) as e:
        storage.check_destination(Location.parse("/proc/finetune-output"))
    assert e.value.reason == UPLOAD_FAILED
    assert "cannot write under /proc" in str(e.value) and "writable volume" in str(e.value)


def test_publish_nothing(tmp_path):
    with pytest.raises(PermanentError, match="not a directory"):
        storage.publish(tmp_path / "missing", Location.parse(str(tmp_path / "dest")))


def test_publish_on_the_same_filesystem_links_instead_of_copying(tmp_path):
    src = make_output(tmp_path / "staged")
    dest = tmp_path / "published"
    storage.publish(src, Location.parse(str(dest)))
    assert (dest / "model.safetensors").stat().st_ino == (src / "model.safetensors").stat().st_ino
    assert storage.is_complete(Location.parse(str(dest)))
