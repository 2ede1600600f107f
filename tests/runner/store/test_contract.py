"""The storage contract (runner/store/backend.py), one suite run over every store against its real API on
loopback: local paths, S3 (moto server), the Hub (tests/runner/store/hub_server.py), GCS (fake-gcs-server).

Each test takes `store`, a Store: a fresh place of that store, a way to put a user's files there and read back
everything there without the runner, and the endpoint the runner is pointed at. What only one store has (S3's
publish marker, the Hub's one commit, GCS's key file...) stays in that store's own test file.

Adding a store: write its factory below - `def _name(request, own_process) -> Store`, taking its server fixture
with request.getfixturevalue (the own-process one, which the test may freeze, when `own_process` is set) - and
add it to STORES. Every test here then runs against it.
"""
from __future__ import annotations

import json
import multiprocessing
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

import runner.store as storage
from runner.api import names
from runner.api.errors import DOWNLOAD_FAILED, EXIT_RETRYABLE, INVALID_SPEC, PermanentError, RetryableError
from runner.api.uris import SCHEMES, Location
from runner.store import MANIFEST_NAME, CheckpointStore, backend_for
from runner.store.lease import Lease
from tests.runner.store.helpers import MIB, digests, make_output

JOB = {"name": "job-a", "spec": "f" * 64}
OTHER = {"name": "job-b", "spec": "e" * 64}
FAST = "connect=1,read=1,deadline=4"  # a frozen endpoint is given up on within seconds
BOUND = 45  # seconds a frozen operation may take in all, with these limits (retries and backoff included)


@dataclass
class Store:
    name: str
    place: Callable[[str], Location]  # a fresh place of this store, named `name`
    put: Callable[[Location, dict[str, bytes]], None] | None  # a user's files written there, not by the runner
    files: Callable[[Location], dict[str, bytes]] | None  # everything there, read without the runner
    endpoint: str | None  # where the runner's client is pointed (None: a local path)
    server: object | None = None  # own_process: the endpoint's process, with .freeze() and .thaw()


# ------------------------------------------------------------------------------------------------ the stores
def _local(request, own_process: bool) -> Store:
    root = request.getfixturevalue("tmp_path") / "store"

    def put(loc: Location, files: dict[str, bytes]) -> None:
        for rel, data in files.items():
            (Path(loc.path) / rel).parent.mkdir(parents=True, exist_ok=True)
            (Path(loc.path) / rel).write_bytes(data)

    def files(loc: Location) -> dict[str, bytes]:
        base = Path(loc.path)
        return {p.relative_to(base).as_posix(): p.read_bytes() for p in base.rglob("*") if p.is_file()} \
            if base.is_dir() else {}

    return Store("local", lambda name: Location.parse(str(root / name)), put, files, None)


def _s3(request, own_process: bool) -> Store:
    server, s3 = request.getfixturevalue("s3_process") if own_process else (None, request.getfixturevalue("s3_server"))

    def put(loc: Location, files: dict[str, bytes]) -> None:
        for rel, data in files.items():
            s3.client.put_object(Bucket=s3.bucket, Key=f"{loc.path}/{rel}", Body=data)

    def files(loc: Location) -> dict[str, bytes]:
        prefix, out = f"{loc.path}/", {}
        for page in s3.client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                out[o["Key"][len(prefix):]] = s3.client.get_object(Bucket=s3.bucket, Key=o["Key"])["Body"].read()
        return out

    return Store("s3", lambda name: Location.parse(f"s3://{s3.bucket}/{name}"), put, files, s3.endpoint, server)


def _hub(request, own_process: bool) -> Store:
    if own_process:
        server, _token = request.getfixturevalue("hub_process")
        return Store("hub", lambda name: Location.parse(f"hf://acme/{name}"), None, None, server.url, server)
    hub = request.getfixturevalue("hub_server")

    def put(loc: Location, files: dict[str, bytes]) -> None:
        hub.seed(loc.path, {**hub.files(loc.path), **files}, private=True)

    def files(loc: Location) -> dict[str, bytes]:
        return {k: v for k, v in hub.files(loc.path).items() if k != ".gitattributes"}

    return Store("hub", lambda name: Location.parse(f"hf://acme/{name}"), put, files, hub.url)


def _gcs(request, own_process: bool) -> Store:
    server = request.getfixturevalue("gcs_process" if own_process else "gcs_server")
    client = server.client()

    def put(loc: Location, files: dict[str, bytes]) -> None:
        for rel, data in files.items():
            client.bucket(server.bucket).blob(f"{loc.path}/{rel}").upload_from_string(data)

    def files(loc: Location) -> dict[str, bytes]:
        prefix = f"{loc.path}/"
        return {b.name[len(prefix):]: b.download_as_bytes() for b in client.list_blobs(server.bucket, prefix=prefix)}

    return Store("gcs", lambda name: Location.parse(f"gs://{server.bucket}/{name}"), put, files, server.url,
                 server if own_process else None)


STORES = {"local": _local, "s3": _s3, "hub": _hub, "gcs": _gcs}
SCHEME = {"local": "local", "s3": "s3", "hub": "hf", "gcs": "gs"}  # each store's Location.scheme
HOLDS_CHECKPOINTS = [n for n in STORES if Location.holds_checkpoints_for(SCHEME[n])]
REFUSES_CHECKPOINTS = [n for n in STORES if n not in HOLDS_CHECKPOINTS]
HAS_ENDPOINT = [n for n in STORES if SCHEME[n] != "local"]  # a server of its own, which a test can freeze


@pytest.fixture(params=list(STORES))
def store(request) -> Store:
    return STORES[request.param](request, own_process=False)


@pytest.fixture(params=HOLDS_CHECKPOINTS)
def ckpt_store(request) -> Store:
    """A store that may hold checkpoints and their lease (runner/api/uris.py's scheme table says which)."""
    return STORES[request.param](request, own_process=False)


@pytest.fixture(params=HAS_ENDPOINT)
def frozen_store(request, monkeypatch) -> Store:
    """A store whose endpoint runs in a process of its own, with limits that give a frozen one up in seconds."""
    monkeypatch.setenv(names.ENV_STORE_TIMEOUTS, FAST)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    return STORES[request.param](request, own_process=True)


@pytest.mark.parametrize("name", REFUSES_CHECKPOINTS)
def test_a_store_that_cannot_hold_checkpoints_refuses_them_and_their_lease(name, request):
    loc = STORES[name](request, own_process=False).place("ckpt")
    with pytest.raises(PermanentError) as e:
        CheckpointStore(loc)
    assert e.value.reason == INVALID_SPEC and "output.checkpoints" in e.value.message
    with pytest.raises(PermanentError):
        Lease(loc, wait=0).acquire("runner-a")


def test_every_scheme_has_a_store_and_every_store_is_tested():
    assert {backend_for(s).scheme for s in SCHEMES} == set(SCHEMES)
    assert len(STORES) == len(SCHEMES)


# ------------------------------------------------------------------------------------------------ reading
def test_download(store, tmp_path):
    src = store.place("model")
    store.put(src, {rel: p.read_bytes() for rel, p in _files(make_output(tmp_path / "src", big_mib=9))})
    backend = backend_for(src)
    storage.check_source(src)
    got = storage.download(src, tmp_path / "dl")
    assert digests(got) == digests(tmp_path / "src")
    if backend.local_path(src) is None:  # a remote store: listed, keyed with its endpoint, patterns honoured
        assert sorted(storage.list_names(src)) == sorted(digests(tmp_path / "src"))
        rev = backend.revision(src)
        assert store.endpoint in rev.identity
        only = storage.download(src, tmp_path / "json", allow_patterns=["*.json"])
        assert sorted(digests(only)) == ["config.json", "tokenizer/tokenizer.json"]
        store.put(src, {"config.json": b'{"changed": true}'})
        assert backend.revision(src).identity != rev.identity  # new files, new cache entry
    else:  # used in place
        assert got == Path(src.path) and backend.revision(src) is None
    missing = store.place("nothing-here")
    with pytest.raises(PermanentError) as e:
        storage.check_source(missing)
    assert e.value.reason == DOWNLOAD_FAILED and "nothing-here" in e.value.message


# ------------------------------------------------------------------------------------------------ publishing
def test_publish_over_an_earlier_output_of_the_same_job(store, tmp_path):
    dest = store.place("out")
    storage.check_destination(dest, JOB)
    assert not storage.is_complete(dest) and storage.read_manifest(dest) is None
    v1 = make_output(tmp_path / "v1")
    (v1 / "only-in-v1.bin").write_bytes(b"old")
    storage.publish(v1, dest, job=JOB)
    assert storage.is_complete(dest) and storage.read_manifest(dest)["job"] == JOB
    storage.check_destination(dest, JOB)  # its own earlier output: accepted
    v2 = make_output(tmp_path / "v2")
    (v2 / "config.json").write_text('{"v": 2}')
    storage.publish(v2, dest, job=JOB)
    have = {rel: data for rel, data in store.files(dest).items()}
    manifest = json.loads(have.pop(MANIFEST_NAME))
    assert _digest_map(have) == digests(v2)  # v2 whole; nothing of v1's left, no staging, no marker
    assert {f["path"] for f in manifest["files"]} == set(digests(v2)) and manifest["job"] == JOB


def test_foreign_files_are_refused_and_left_alone(store, tmp_path):
    dest = store.place("team")
    store.put(dest, {"notes.txt": b"mine", "config.json": b"also mine"})
    before = store.files(dest)
    _refused(lambda: storage.check_destination(dest, JOB), "config.json", "notes.txt")
    _refused(lambda: storage.publish(make_output(tmp_path / "o"), dest, job=JOB))  # a same-named config.json
    assert store.files(dest) == before

    theirs = store.place("theirs")
    storage.publish(make_output(tmp_path / "b"), theirs, job=OTHER)
    before = store.files(theirs)
    _refused(lambda: storage.check_destination(theirs, JOB), "job-b")
    _refused(lambda: storage.publish(make_output(tmp_path / "n"), theirs, job=JOB), "job-b")
    assert store.files(theirs) == before


# ------------------------------------------------------------------------------------------------ checkpoints
def test_checkpoints_save_list_fetch_prune(ckpt_store, tmp_path):
    store = ckpt_store
    loc = store.place("ckpt")
    ckpts = CheckpointStore(loc)
    storage.check_writable(loc)
    assert ckpts.list_complete() == []
    work = tmp_path / "work"
    made = {step: _trainer_checkpoint(work, step, big=9 * MIB if step == 40 else 0) for step in (10, 5, 40, 20)}
    (made[20] / "extra.bin").write_bytes(b"only in the first save")
    for step, folder in made.items():
        assert ckpts.save(folder) == f"checkpoint-{step}"
    assert ckpts.list_complete() == ["checkpoint-5", "checkpoint-10", "checkpoint-20", "checkpoint-40"]
    got = ckpts.fetch("checkpoint-40", tmp_path / "resume")
    assert got == tmp_path / "resume" / "checkpoint-40" and digests(got) == digests(work / "checkpoint-40")
    (got / "stray").write_text("x")  # fetching again replaces what is there
    assert digests(ckpts.fetch("checkpoint-40", tmp_path / "resume")) == digests(work / "checkpoint-40")

    store.put(loc, {"checkpoint-30/optimizer.pt": b"partial", "checkpoint-50/optimizer.pt": b"partial"})
    assert "checkpoint-30" not in ckpts.list_complete()  # files without the marker: a save cut short
    with pytest.raises(PermanentError, match="not complete"):
        ckpts.fetch("checkpoint-30", tmp_path / "r")
    again = _trainer_checkpoint(tmp_path / "again", 20)  # a re-save replaces the files, none of the old stay
    ckpts.save(again)
    assert digests(ckpts.fetch("checkpoint-20", tmp_path / "r2")) == digests(again)

    ckpts.prune(keep=2)
    assert ckpts.list_complete() == ["checkpoint-20", "checkpoint-40"]
    left = {rel.split("/")[0] for rel in store.files(loc)}
    assert {"checkpoint-5", "checkpoint-10", "checkpoint-30"}.isdisjoint(left)  # older incomplete: stale
    assert "checkpoint-50" in left  # newer incomplete: maybe a save in progress, left alone

    assert ckpts.read_text("job-fingerprint.json") is None
    ckpts.write_text("job-fingerprint.json", '{"a": 1}')
    ckpts.write_text("job-fingerprint.json", '{"a": 2}')
    assert ckpts.read_text("job-fingerprint.json") == '{"a": 2}' and len(ckpts.list_complete()) == 2


# ------------------------------------------------------------------------------------------------ the lease
def _holder(loc: Location) -> str | None:
    got = backend_for(loc).read_versioned(loc, "LEASE")
    return json.loads(got.data)["owner"] if got else None


def test_a_held_lease_refuses_a_second_runner_until_released(ckpt_store):
    store = ckpt_store
    loc = store.place("ckpt")
    a = Lease(loc, interval=60, wait=0)
    a.acquire("runner-a")
    b = Lease(loc, interval=60, wait=0.3)
    with pytest.raises(RetryableError, match=rf"{loc} is in use by another runner \(held by runner-a, last "
                                             r"heartbeat \d+s ago\).*set output.checkpoints to another place"):
        b.acquire("runner-b")
    threading.Timer(0.5, a.release).start()
    waiting = Lease(loc, interval=60, wait=10)
    waiting.acquire("runner-b")  # gets it once it is released
    assert _holder(loc) == "runner-b"
    waiting.release()
    assert _holder(loc) is None


def test_a_stale_lease_is_taken_over_and_a_live_one_is_not(ckpt_store):
    store = ckpt_store
    loc = store.place("ckpt")
    live = Lease(loc, interval=0.2)
    live.acquire("runner-live")
    with pytest.raises(RetryableError, match="in use by another runner"):
        Lease(loc, interval=60, ttl=3, wait=1.5).acquire("runner-b")  # renewed every 0.2 s: never stale
    live.renew()
    live.release()

    logs: list[str] = []
    a = Lease(loc, interval=60)
    a.acquire("runner-a")
    a._stop.set()  # the holder stops beating (a crashed pod)
    b = Lease(loc, interval=60, ttl=0.5, wait=10, log=logs.append)
    b.acquire("runner-b")
    assert _holder(loc) == "runner-b" and any("taking over a stale lease" in m and "runner-a" in m for m in logs)
    with pytest.raises(RetryableError, match="lost the lease .* runner-b"):
        a.renew()  # the old holder, if it comes back, stops writing
    a.release()  # and does not remove the new holder's lease
    assert _holder(loc) == "runner-b"
    b.release()


def _race(uri: str, owner: str, start: float, results) -> None:
    time.sleep(max(0.0, start - time.time()))
    lease = Lease(Location.parse(uri), interval=60, wait=0)
    try:
        lease.acquire(owner)
        results.put(owner)
        time.sleep(1.5)  # hold it while the others try
    except RetryableError:
        results.put(None)


def test_four_racing_runners_exactly_one_holds_the_lease(ckpt_store):
    store = ckpt_store
    loc = store.place("ckpt")
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    start = time.time() + 4
    procs = [ctx.Process(target=_race, args=(str(loc), f"r{i}", start, results)) for i in range(4)]
    for p in procs:
        p.start()
    got = [results.get(timeout=90) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    winners = [g for g in got if g]
    assert len(winners) == 1, got
    assert _holder(loc) == winners[0]


# ------------------------------------------------------------------------------------------------ frozen
def test_a_frozen_endpoint_times_out_retryable_naming_it(frozen_store, tmp_path):
    store = frozen_store
    out = make_output(tmp_path / "o")
    store.server.freeze()
    calls = [lambda: storage.check_source(store.place("model")),
             lambda: storage.publish(out, store.place("out"), job=JOB)]
    if backend_for(store.place("ckpt")).can_hold_checkpoints:
        calls.append(lambda: CheckpointStore(store.place("ckpt")).save(_trainer_checkpoint(tmp_path / "w", 1)))
    for call in calls:
        started = time.monotonic()
        with pytest.raises(RetryableError) as e:
            call()
        assert time.monotonic() - started < BOUND
        assert e.value.exit_code == EXIT_RETRYABLE and store.endpoint in e.value.message
        assert names.ENV_STORE_TIMEOUTS in e.value.message


# ------------------------------------------------------------------------------------------------ helpers
def _files(root: Path) -> list[tuple[str, Path]]:
    return [(p.relative_to(root).as_posix(), p) for p in sorted(root.rglob("*")) if p.is_file()]


def _digest_map(files: dict[str, bytes]) -> dict[str, str]:
    import hashlib

    return {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}


def _refused(fn, *words) -> None:
    with pytest.raises(PermanentError) as e:
        fn()
    assert e.value.reason == INVALID_SPEC and e.value.exit_code == 2
    assert e.value.message.startswith("output.destination: ") and "set output.destination to" in e.value.message
    for w in words:
        assert w in e.value.message


def _trainer_checkpoint(root: Path, step: int, big: int = 0) -> Path:
    d = root / f"checkpoint-{step}"
    (d / "rng").mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(bytes(range(256)) * ((big or 2048) // 256))
    (d / "optimizer.pt").write_bytes(b"o" * 1024)
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (d / "rng" / "state.pth").write_bytes(b"rng")
    return d
