"""runner/report/kube_status.py: which runner events become which status patches (no API server needed)."""
from __future__ import annotations

import ssl

import pytest

from runner.report.kube_status import ApiTarget, StatusSink, sink_from_env


class Recorder(StatusSink):
    def __init__(self, **kw):
        self.t = 0.0
        super().__init__(ApiTarget("https://127.0.0.1:1", lambda: "tok", ssl.create_default_context()), "demo", "ns",
                         pod="demo-1-abc", attempt=1, clock=lambda: self.t, **kw)
        self.sent: list[dict] = []

    def _patch(self, status, *, force):
        if not force and self.clock() < self._paused_until:
            return
        self.sent.append(status)


def progress(step, total=100, **kw):
    return {"event": "progress", "step": step, "totalSteps": total, "loss": 2.0, "learningRate": 1e-4,
            "tokensPerSecond": 100.0, "epoch": 0.1, **kw}


def test_not_under_the_controller_means_no_sink(tmp_path):
    assert sink_from_env({}) is None
    assert sink_from_env({"FINETUNE_JOB_NAME": "x"}) is None
    assert sink_from_env({"FINETUNE_JOB_NAME": "x", "FINETUNE_JOB_NAMESPACE": "ns"}) is None  # no API access


def test_sink_from_env_reads_the_kubeconfig(tmp_path):
    kc = tmp_path / "kc"
    kc.write_text("apiVersion: v1\nkind: Config\ncurrent-context: c\ncontexts: [{name: c, context: {cluster: k, "
                  "user: u}}]\nclusters: [{name: k, cluster: {server: 'https://10.0.0.1:6443', "
                  "insecure-skip-tls-verify: true}}]\nusers: [{name: u, user: {token: abc}}]\n")
    sink = sink_from_env({"FINETUNE_JOB_NAME": "demo", "FINETUNE_JOB_NAMESPACE": "team", "KUBECONFIG": str(kc),
                          "FINETUNE_POD_NAME": "demo-2-x", "FINETUNE_ATTEMPT": "2"})
    assert sink.url == "https://10.0.0.1:6443/apis/finetune.dev/v1alpha1/namespaces/team/finetunejobs/demo/status"
    assert sink.target.token() == "abc" and (sink.pod, sink.attempt) == ("demo-2-x", 2)


def test_events_map_to_the_runners_own_status_fields():
    s = Recorder(interval=0)
    s({"event": "phase", "phase": "Training"})
    s({"event": "checkpoint", "name": "checkpoint-10", "step": 10, "time": "T"})
    s({"event": "eval", "step": 10, "evalLoss": 1.5})
    s(progress(10))
    s({"event": "result", "phase": "Succeeded", "exitCode": 0})
    assert s.sent[0] == {"runner": {"phase": "Training", "pod": "demo-1-abc", "attempt": 1,
                                    "updated": s.sent[0]["runner"]["updated"]}}
    assert s.sent[1] == {"lastCheckpoint": {"name": "checkpoint-10", "step": 10, "time": "T"}}
    p = s.sent[2]["progress"]
    assert (p["step"], p["totalSteps"], p["percent"], p["summary"], p["evalLoss"]) == (10, 100, 10, "10/100 (10%)",
                                                                                      1.5)
    assert (s.sent[3]["runner"]["phase"], s.sent[3]["runner"]["result"]) == ("Training", "Succeeded")
    assert all(set(x) <= {"runner", "progress", "lastCheckpoint"} for x in s.sent)  # never controller fields


def test_progress_is_throttled_but_the_last_step_always_goes_out():
    s = Recorder(interval=5)
    s(progress(1))
    s.t = 1
    s(progress(2))
    s.t = 6
    s(progress(3))
    s.t = 7
    s(progress(100))
    assert [x["progress"]["step"] for x in s.sent] == [1, 3, 100]
    assert "eta" in s.sent[1]["progress"]  # from the measured pace


def test_a_failed_request_raises_for_the_reporter_and_pauses_progress():
    sink = StatusSink(ApiTarget("https://127.0.0.1:9", lambda: "t", ssl.create_default_context()), "d", "ns",
                      interval=0)
    with pytest.raises(RuntimeError, match="status patch failed"):
        sink(progress(1))
    sink(progress(2))  # paused after the failure: no second connection attempt
    assert sink.patches == 0


def test_reporter_survives_a_failing_sink(capsys):
    from runner.report.events import Reporter

    sink = StatusSink(ApiTarget("https://127.0.0.1:9", lambda: "t", ssl.create_default_context()), "d", "ns")
    r = Reporter(sinks=[sink], termination_log="/nonexistent/term")
    r.phase("Training")
    assert "status sink failed" in capsys.readouterr().err
