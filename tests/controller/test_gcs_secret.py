"""spec.gcsSecretRef (pure): the service-account key reaches the runner pod as a read-only file named by
GOOGLE_APPLICATION_CREDENTIALS, never as an env value; naming the Secret is checked like any other Secret
reference; neither the job nor the admin's pod patch may point the variable elsewhere."""
from __future__ import annotations

import pytest

from controller import children, webhook
from controller.podtemplate import RunnerPod, RunnerPodError
from controller.policy import Policy
from runner.api.errors import SpecError
from runner.api.parse import parse_job
from tests.controller.builders import ftj


def _pod(**spec) -> dict:
    f = ftj(**spec)
    return children.job(f, 1, f["spec"], image="reg/runner:1")["spec"]["template"]["spec"]


def test_the_key_is_a_read_only_file_and_the_env_names_only_its_path():
    ps = _pod(gcsSecretRef={"name": "gcs-key"}, model={"source": "gs://bases/llama"})
    c = ps["containers"][0]
    env = {e["name"]: e for e in c["env"]}
    path = env["GOOGLE_APPLICATION_CREDENTIALS"]
    assert path == {"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": "/var/run/secrets/finetune.dev/gcs/key.json"}
    mount = next(m for m in c["volumeMounts"] if path["value"].startswith(m["mountPath"] + "/"))
    assert mount["readOnly"] is True
    volume = next(v for v in ps["volumes"] if v["name"] == mount["name"])
    assert volume["secret"] == {"secretName": "gcs-key", "defaultMode": 0o440,
                                "items": [{"key": "key.json", "path": "key.json"}]}
    assert ps["securityContext"]["fsGroup"] == ps["securityContext"]["runAsUser"]  # 0440: the runner's group
    # nothing from the Secret is in the environment: no secretKeyRef, no value but the path
    assert not [e for e in c["env"] if "gcs-key" in str(e.get("valueFrom"))]


def test_another_key_of_the_secret_lands_under_the_same_file_name():
    ps = _pod(gcsSecretRef={"name": "sa", "key": "credentials.json"})
    volume = next(v for v in ps["volumes"] if "secret" in v)
    assert volume["secret"]["items"] == [{"key": "credentials.json", "path": "key.json"}]


def test_without_the_reference_there_is_no_key_and_no_variable():
    ps = _pod()
    c = ps["containers"][0]
    assert "GOOGLE_APPLICATION_CREDENTIALS" not in {e["name"] for e in c["env"]}
    assert not [v for v in ps["volumes"] if "secret" in v]


def test_a_key_name_that_cannot_be_a_secret_key_is_refused_by_validate():
    doc = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "j"},
           "spec": ftj(gcsSecretRef={"name": "sa", "key": "../etc/passwd"})["spec"]}
    with pytest.raises(SpecError) as e:
        parse_job(doc)
    assert any("gcsSecretRef.key" in p for p in e.value.problems), e.value.problems


def test_the_webhook_checks_that_the_creator_may_read_the_secret():
    asked = []

    def may_get(user, ns, name):
        asked.append(name)
        return name == "mine"

    def review(spec):
        req = {"uid": "u", "operation": "CREATE", "namespace": "ns", "userInfo": {"username": "alice"},
               "object": {"metadata": {"name": "j", "namespace": "ns"}, "spec": spec}}
        return webhook.review(req, Policy(), may_get)

    assert review(ftj(gcsSecretRef={"name": "mine"})["spec"]) == []
    problems = review(ftj(gcsSecretRef={"name": "team-b-sa"})["spec"])
    assert len(problems) == 1 and "spec.gcsSecretRef" in problems[0]
    assert "alice may not get Secret 'team-b-sa'" in problems[0]
    assert asked[:2] == ["mine", "team-b-sa"]


def test_neither_the_job_nor_the_pod_patch_may_point_the_variable_elsewhere():
    spec = ftj(gcsSecretRef={"name": "sa"},
               env=[{"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": "/scratch/other.json"}])["spec"]
    refusals = Policy().refusals(spec)
    assert any("spec.env[0]" in r and "GOOGLE_APPLICATION_CREDENTIALS is reserved" in r for r in refusals), refusals
    with pytest.raises(RunnerPodError) as e:
        RunnerPod.parse({"podTemplate": {"spec": {"containers": [{"name": "runner", "env": [
            {"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": "/x"}]}]}}})
    assert "runner.podTemplate.spec.containers[runner].env[0]" in str(e.value)
