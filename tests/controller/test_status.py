"""controller.status: dict in, dict out. Every phase, every failure reason, retries, suspend, ttl."""
from __future__ import annotations

import pytest

from controller.naming import child_name, job_name
from controller.status import Options, assess, compute
from tests.controller.builders import T0, ftj, job, pod, result, spec, ts

OPTS = Options(retry_backoff=10, image_pull_timeout=60)


def run(f, jobs=(), pods=(), now=T0, **kw):
    return assess(f, list(jobs), list(pods), now=now, options=OPTS, **kw)


def kinds(a):
    return [(x.kind, x.name or x.attempt) for x in a.actions]


def cond(status, type_):
    return next(c for c in status["conditions"] if c["type"] == type_)


# ----------------------------------------------------------------------------- start and progress
def test_new_job_creates_attempt_one_and_is_pending():
    a = run(ftj())
    assert kinds(a) == [("create-attempt", "demo-1")]
    s = a.status
    assert (s["phase"], s["attempt"], s["jobName"], s["reason"]) == ("Pending", 1, "demo-1", None)
    assert cond(s, "Succeeded")["status"] == "False" and cond(s, "Failed")["status"] == "False"
    assert [(e.type, e.reason) for e in a.events] == [("Normal", "Pending")]


def test_pending_message_is_stable_from_creation_to_pod_start():
    """One status write per new attempt: the message does not change until the pod runs."""
    created = run(ftj()).status["message"]
    no_pod = run(ftj(), [job(1)]).status["message"]
    starting = run(ftj(), [job(1)], [pod(1, "Pending")]).status["message"]
    assert created == no_pod == starting


def test_running_pod_is_running_until_the_runner_reports_a_stage():
    f = ftj(status={"runner": {"phase": "Validating", "pod": "demo-1-abcde"}})
    assert compute(f, [job(1)], [pod(1, "Running")], now=T0)["phase"] == "Running"
    f = ftj(status={"runner": {"phase": "Training", "pod": "demo-1-abcde"}})
    s = compute(f, [job(1)], [pod(1, "Running")], now=T0)
    assert s["phase"] == "Training" and cond(s, "Running")["status"] == "True"


def test_runner_report_of_an_earlier_pod_is_ignored():
    f = ftj(status={"runner": {"phase": "Uploading", "pod": "demo-1-old"}})
    assert compute(f, [job(1)], [pod(1, "Running")], now=T0)["phase"] == "Running"


def test_succeeded_with_output_and_metrics_from_the_termination_message():
    msg = result(output="s3://models/out", metrics={"train_loss": 1.25})
    a = run(ftj(), [job(1, complete=True)], [pod(1, "Succeeded", exit_code=0, message=msg)],
            has_identity=True)
    s = a.status
    assert (s["phase"], s["output"], s["metrics"]) == ("Succeeded", "s3://models/out", {"train_loss": 1.25})
    assert s["completionTime"] == ts(-2)
    assert cond(s, "Succeeded")["status"] == "True"
    assert kinds(a) == [("revoke-identity", 0)]  # the runner's identity is removed once the job is done


def test_succeeded_pod_counts_before_the_job_controller_marks_the_job():
    s = compute(ftj(), [job(1)], [pod(1, "Succeeded", exit_code=0, message=result())], now=T0)
    assert s["phase"] == "Succeeded"


# ------------------------------------------------------------------------------------ failures
@pytest.mark.parametrize("runner_reason", ["InvalidSpec", "DownloadFailed", "TrainingFailed", "MergeFailed",
                                           "UploadFailed"])
def test_permanent_exit_code_fails_with_the_runners_reason_and_no_retry(runner_reason):
    p = pod(1, "Failed", exit_code=2, message=result(runner_reason, exit_code=2))
    a = run(ftj(), [job(1, failed="BackoffLimitExceeded")], [p])
    assert (a.status["phase"], a.status["reason"]) == ("Failed", runner_reason)
    assert f"{runner_reason} happened" in a.status["message"]
    assert not [x for x in a.actions if x.kind == "create-attempt"]
    assert ("Warning", runner_reason) in [(e.type, e.reason) for e in a.events]
    assert cond(a.status, "Failed")["reason"] == runner_reason


@pytest.mark.parametrize("code,reason", [(137, "OOMKilled"), (137, "Error"), (3, "Error")])
def test_out_of_memory_is_permanent(code, reason):
    msg = result("OutOfMemory", exit_code=3) if code == 3 else None
    a = run(ftj(), [job(1, failed="BackoffLimitExceeded")], [pod(1, "Failed", exit_code=code, reason=reason,
                                                                   message=msg)])
    assert (a.status["phase"], a.status["reason"]) == ("Failed", "OutOfMemory")
    assert not [x for x in a.actions if x.kind == "create-attempt"]


@pytest.mark.parametrize("code", [1, 75, 143])
def test_retryable_exit_waits_for_the_backoff_then_creates_the_next_attempt(code):
    f = ftj()
    jobs = [job(1, failed="BackoffLimitExceeded")]
    pods = [pod(1, "Failed", exit_code=code, message=result("DownloadFailed", exit_code=code), finished=-2)]
    early = run(f, jobs, pods)
    assert early.status["phase"] == "Pending" and not early.actions
    assert early.requeue_after == pytest.approx(8.0)
    assert "DownloadFailed" in early.status["message"] and early.status["failedAttempts"] == 1
    assert ("Warning", "AttemptFailed") in [(e.type, e.reason) for e in early.events]
    later = run(f, jobs, pods, now=T0 + 9)
    assert kinds(later) == [("create-attempt", "demo-2")]
    assert later.status["attempt"] == 2


def test_backoff_doubles_per_counted_failure():
    jobs = [job(1, failed="x"), job(2, failed="x")]
    pods = [pod(1, "Failed", exit_code=75, finished=-30), pod(2, "Failed", exit_code=75, finished=-2)]
    a = run(ftj(), jobs, pods)
    assert a.requeue_after == pytest.approx(18.0)  # 10 * 2**1 - 2


def test_backoff_limit_exceeded():
    jobs = [job(i, failed="BackoffLimitExceeded") for i in (1, 2)]
    pods = [pod(i, "Failed", exit_code=75, message=result("UploadFailed", exit_code=75), name=f"p{i}",
                owner_uid=f"job-uid-{i}") for i in (1, 2)]
    a = run(ftj(backoffLimit=1), jobs, pods, now=T0 + 1000)
    assert (a.status["phase"], a.status["reason"]) == ("Failed", "BackoffLimitExceeded")
    assert "UploadFailed" in a.status["message"] and a.status["failedAttempts"] == 2
    assert not a.actions


def test_evicted_pod_is_retried_without_counting():
    jobs = [job(1, failed="BackoffLimitExceeded")]
    pods = [pod(1, "Failed", exit_code=143, pod_reason="Evicted")]
    a = run(ftj(backoffLimit=0), jobs, pods)
    assert kinds(a) == [("create-attempt", "demo-2")] and a.status["failedAttempts"] == 0


def test_job_deadline_exceeded_is_permanent():
    jobs = [job(1, failed="DeadlineExceeded")]
    pods = [pod(1, "Failed", exit_code=143)]
    s = run(ftj(activeDeadlineSeconds=30), jobs, pods).status
    assert (s["phase"], s["reason"]) == ("Failed", "DeadlineExceeded")


def test_deadline_counted_by_the_controller_stops_the_running_attempt():
    f = ftj(activeDeadlineSeconds=30)
    a = run(f, [job(1, created=-40)], [pod(1, "Running")])
    assert (a.status["phase"], a.status["reason"]) == ("Failed", "DeadlineExceeded")
    assert kinds(a) == [("delete-job", "demo-1")]
    before = run(f, [job(1, created=-20)], [pod(1, "Running")])
    assert before.status["phase"] == "Running" and before.requeue_after == pytest.approx(10)


def test_unschedulable_stays_pending_with_the_reason():
    s = compute(ftj(), [job(1)], [pod(1, "Pending", unschedulable=True)], now=T0)
    assert (s["phase"], s["reason"]) == ("Pending", "Unschedulable")
    assert "Insufficient nvidia.com/gpu" in s["message"]


def test_image_pull_failure_waits_then_fails_and_stops_the_pod():
    pods = [pod(1, "Pending", waiting="ImagePullBackOff", started=-10)]
    a = run(ftj(), [job(1)], pods)
    assert (a.status["phase"], a.status["reason"]) == ("Pending", "ImagePullFailed")
    assert a.requeue_after == pytest.approx(50) and not a.actions
    a = run(ftj(), [job(1)], pods, now=T0 + 60)
    assert (a.status["phase"], a.status["reason"]) == ("Failed", "ImagePullFailed")
    assert kinds(a) == [("delete-job", "demo-1")]


def test_a_failed_job_stays_failed_while_the_cache_still_shows_its_deleted_job():
    """The pass after a verdict can still see the attempt's Job (the watch cache has not had its deletion yet) while
    its pod, deleted after it, is going: the job stays Failed and the Job is deleted again; once the Job is gone from
    the cache, no attempt starts afresh (no second Job of the same attempt)."""
    pods = [pod(1, "Pending", waiting="ImagePullBackOff", started=-61)]
    failed = run(ftj(), [job(1)], pods).status
    assert (failed["phase"], failed["reason"]) == ("Failed", "ImagePullFailed")
    going = [pod(1, "Pending", waiting="ImagePullBackOff", started=-61, deleting=True)]
    a = run(ftj(status=failed), [job(1)], going, now=T0 + 2)
    assert (a.status["phase"], a.status["reason"]) == ("Failed", "ImagePullFailed"), a.status
    assert kinds(a) == [("delete-job", "demo-1")] and not a.events
    assert a.status["conditions"] == failed["conditions"]
    gone = run(ftj(status=failed), [], [], now=T0 + 30)
    assert gone.status["phase"] == "Failed" and not gone.actions


def test_invalid_image_name_fails_at_once():
    a = run(ftj(), [job(1)], [pod(1, "Pending", waiting="InvalidImageName")])
    assert (a.status["phase"], a.status["reason"]) == ("Failed", "ImagePullFailed")


def test_missing_secret_is_an_invalid_spec_after_the_timeout():
    a = run(ftj(), [job(1)], [pod(1, "Pending", waiting="CreateContainerConfigError", started=-61)])
    assert (a.status["phase"], a.status["reason"]) == ("Failed", "InvalidSpec")


def test_invalid_spec_fails_before_any_job():
    bad = ftj(output={"destination": "hf://org/model"})  # the Hub needs output.checkpoints
    a = run(bad)
    assert (a.status["phase"], a.status["reason"]) == ("Failed", "InvalidSpec")
    assert "output.checkpoints" in a.status["message"] and not a.actions


# ------------------------------------------------------------------------------- suspend, ttl
def test_suspend_deletes_the_active_attempt():
    a = run(ftj(suspend=True), [job(1)], [pod(1, "Running")])
    assert a.status["phase"] == "Suspended" and kinds(a) == [("delete-job", "demo-1")]
    assert cond(a.status, "Suspended")["status"] == "True"


def test_resume_waits_for_stopping_pods_then_reuses_the_attempt_number():
    orphan = pod(1, "Running", deleting=True)  # its Job is gone already
    a = run(ftj(), [], [orphan])
    assert a.status["phase"] == "Pending" and not a.actions and a.requeue_after
    a = run(ftj(), [job(1, failed="x")], [pod(1, "Failed", exit_code=75, finished=-100)])
    assert kinds(a) == [("create-attempt", "demo-2")]
    a = run(ftj(), [], [])
    assert kinds(a) == [("create-attempt", "demo-1")]


def test_finished_stays_finished_when_the_evidence_is_gone():
    done = compute(ftj(), [job(1, complete=True)], [pod(1, "Succeeded", exit_code=0, message=result(
        output="s3://x"))], now=T0)
    later = run(ftj(status=done), [], [], now=T0 + 3600)
    assert not later.actions
    assert {k: later.status.get(k) for k in ("phase", "output", "completionTime")} == {
        "phase": "Succeeded", "output": "s3://x", "completionTime": done["completionTime"]}
    assert later.status["conditions"] == done["conditions"] and not later.events


def test_raising_backoff_limit_does_not_revive_a_failed_job():
    jobs = [job(1, failed="x")]
    pods = [pod(1, "Failed", exit_code=75, finished=-100)]
    failed = compute(ftj(backoffLimit=0), jobs, pods, now=T0)
    assert failed["reason"] == "BackoffLimitExceeded"
    a = run(ftj(backoffLimit=5, status=failed), jobs, pods)
    assert a.status["phase"] == "Failed" and not a.actions


def test_ttl_deletes_the_jobs_after_completion():
    jobs = [job(1, complete=True)]
    pods = [pod(1, "Succeeded", exit_code=0, finished=-10, message=result())]
    a = run(ftj(ttlSecondsAfterFinished=60), jobs, pods)
    assert not a.actions and a.requeue_after == pytest.approx(50)
    a = run(ftj(ttlSecondsAfterFinished=5), jobs, pods)
    assert kinds(a) == [("delete-job", "demo-1")]


# -------------------------------------------------------------------------- spec changes, misc
def test_spec_change_after_start_is_ignored_with_a_warning():
    original = spec()
    changed = ftj(generation=2, status={"observedGeneration": 1}, lora={"r": 64})
    jobs = [job(1, failed="x", spec_doc=original)]
    pods = [pod(1, "Failed", exit_code=75, finished=-100)]
    a = run(changed, jobs, pods)
    assert ("Warning", "SpecChangeIgnored") in [(e.type, e.reason) for e in a.events]
    create = next(x for x in a.actions if x.kind == "create-attempt")
    assert "lora" not in create.spec  # the next attempt runs the original spec
    again = run(ftj(generation=2, status={"observedGeneration": 2}, lora={"r": 64}), jobs, pods)
    assert "SpecChangeIgnored" not in [e.reason for e in again.events]  # said once per generation


def test_same_observations_same_status_and_no_events():
    """What a restarted controller sees: nothing to write, nothing to announce."""
    f = ftj(status={"runner": {"phase": "Training", "pod": "demo-1-abcde"}})
    first = compute(f, [job(1)], [pod(1, "Running")], now=T0)
    f["status"].update(first)
    again = run(f, [job(1)], [pod(1, "Running")], now=T0 + 30)
    assert again.status == first and not again.events and not again.actions


def test_condition_transition_time_is_kept_while_the_status_holds():
    f = ftj()
    s1 = compute(f, [job(1)], [pod(1, "Running")], now=T0)
    f["status"] = s1
    s2 = compute(f, [job(1)], [pod(1, "Running")], now=T0 + 100)
    assert cond(s2, "Running")["lastTransitionTime"] == cond(s1, "Running")["lastTransitionTime"]
    f["status"] = s2
    s3 = compute(f, [job(1, complete=True)], [pod(1, "Succeeded", exit_code=0, message=result())], now=T0 + 200)
    assert cond(s3, "Running")["lastTransitionTime"] == ts(200)


def test_children_of_another_incarnation_are_ignored():
    other = job(1)
    other["metadata"]["ownerReferences"][0]["uid"] = "someone-else"
    assert kinds(run(ftj(), [other], [])) == [("create-attempt", "demo-1")]


def test_names_are_deterministic_and_fit_label_values():
    assert job_name("demo", 3) == "demo-3"
    long = "x" * 80
    assert len(job_name(long, 12)) <= 63 and job_name(long, 12) == job_name(long, 12)
    assert job_name(long, 1) != job_name("x" * 79, 1)
    assert len(child_name("y" * 260, "runner", 253)) <= 253


# ------------------------------------------------------------------- a runner pod deleted by hand
def test_a_deleted_pod_that_its_job_replaces_is_no_failed_attempt():
    """`kubectl delete pod`: the runner saves a checkpoint on SIGTERM and exits 75, so the pod shows Failed while it
    goes; its Job (not failed) makes a new pod of the same attempt. No AttemptFailed, no attempt 2, no Pending: the
    status says the pod was replaced and from which step the new one resumes, with one Normal PodReplaced Event."""
    old = {"phase": "Training", "attempt": 1, "jobName": "demo-1", "failedAttempts": 0,
           "message": "attempt 1: pod demo-1-old is running", "lastCheckpoint": {"name": "checkpoint-40", "step": 40},
           "runner": {"phase": "Training", "pod": "demo-1-old", "attempt": 1}}
    gone = pod(1, "Failed", name="demo-1-old", exit_code=75, message=result("TrainingFailed", exit_code=75),
               deleting=True)
    for pods in ([gone], [gone, pod(1, "Pending", name="demo-1-new")], [gone, pod(1, "Running", name="demo-1-new")],
                 [pod(1, "Running", name="demo-1-new")]):  # the old pod going, then gone
        a = run(ftj(status=old), [job(1)], pods)
        s = a.status
        assert not a.actions and s["failedAttempts"] == 0 and s["attempt"] == 1, (pods, s, a.actions)
        assert "AttemptFailed" not in [e.reason for e in a.events], a.events
        assert "demo-1-old was deleted" in s["message"], s["message"]
        if len(pods) > 1 or pods[0]["metadata"]["name"] == "demo-1-new":
            running = pods[-1]["status"]["phase"] == "Running"
            assert s["phase"] == ("Running" if running else "Pending"), s
            assert "replaced by pod demo-1-new" in s["message"] and "checkpoint of step 40" in s["message"], s
            assert [(e.type, e.reason) for e in a.events if e.reason == "PodReplaced"] == [("Normal", "PodReplaced")]
    # once the new pod's runner reports, its own phase
    new = {**old, "runner": {"phase": "Training", "pod": "demo-1-new", "attempt": 1},
           "message": s["message"]}
    s = run(ftj(status=new), [job(1)], [pod(1, "Running", name="demo-1-new")]).status
    assert s["phase"] == "Training" and "deleted" not in s["message"], s


def test_a_deleted_pod_whose_job_counts_it_failed_is_a_failed_attempt():
    """Where the Job itself counts the deleted pod (it failed the Job), the attempt failed: attempt 2 follows."""
    old = {"phase": "Training", "attempt": 1, "runner": {"phase": "Training", "pod": "demo-1-old", "attempt": 1}}
    gone = pod(1, "Failed", name="demo-1-old", exit_code=75, message=result("TrainingFailed", exit_code=75),
               deleting=True)
    a = run(ftj(status=old), [job(1, failed="BackoffLimitExceeded")], [gone])
    assert a.status["failedAttempts"] == 1 and "AttemptFailed" in [e.reason for e in a.events]


# ----------------------------------------------------------------------------------- the cost estimate
def test_pending_status_carries_the_estimate_the_spec_alone_allows():
    from runner.api import cost
    from runner.api.parse import manifest, parse_job

    over = dict(model={"source": "hf://meta-llama/Meta-Llama-3-8B-Instruct"}, training={"maxSteps": 300})
    s = run(ftj(**over)).status
    assert s["phase"] == "Pending"
    e = s["estimate"]
    expected = cost.from_spec(parse_job(manifest("demo", spec(**over))).spec)
    assert e == expected.model_dump(by_alias=True, exclude_none=True)
    assert (e["gpu"], e["row"], e["steps"]) == ("h100", "h100-8b-packed", 300) and e["summary"].endswith("h100-hours")
    assert "assumed" in e["gpuSource"]  # the spec names no GPU kind
    # the same on every pass, of the spec the job runs with (its first attempt's)
    assert run(ftj(), [job(1)], [pod(1, "Running")]).status["estimate"] == run(ftj()).status["estimate"]


def test_an_estimate_the_spec_cannot_give_says_unknown_and_why():
    e = run(ftj()).status["estimate"]  # epochs without maxSteps, a model the table does not know by name
    assert e["summary"] == "unknown" and e["why"]
    assert "estimate" not in {k for k, v in run(ftj(lora={"r": 0})).status.items() if v is not None}
