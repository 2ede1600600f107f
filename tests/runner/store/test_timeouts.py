"""The store limits with their defaults: a store endpoint frozen (SIGSTOP on a real moto S3 server in its own process)
in the middle of a download or an upload ends the operation with a retryable error naming the endpoint within 5
minutes - not hours. Run in a child process, so that a limit that does not hold fails the test instead of hanging
it. And a job's spec.storeTimeouts only tightens the environment's (the cluster's) limits."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from runner.api import names
from runner.api.cluster import StoreTimeouts
from runner.api.store_limits import DEFAULTS
from runner.store import timeouts
from tests.conftest import ROOT
from tests.runner.store.helpers import MIB, make_output

BOUND_S = 300  # the promise: a frozen endpoint ends the attempt within 5 minutes
CHILD = """
import os, signal, sys, time
from pathlib import Path
import runner.store as storage
from runner.api.errors import RunnerError
from runner.store import Location, s3 as s3mod
pid, kind, bucket, work = int(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
frozen = []
def freeze(**_):
    if not frozen:
        os.kill(pid, signal.SIGSTOP)
        frozen.append(time.monotonic())
event = "after-call.s3.GetObject" if kind == "download" else "after-call.s3.UploadPart"
s3mod.client().meta.events.register(event, freeze)
try:
    if kind == "download":
        storage.download(Location.parse(f"s3://{bucket}/model"), work / "dl")
    else:
        storage.publish(work / "v2", Location.parse(f"s3://{bucket}/out"), job={"name": "j"})
    print("NO ERROR")
except RunnerError as e:
    print("EXIT", e.exit_code, "AFTER", round(time.monotonic() - frozen[0], 1) if frozen else None)
    print("MESSAGE", e.message)
"""


@pytest.mark.parametrize("kind", ["download", "upload"])
def test_with_the_defaults_a_frozen_store_ends_the_operation_within_5_minutes(kind, s3_process, monkeypatch, tmp_path):
    server, s3 = s3_process
    monkeypatch.delenv(names.ENV_STORE_TIMEOUTS, raising=False)  # the defaults, as a runner pod gets them
    if kind == "download":
        s3.client.put_object(Bucket=s3.bucket, Key="model/config.json", Body=b"{}")
        s3.client.put_object(Bucket=s3.bucket, Key="model/model.safetensors", Body=os.urandom(40 * MIB))
    else:
        make_output(tmp_path / "v2", big_mib=40)
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(server.proc.pid), kind, s3.bucket, str(tmp_path)],
                              capture_output=True, text=True, timeout=BOUND_S + 60, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        pytest.fail(f"the frozen {kind} was still going {BOUND_S + 60}s later")
    finally:
        server.thaw()
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert "EXIT" in lines, proc.stdout + proc.stderr[-3000:]
    code, after = lines["EXIT"].split(" AFTER ")
    print(f"\nfreeze-to-error with the defaults ({DEFAULTS.describe()}), {kind}: {after} s")
    assert int(code) == 75 and float(after) < BOUND_S, proc.stdout
    assert server.url in lines["MESSAGE"] and "stall=" in lines["MESSAGE"], lines["MESSAGE"]


def test_a_jobs_store_timeouts_only_tighten_the_environments(monkeypatch):
    monkeypatch.setenv(names.ENV_STORE_TIMEOUTS, "read=20,stall=60")  # the cluster's (chart runner.storeTimeouts)
    said: list[str] = []
    got = timeouts.apply_job(StoreTimeouts(read=5, stall=600), said.append)
    assert (got.read, got.stall, got.connect, got.deadline) == (5, 60, DEFAULTS.connect, DEFAULTS.deadline)
    assert said == ["spec.storeTimeouts.stall=600 is above this cluster's 60 (the admin's ceiling): 60 applies"]
    assert timeouts.limits() == got  # the process (and the ranks it starts) now use them
    assert timeouts.apply_job(None, said.append) == got and len(said) == 1
