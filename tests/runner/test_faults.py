"""Faults, each injected for real: a store endpoint frozen with SIGSTOP in the middle of a download or an upload
(the real moto S3 server and the Hub test server, each in a process of its own), a work dir on a full tmpfs, a
model source that is not a model, more GPUs asked than this machine has. Each must end in the exit code its
class deserves (75: retry may help; 2: the user must change something), a message that names the endpoint or
the field and the fix, no traceback - and nothing already published lost."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

import runner.store as storage
from runner.api import names
from runner.api.errors import EXIT_PERMANENT, EXIT_RETRYABLE, RetryableError
from runner.store import MANIFEST_NAME, Location
from runner.store import s3 as s3mod
from tests.conftest import ROOT, job_doc, run_cli
from tests.runner.store.helpers import MIB, digests, make_output

FAST = "connect=1,read=1,deadline=4"  # a frozen endpoint is given up on within seconds
BOUND = 45  # seconds a frozen operation may take in all, with these limits (retries and backoff included)


@pytest.fixture
def fast_limits(monkeypatch):
    monkeypatch.setenv(names.ENV_STORE_TIMEOUTS, FAST)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")


def _freeze_once(server, frozen: list):
    def freeze(*_args, **_kwargs):
        if not frozen:
            server.freeze()
            frozen.append(time.monotonic())
    return freeze


def _timed(fn):
    start = time.monotonic()
    with pytest.raises(RetryableError) as e:
        fn()
    return e.value, time.monotonic() - start


# ------------------------------------------------------------------------------------------ S3, frozen
def test_s3_download_frozen_mid_transfer_fails_retryable_naming_the_endpoint(s3_process, fast_limits, tmp_path):
    server, s3 = s3_process
    s3.client.put_object(Bucket=s3.bucket, Key="model/config.json", Body=b"{}")
    s3.client.put_object(Bucket=s3.bucket, Key="model/model.safetensors", Body=os.urandom(20 * MIB))
    frozen: list = []
    events = s3mod.client().meta.events  # the product's own client for this environment
    events.register("after-call.s3.GetObject", _freeze_once(server, frozen))  # the first body is on its way
    err, took = _timed(lambda: storage.download(Location.parse(f"s3://{s3.bucket}/model"), tmp_path / "dl"))
    assert frozen, "the server was never frozen: the download did not start"
    assert err.exit_code == EXIT_RETRYABLE and server.url in err.message
    assert names.ENV_STORE_TIMEOUTS in err.message
    assert took < BOUND
    assert not (tmp_path / "dl" / "model.safetensors").exists()  # nothing half-written under the real name


def test_s3_publish_frozen_mid_upload_keeps_the_earlier_output(s3_process, fast_limits, tmp_path):
    server, s3 = s3_process
    dest = Location.parse(f"s3://{s3.bucket}/out")
    storage.publish(make_output(tmp_path / "v1"), dest, job={"name": "j"})
    before = {k["Key"]: s3.client.get_object(Bucket=s3.bucket, Key=k["Key"])["Body"].read()
              for k in s3.client.list_objects_v2(Bucket=s3.bucket, Prefix="out/")["Contents"]}
    frozen: list = []
    s3mod.client().meta.events.register("after-call.s3.UploadPart", _freeze_once(server, frozen))
    err, took = _timed(lambda: storage.publish(make_output(tmp_path / "v2", big_mib=24), dest, job={"name": "j"}))
    assert frozen and err.exit_code == EXIT_RETRYABLE and server.url in err.message
    assert took < BOUND
    server.thaw()
    # The earlier output is still complete and byte for byte what it was.
    assert storage.is_complete(dest)
    for key, data in before.items():
        assert s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read() == data, key


def test_s3_checkpoint_save_frozen_mid_upload_keeps_the_last_complete_checkpoint(s3_process, fast_limits, tmp_path):
    server, s3 = s3_process
    store = storage.CheckpointStore(Location.parse(f"s3://{s3.bucket}/ckpt"))
    first = make_output(tmp_path / "checkpoint-2")
    store.save(first)
    frozen: list = []
    s3mod.client().meta.events.register("after-call.s3.UploadPart", _freeze_once(server, frozen))
    err, took = _timed(lambda: store.save(make_output(tmp_path / "checkpoint-4", big_mib=24)))
    assert frozen and err.exit_code == EXIT_RETRYABLE and server.url in err.message and took < BOUND
    server.thaw()
    assert store.list_complete() == ["checkpoint-2"]  # the half-saved one does not count
    back = store.fetch("checkpoint-2", tmp_path / "back")
    assert digests(back, skip=("COMPLETE",)) == digests(first)


# ------------------------------------------------------------------------------------------ the Hub, frozen
def _hub_session_hook(server, frozen: list, when):
    """Freeze the server on the first response `when(url)` picks, seen by the product's own HTTP client."""
    from huggingface_hub.utils import get_session

    from runner.store import hub

    hub._configure()
    freeze = _freeze_once(server, frozen)

    def hook(response):
        if when(str(response.request.url)):
            freeze()

    get_session().event_hooks["response"].append(hook)
    return lambda: get_session().event_hooks["response"].remove(hook)


def _seed_hub(url: str, token: str, repo: str, folder: Path) -> None:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=url, token=token)
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(repo_id=repo, folder_path=str(folder))


def test_hub_download_frozen_mid_transfer_fails_retryable_naming_the_endpoint(hub_process, fast_limits, tmp_path):
    server, token = hub_process
    _seed_hub(server.url, token, "acme/model", make_output(tmp_path / "src"))
    frozen: list = []
    undo = _hub_session_hook(server, frozen, lambda url: "/resolve/" in url)
    try:
        err, took = _timed(lambda: storage.download(Location.parse("hf://acme/model"), tmp_path / "dl"))
    finally:
        undo()
    assert frozen and err.exit_code == EXIT_RETRYABLE and server.url in err.message
    assert took < BOUND


def test_hub_publish_frozen_mid_commit_keeps_the_earlier_output(hub_process, fast_limits, tmp_path):
    from huggingface_hub import HfApi

    server, token = hub_process
    dest = Location.parse("hf://acme/out")
    storage.publish(make_output(tmp_path / "v1"), dest, job={"name": "j"})
    frozen: list = []
    undo = _hub_session_hook(server, frozen, lambda url: "/preupload/" in url)  # the commit is next
    try:
        err, took = _timed(lambda: storage.publish(make_output(tmp_path / "v2"), dest, job={"name": "j"}))
    finally:
        undo()
    assert frozen and err.exit_code == EXIT_RETRYABLE and server.url in err.message
    assert took < BOUND
    server.thaw()
    # The commit may have reached the server before it froze (a timeout cannot tell): one commit is all or
    # nothing, so the repo holds the earlier output or the new one, whole, with the manifest that lists it.
    got = Path(HfApi(endpoint=server.url, token=token).snapshot_download("acme/out", local_dir=tmp_path / "back"))
    have = digests(got, skip=(".cache/", MANIFEST_NAME))
    assert have in (digests(tmp_path / "v1"), digests(tmp_path / "v2"))
    listed = {f["path"] for f in json.loads((got / MANIFEST_NAME).read_text())["files"]}
    assert listed == set(have)


# ------------------------------------------------------------------------------------------ whole runs
def _run_until(tmp_path: Path, doc: dict, env: dict, trigger) -> tuple[subprocess.CompletedProcess, dict | None]:
    """`python -m runner run` in a subprocess; `trigger()` is polled while it runs (it may freeze a server)."""
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    term = tmp_path / "termination-log"
    proc = subprocess.Popen([sys.executable, "-m", "runner", "run", str(job), "--termination-log", str(term)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    stop = threading.Event()

    def poll():
        while not stop.is_set() and proc.poll() is None:
            if trigger():
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        stop.set()
        proc.kill()
    return (subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
            json.loads(term.read_text()) if term.exists() else None)


def test_run_with_s3_frozen_while_downloading_the_model_exits_75(s3_process, tiny_llama, qa_jsonl, tmp_path):
    server, s3 = s3_process
    for p in tiny_llama.iterdir():
        s3.client.upload_file(str(p), s3.bucket, f"model/{p.name}")
    s3.client.put_object(Bucket=s3.bucket, Key="model/zz-extra.bin", Body=os.urandom(96 * MIB))
    work = tmp_path / "work"
    frozen: list = []

    def downloading() -> bool:  # a model file is being written: freeze the server now
        if any(p.name.startswith(".") and ".part-" in p.name for p in (work / "model").glob(".*")):
            server.freeze()
            frozen.append(1)
            return True
        return False

    doc = job_doc(f"s3://{s3.bucket}/model", qa_jsonl, tmp_path / "out")
    proc, result = _run_until(tmp_path, doc, {names.ENV_STORE_TIMEOUTS: FAST, "AWS_MAX_ATTEMPTS": "2",
                                              names.ENV_WORK_DIR: str(work)}, downloading)
    assert frozen, proc.stderr[-2000:]
    assert proc.returncode == EXIT_RETRYABLE, proc.stderr[-2000:]
    assert result["failedPhase"] == "Downloading" and result["retryable"] is True
    assert server.url in result["message"]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_run_with_the_hub_frozen_from_the_start_exits_75(hub_process, qa_jsonl, tmp_path):
    server, _ = hub_process
    server.freeze()
    start = time.monotonic()
    code, _, stderr, result = run_cli(tmp_path, job_doc("hf://acme/model", qa_jsonl, tmp_path / "out"),
                                      env={names.ENV_STORE_TIMEOUTS: FAST})
    assert code == EXIT_RETRYABLE, stderr[-2000:]
    assert time.monotonic() - start < BOUND + 20
    assert result["failedPhase"] == "Validating" and server.url in result["message"]
    assert "Traceback" not in stderr


def test_bad_store_limits_are_refused_naming_the_variable(s3_server, qa_jsonl, tmp_path):
    code, _, stderr, result = run_cli(tmp_path, job_doc(f"s3://{s3_server.bucket}/m", qa_jsonl, tmp_path / "o"),
                                      env={names.ENV_STORE_TIMEOUTS: "read=soon"})
    assert code == EXIT_PERMANENT and names.ENV_STORE_TIMEOUTS in result["message"] and "Traceback" not in stderr


# ------------------------------------------------------------------------------------------ classification
@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs, mounted for this test and always unmounted."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_disk_full_in_the_work_dir_is_permanent_and_names_it(s3_server, tiny_llama, qa_jsonl, small_disk, tmp_path):
    for p in tiny_llama.iterdir():
        s3_server.client.upload_file(str(p), s3_server.bucket, f"model/{p.name}")
    s3_server.client.put_object(Bucket=s3_server.bucket, Key="model/zz-extra.bin", Body=os.urandom(4 * MIB))
    work = small_disk / "work"
    code, _, stderr, result = run_cli(tmp_path, job_doc(f"s3://{s3_server.bucket}/model", qa_jsonl,
                                                        tmp_path / "out"), env={names.ENV_WORK_DIR: str(work)})
    assert code == EXIT_PERMANENT, stderr[-2000:]
    assert result["retryable"] is False and result["failedPhase"] == "Downloading"
    assert "no space left on device" in result["message"] and str(work) in result["message"]
    assert names.ENV_WORK_DIR in result["message"]
    assert "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["s3", "hub"])
def test_a_model_source_that_is_not_a_model_is_refused_at_validating(where, s3_server, hub_server, qa_jsonl,
                                                                     tmp_path):
    if where == "s3":
        s3_server.client.put_object(Bucket=s3_server.bucket, Key="data/qa.jsonl", Body=qa_jsonl.read_bytes())
        source = f"s3://{s3_server.bucket}/data"
    else:
        hub_server.seed("acme/not-a-model", {"config.json": b"{}", "README.md": b"hello"})
        source = "hf://acme/not-a-model"
    work = tmp_path / "work"
    code, _, stderr, result = run_cli(tmp_path, job_doc(source, qa_jsonl, tmp_path / "out"),
                                      env={names.ENV_WORK_DIR: str(work)})
    assert code == EXIT_PERMANENT, stderr[-2000:]
    assert result["failedPhase"] == "Validating" and result["reason"] == "InvalidSpec"
    message = result["message"]
    assert "model.source" in message and "is not a model" in message and "weights" in message
    assert "Traceback" not in stderr
    assert not list(work.rglob("*.jsonl")) and not (work / "model").exists()  # nothing downloaded


def test_more_gpus_than_this_machine_has_stops_before_any_download(s3_server, qa_jsonl, tmp_path):
    """Standalone, resources.gpus asks for processes, one per GPU (README "Several GPUs"): on this CPU machine
    2 GPUs cannot be had, and the run says so at once."""
    import torch

    assert torch.cuda.device_count() < 2
    work = tmp_path / "work"
    doc = job_doc(f"s3://{s3_server.bucket}/model", qa_jsonl, tmp_path / "out", resources={"gpus": 2})
    code, _, stderr, result = run_cli(tmp_path, doc, env={names.ENV_WORK_DIR: str(work)})
    assert code == EXIT_PERMANENT and result["reason"] == "InvalidSpec"
    assert "resources.gpus: 2" in result["message"] and "lower resources.gpus" in result["message"]
    assert "Traceback" not in stderr
    assert not work.exists() or not any(work.iterdir())
