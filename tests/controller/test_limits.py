"""Bounds on untrusted input and the admin policy, as pure functions (the real API server: test_security.py)."""
from __future__ import annotations

import json

import pytest

from controller import limits
from controller.attempts import classify_failure
from controller.policy import Policy, PolicyError
from controller.status import Options, assess
from tests.controller.builders import T0, ftj, job, pod


def nested(depth: int) -> dict:
    d: dict = {}
    for _ in range(depth):
        d = {"a": d}
    return d


def test_measure_is_iterative_and_names_where():
    assert limits.measure(nested(10), max_depth=16, max_bytes=1000) is None
    problem = limits.measure(nested(50_000), max_depth=16, max_bytes=10**9, where="spec.affinity")
    assert problem.startswith("spec.affinity.a.a") and "nested deeper than 16 levels" in problem
    assert "larger than 1 KiB" in limits.measure({"x": "y" * 2000}, max_depth=4, max_bytes=1024, where="spec")


def test_termination_messages_are_parsed_only_when_short_and_shallow():
    assert limits.loads_bounded('{"a": [1, "]]]["]}') == ({"a": [1, "]]]["]}, None)
    assert limits.loads_bounded("[" * 1000 + "]" * 1000)[1] == "nested deeper than 4 levels"
    assert limits.loads_bounded("x" * 10_000)[1].startswith("longer than")
    assert limits.loads_bounded("{not json")[1] == "not JSON"
    f = classify_failure(pod(exit_code=2, message="[" * 1000 + "]" * 1000), job())
    assert not f.retryable and "not a runner result (nested deeper than" in f.message


def test_screen_sets_aside_a_poison_spec_and_bad_status_fields():
    ok = ftj()
    assert limits.screen(ok) is ok
    bad = limits.screen(ftj(affinity=nested(100)))
    assert bad["spec"] == {} and "spec.affinity" in limits.problems(bad)["spec"]
    f = ftj(status={"phase": "Running", "metrics": {"k" * 100_000: 1.0}, "progress": {"step": "many"},
                    "runner": {"phase": "Training", "pod": "p"}})
    screened = limits.screen(f)
    assert set(limits.problems(screened)["status"]) == {"metrics", "progress"}
    assert screened["status"] == {"phase": "Running", "runner": {"phase": "Training", "pod": "p"}}
    assert limits.clean_metrics({"loss": 0.5, "nested": {"a": 1}, "flag": True, "nan": float("nan")}) == {"loss": 0.5}


def test_assess_fails_only_the_poisoned_job_and_removes_nothing_of_a_finished_one():
    a = assess(limits.screen(ftj(affinity=nested(100))), [], [], now=T0)
    assert (a.status["phase"], a.status["reason"]) == ("Failed", "InvalidSpec") and not a.actions
    j = job()
    a = assess(limits.screen(ftj(status={"metrics": nested(20)})), [j], [pod(phase="Running")], now=T0)
    assert (a.status["phase"], a.status["reason"]) == ("Failed", "InvalidStatus")
    assert [x.kind for x in a.actions] == ["delete-job"] and "status.metrics" in a.status["message"]
    done = {"phase": "Succeeded", "conditions": [{"type": "Succeeded", "status": "True", "reason": "Succeeded",
                                                  "lastTransitionTime": "2027-01-01T00:00:00Z"}],
            "metrics": nested(20)}
    a = assess(limits.screen(ftj(status=done)), [], [], now=T0)
    assert a.status["phase"] == "Succeeded" and a.status.get("metrics") is None


def test_policy_refuses_before_any_job_and_before_every_retry():
    opts = Options(policy=Policy(operator_image="reg/runner:1"))
    a = assess(ftj(image="evil/x:1"), [], [], now=T0, options=opts)
    assert a.status["reason"] == "InvalidSpec" and "policy.imagePrefixes" in a.status["message"] and not a.actions
    assert assess(ftj(image="reg/runner:1"), [], [], now=T0, options=opts).actions[0].kind == "create-attempt"
    # the policy tightened after a retryable failure: no next attempt
    spec = ftj(nodeSelector={"gpu": "a100"})["spec"]
    failed = pod(phase="Failed", exit_code=75, message=json.dumps({"reason": "DownloadFailed", "message": "x"}))
    a = assess(ftj(nodeSelector={"gpu": "a100"}), [job(spec_doc=spec, failed="BackoffLimitExceeded")], [failed],
               now=T0, options=opts)
    assert a.status["phase"] == "Failed" and "policy.nodeSelectorKeys" in a.status["message"]
    allowed = Options(policy=Policy.parse({"nodeSelectorKeys": ["gpu"]}))
    a = assess(ftj(nodeSelector={"gpu": "a100"}), [job(spec_doc=spec, failed="BackoffLimitExceeded")], [failed],
               now=T0 + 1000, options=allowed)
    assert a.status["phase"] == "Pending" and a.actions[0].kind == "create-attempt"


@pytest.mark.parametrize("image,ok", [("reg/ml/x:1", True), ("reg/ml-evil/x:1", False), ("reg/mlx", False),
                                      ("reg/runner:1", True), ("reg/runner:1-evil", False)])
def test_image_prefixes_match_at_a_boundary(image, ok):
    p = Policy.parse({"imagePrefixes": ["reg/ml"]}, operator_image="reg/runner:1")
    assert (p.refusals({"image": image}) == []) is ok


def test_a_policy_with_an_unknown_key_is_refused():
    with pytest.raises(PolicyError, match="imagePrefix"):
        Policy.from_text('{"imagePrefix": ["x/"]}')
    assert Policy.from_text("").refusals({"serviceAccountName": "x"})


def test_webhook_review_lists_every_problem_and_checks_only_new_secrets():
    from controller import webhook

    asked = []

    def may_get(user, ns, name):
        asked.append(name)
        return name == "mine"

    spec = ftj(image="evil/x", hfTokenSecretRef={"name": "mine"}, s3SecretRef={"name": "theirs"},
               output={"destination": "hf://org/m"})["spec"]
    req = {"uid": "u1", "operation": "CREATE", "namespace": "ns", "userInfo": {"username": "alice"},
           "object": {"metadata": {"name": "j", "namespace": "ns"}, "spec": spec}}
    problems = webhook.review(req, Policy(operator_image="reg/runner:1"), may_get)
    assert asked == ["mine", "theirs"]
    assert any("output.checkpoints" in p for p in problems) and any("policy.imagePrefixes" in p for p in problems)
    assert any("alice may not get Secret 'theirs'" in p for p in problems) and len(problems) == 3
    out = webhook.response(req, problems)["response"]
    assert out["uid"] == "u1" and out["allowed"] is False and out["status"]["code"] == 403
    # UPDATE: the run policy changes freely; only Secrets new to the spec are checked
    asked.clear()
    old = {"metadata": {"name": "j"}, "spec": {**spec, "image": None, "output": {"destination": "s3://b/m"}}}
    new = {"metadata": {"name": "j"}, "spec": {**old["spec"], "suspend": True}}
    assert webhook.review({**req, "operation": "UPDATE", "oldObject": old, "object": new}, Policy(), may_get) == []
    new = {"metadata": {"name": "j"}, "spec": {**old["spec"], "imagePullSecrets": ["theirs", "other"]}}
    problems = webhook.review({**req, "operation": "UPDATE", "oldObject": old, "object": new}, Policy(), may_get)
    assert asked == ["other"] and len(problems) == 1
    # out of bounds: one problem, nothing read further
    deep = {"metadata": {"name": "j"}, "spec": {**spec, "affinity": nested(50)}}
    assert webhook.review({**req, "object": deep}, Policy(), may_get)[0].endswith("nested deeper than 16 levels")
