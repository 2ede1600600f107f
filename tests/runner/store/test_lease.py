"""The checkpoint location's lease (runner/store/lease.py), locally and on a real S3 API (moto server)."""
from __future__ import annotations

import json
import multiprocessing
import threading
import time
from pathlib import Path

import pytest

from runner.api.errors import EXIT_RETRYABLE, RetryableError
from runner.store import Location
from runner.store.lease import LEASE, Lease
from tests.conftest import job_doc, run_cli


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path) -> Location:
    if request.param == "local":
        return Location.parse(str(tmp_path / "ckpts"))
    s3_server = request.getfixturevalue("s3_server")
    return Location.parse(f"s3://{s3_server.bucket}/jobs/j1.checkpoints")


def raw(loc: Location) -> bytes | None:
    got = Lease(loc)._read()
    return got[0] if got else None


def test_a_held_lease_refuses_a_second_runner_then_is_released(where):
    a = Lease(where, interval=60, wait=0)
    a.acquire("runner-a")
    assert json.loads(raw(where))["owner"] == "runner-a"
    b = Lease(where, interval=60, wait=0.3)
    with pytest.raises(RetryableError, match=rf"{where} is in use by another runner \(held by runner-a, last "
                                             r"heartbeat \d+s ago\).*set output.checkpoints to another place"):
        b.acquire("runner-b")
    a.release()
    assert raw(where) is None
    b.acquire("runner-b")
    assert json.loads(raw(where))["owner"] == "runner-b"
    b.release()


def test_a_waiting_runner_gets_the_lease_once_it_is_released(where):
    a = Lease(where, interval=60)
    a.acquire("runner-a")
    threading.Timer(0.5, a.release).start()
    b = Lease(where, interval=60, wait=10)
    started = time.monotonic()
    b.acquire("runner-b")
    assert 0.4 < time.monotonic() - started < 5
    assert json.loads(raw(where))["owner"] == "runner-b"
    b.release()


def test_a_stale_lease_is_taken_over_and_its_old_holder_loses_it(where):
    logs: list[str] = []
    a = Lease(where, interval=60)
    a.acquire("runner-a")
    a._stop.set()  # the holder stops beating (a crashed pod)
    b = Lease(where, interval=60, ttl=0.5, wait=10, log=logs.append)
    b.acquire("runner-b")
    assert json.loads(raw(where))["owner"] == "runner-b"
    assert any("taking over a stale lease" in m and "runner-a" in m for m in logs)
    with pytest.raises(RetryableError, match="lost the lease .* runner-b"):
        a.renew()  # the old holder, if it comes back, stops writing
    a.release()  # and does not remove the new holder's lease
    assert json.loads(raw(where))["owner"] == "runner-b"
    b.release()


def test_the_heartbeat_keeps_a_lease_alive(where):
    a = Lease(where, interval=0.2)
    a.acquire("runner-a")
    b = Lease(where, interval=60, ttl=0.6, wait=1.5)
    with pytest.raises(RetryableError, match="in use by another runner"):
        b.acquire("runner-b")  # renewed every 0.2 s: never unchanged for 0.6 s
    assert json.loads(raw(where))["owner"] == "runner-a"
    a.renew()
    a.release()


def _race(uri: str, owner: str, start: float, results) -> None:
    time.sleep(max(0.0, start - time.time()))
    lease = Lease(Location.parse(uri), interval=60, wait=0)
    try:
        lease.acquire(owner)
        results.put(owner)
        time.sleep(1.0)  # hold it while the others try
    except RetryableError:
        results.put(None)


def test_racing_runners_exactly_one_wins(where):
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    start = time.time() + 3
    procs = [ctx.Process(target=_race, args=(str(where), f"r{i}", start, results)) for i in range(4)]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    winners = [g for g in got if g]
    assert len(winners) == 1, got
    assert json.loads(raw(where))["owner"] == winners[0]


def test_a_runner_on_a_held_location_exits_retryable_and_a_finished_run_leaves_no_lease(tiny_llama, qa_jsonl,
                                                                                        tmp_path):
    ckpts = tmp_path / "ckpts"
    doc = job_doc(tiny_llama, qa_jsonl, tmp_path / "out", output={"destination": str(tmp_path / "out"),
                                                                    "checkpoints": str(ckpts)},
                  training={"maxSteps": 2, "saveSteps": 1})
    other = Lease(Location.parse(str(ckpts)), interval=60)
    other.acquire("the-other-runner")
    code, events, stderr, result = run_cli(tmp_path, doc, env={"FINETUNE_LEASE_WAIT": "1"})
    assert code == EXIT_RETRYABLE, stderr
    assert f"checkpoint location {ckpts} is in use by another runner (held by the-other-runner" in result["message"]
    other.release()

    code, events, stderr, result = run_cli(tmp_path, doc, env={"FINETUNE_LEASE_WAIT": "1"})
    assert code == 0, stderr
    assert any(e.get("event") == "checkpoint" for e in events)
    assert not (ckpts / LEASE).exists()
    assert not [p for p in Path(ckpts).iterdir() if "LEASE" in p.name]
