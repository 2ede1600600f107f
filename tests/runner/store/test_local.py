import json
import os

import pytest

import runner.store as storage
from runner.api.errors import DOWNLOAD_FAILED, UPLOAD_FAILED, PermanentError
from runner.store import MANIFEST_NAME, Location
from tests.runner.store.helpers import digests, make_output


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
    (make_output(tmp_path / "v1") / "only-in-v1.txt").write_text("old")
    storage.publish(tmp_path / "v1", Location.parse(str(dest_dir)))
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


# ------------------------------------------------------------------ never delete what the runner did not write
JOB_A = {"name": "job-a", "spec": "1" * 64}
JOB_B = {"name": "job-b", "spec": "2" * 64}


def _mtimes(root):
    return {p: p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def test_a_folder_of_the_users_files_is_never_replaced(tmp_path):
    users = make_output(tmp_path / "project")  # e.g. the user's own project folder
    (users / ".git").mkdir()
    (users / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    before, mtimes = digests(users), _mtimes(users)
    loc = Location.parse(str(users))
    with pytest.raises(PermanentError) as e:
        storage.check_destination(loc, JOB_A)
    assert e.value.reason == "InvalidSpec"
    assert "did not write" in str(e.value) and "set output.destination to a new or empty directory" in str(e.value)
    with pytest.raises(PermanentError, match="did not write"):
        storage.publish(make_output(tmp_path / "staged"), loc, job=JOB_A)
    assert digests(users) == before and _mtimes(users) == mtimes
    assert sorted(os.listdir(tmp_path)) == ["project", "staged"]  # no temp siblings left either


def test_files_added_to_an_earlier_output_keep_it_from_being_replaced(tmp_path):
    dest = Location.parse(str(tmp_path / "out"))
    storage.publish(make_output(tmp_path / "v1"), dest, job=JOB_A)
    (tmp_path / "out" / "my-notes.txt").write_text("mine")
    (tmp_path / "out" / "evals").mkdir()
    with pytest.raises(PermanentError) as e:
        storage.check_destination(dest, JOB_A)
    assert "my-notes.txt" in str(e.value) and "evals/" in str(e.value)
    with pytest.raises(PermanentError, match="my-notes.txt"):
        storage.publish(make_output(tmp_path / "v2"), dest, job=JOB_A)
    assert (tmp_path / "out" / "my-notes.txt").read_text() == "mine"

    (tmp_path / "out" / "my-notes.txt").unlink()
    (tmp_path / "out" / "evals").rmdir()
    storage.check_destination(dest, JOB_A)  # the same job's own output, and nothing else: replaced
    v2 = make_output(tmp_path / "v2")
    (v2 / "config.json").write_text('{"v": 2}')
    storage.publish(v2, dest, job={**JOB_A, "spec": "3" * 64})
    manifest = storage.read_manifest(dest)
    assert manifest["job"] == {**JOB_A, "spec": "3" * 64}
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {"v": 2}


def test_an_output_from_before_manifests_named_their_job_may_be_replaced(tmp_path):
    dest = Location.parse(str(tmp_path / "out"))
    storage.publish(make_output(tmp_path / "v1"), dest)  # no job: as older runners wrote it
    assert "job" not in storage.read_manifest(dest)
    storage.check_destination(dest, JOB_A)
    storage.publish(make_output(tmp_path / "v2"), dest, job=JOB_A)
    assert storage.read_manifest(dest)["job"] == JOB_A


def test_an_empty_folder_or_a_file_as_destination(tmp_path):
    (tmp_path / "empty").mkdir()
    storage.check_destination(Location.parse(str(tmp_path / "empty")), JOB_A)
    (tmp_path / "file").write_text("keep me")
    with pytest.raises(PermanentError, match="not a directory"):
        storage.publish(make_output(tmp_path / "s"), Location.parse(str(tmp_path / "file")), job=JOB_A)
    assert (tmp_path / "file").read_text() == "keep me"


@pytest.mark.parametrize("below", ["sub", "tokenizer/more", "deeper/still/here"])
def test_a_destination_inside_another_jobs_output_is_refused_as_an_overlap(tmp_path, below):
    theirs = Location.parse(str(tmp_path / "out-b"))
    storage.publish(make_output(tmp_path / "staged-b"), theirs, job={"name": "job-b", "spec": "e" * 64})
    before = digests(tmp_path / "out-b")
    inside = Location.parse(str(tmp_path / "out-b" / below))
    with pytest.raises(PermanentError) as e:
        storage.check_destination(inside, JOB_A)
    assert e.value.reason == "InvalidSpec" and e.value.exit_code == 2
    assert "output.destination" in str(e.value) and "overlaps" in str(e.value) and "'job-b'" in str(e.value)
    with pytest.raises(PermanentError, match="overlaps"):
        storage.publish(make_output(tmp_path / "staged-a"), inside, job=JOB_A)
    assert digests(tmp_path / "out-b") == before  # their output holds what its manifest lists, nothing more
    storage.check_destination(Location.parse(str(tmp_path / "out-a")), JOB_A)  # beside it: fine
