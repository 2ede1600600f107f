"""The checkpoint location's lease (runner/store/lease.py) in a whole run. The lease on every store - held,
waited for, taken over when stale, raced by four processes - is the contract suite's (test_contract.py)."""
from __future__ import annotations

from pathlib import Path

from runner.api.errors import EXIT_RETRYABLE
from runner.store import Location
from runner.store.lease import LEASE, Lease
from tests.conftest import job_doc, run_cli


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
