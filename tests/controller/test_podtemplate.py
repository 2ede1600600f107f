"""The admin's runner pod template (chart values runner.podTemplate / runner.modelCache) and the volumes a
FineTuneJob may ask for (spec.volumes, spec.modelCache, policy.volumeClaims / modelCacheClaims)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from controller import children, jobset, webhook
from controller.podtemplate import RunnerPod, RunnerPodError
from controller.policy import Policy
from tests.controller.builders import ftj

# What the chart renders from its default values (every key present, empty): nothing changes.
CHART_DEFAULTS = {"modelCache": {"claimName": ""}, "podTemplate": {
    "metadata": {"annotations": {}, "labels": {}},
    "spec": {"affinity": {}, "containers": [], "dnsConfig": {}, "dnsPolicy": "", "hostAliases": [],
             "hostNetwork": False, "nodeSelector": {}, "priorityClassName": "", "runtimeClassName": "",
             "schedulerName": "", "terminationGracePeriodSeconds": 0, "tolerations": [], "volumes": []}}}

# The end-to-end tier's values (hostNetwork, the API server on loopback), plus what platform teams set.
ADMIN = """
podTemplate:
  metadata:
    labels: {team: ml-platform}
    annotations: {cost-center: "42"}
  spec:
    runtimeClassName: nvidia
    hostNetwork: true
    dnsPolicy: ClusterFirstWithHostNet
    priorityClassName: batch-low
    nodeSelector: {pool: gpu, zone: a}
    tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
    affinity:
      nodeAffinity:
        requiredDuringSchedulingIgnoredDuringExecution:
          nodeSelectorTerms: [{matchExpressions: [{key: gpu.product, operator: In, values: [H200]}]}]
    volumes: [{name: internal-ca, configMap: {name: internal-ca}}]
    containers:
      - name: runner
        env:
          - {name: KUBERNETES_SERVICE_HOST, value: 127.0.0.1}
          - {name: KUBERNETES_SERVICE_PORT, value: "6443"}
          - {name: WANDB_BASE_URL, value: "https://wandb.internal"}
        volumeMounts: [{name: internal-ca, mountPath: /etc/ssl/internal, readOnly: true}]
modelCache: {claimName: model-cache}
"""


def _pod(runner: RunnerPod | None, **spec):
    f = ftj(**spec)
    return children.job(f, 1, f["spec"], image="reg/runner:1", runner=runner)["spec"]["template"]


def _runner(pod: dict) -> dict:
    return next(c for c in pod["spec"]["containers"] if c["name"] == "runner")


def test_chart_defaults_change_nothing():
    assert _pod(RunnerPod.parse(CHART_DEFAULTS)) == _pod(None)


def test_admin_patch_merges_into_every_runner_pod_and_the_controller_keeps_its_own():
    admin = RunnerPod.from_text(ADMIN)
    spec = dict(nodeSelector={"pool": "cpu", "disk": "ssd"}, tolerations=[{"key": "spot", "operator": "Exists"}],
                affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "a", "operator": "Exists"}]},
                    {"matchExpressions": [{"key": "b", "operator": "Exists"}]}]}}},
                env=[{"name": "WANDB_BASE_URL", "value": "https://api.wandb.ai"}, {"name": "X", "value": "1"}])
    plain, pod = _pod(None, **spec), _pod(admin, **spec)
    s, c = pod["spec"], _runner(pod)
    assert s["hostNetwork"] is True and s["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert s["runtimeClassName"] == "nvidia" and s["priorityClassName"] == "batch-low"
    # maps merged (the admin wins on a key), lists appended after the job's
    assert s["nodeSelector"] == {"pool": "gpu", "disk": "ssd", "zone": "a"}
    assert s["tolerations"] == [{"key": "spot", "operator": "Exists"},
                                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    # both affinities hold: each of the job's ORed terms ANDed with the admin's
    terms = s["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert [[e["key"] for e in t["matchExpressions"]] for t in terms] == [["a", "gpu.product"], ["b", "gpu.product"]]
    assert pod["metadata"]["labels"]["team"] == "ml-platform"
    assert pod["metadata"]["annotations"]["cost-center"] == "42"
    # env: the admin's appended; an entry of the same name replaces the job's; the controller's untouched
    env = [(e["name"], e.get("value")) for e in c["env"]]
    assert env[-3:] == [("KUBERNETES_SERVICE_HOST", "127.0.0.1"), ("KUBERNETES_SERVICE_PORT", "6443"),
                        ("WANDB_BASE_URL", "https://wandb.internal")]
    assert [n for n, _ in env].count("WANDB_BASE_URL") == 1 and ("X", "1") in env
    assert env[:7] == [(e["name"], e.get("value")) for e in _runner(plain)["env"]][:7]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in s["volumes"]}
    assert vols[mounts["/etc/ssl/internal"]["name"]]["configMap"] == {"name": "internal-ca"}
    assert mounts["/etc/ssl/internal"]["readOnly"] is True
    # the model cache: the admin's claim at /model-cache, named to the runner by FINETUNE_MODEL_CACHE
    assert vols[mounts["/model-cache"]["name"]]["persistentVolumeClaim"] == {"claimName": "model-cache"}
    assert dict(env)["FINETUNE_MODEL_CACHE"] == "/model-cache"
    # what the controller owns is exactly as without the patch
    for key in ("securityContext", "serviceAccountName", "automountServiceAccountToken", "restartPolicy",
                "terminationGracePeriodSeconds"):
        assert s[key] == plain["spec"][key]
    for key in ("image", "command", "securityContext", "resources", "workingDir"):
        assert c[key] == _runner(plain)[key]
    assert pod["metadata"]["annotations"]["finetune.dev/spec"] == plain["metadata"]["annotations"]["finetune.dev/spec"]


def test_the_admin_may_give_the_runner_longer_to_save_a_checkpoint():
    """A 70B checkpoint can take longer than the controller's 120 s grace period: the admin raises it for every
    runner pod (a FineTuneJob cannot)."""
    plain = _pod(None)
    assert plain["spec"]["terminationGracePeriodSeconds"] == children.TERMINATION_GRACE_SECONDS == 120
    longer = _pod(RunnerPod.parse({"podTemplate": {"spec": {"terminationGracePeriodSeconds": 900}}}))
    assert longer["spec"]["terminationGracePeriodSeconds"] == 900
    assert {k: v for k, v in longer["spec"].items() if k != "terminationGracePeriodSeconds"} == {
        k: v for k, v in plain["spec"].items() if k != "terminationGracePeriodSeconds"}


def test_the_readme_example_is_what_the_controller_accepts():
    import re

    import yaml

    from tests.controller.conftest import ROOT

    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Runner pods: the admin's pod template"):text.index("### Model cache")]
    values = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    pod = _pod(RunnerPod.parse({"podTemplate": values["runner"]["podTemplate"]}))
    env = {e["name"]: e.get("value") for e in _runner(pod)["env"]}
    assert pod["spec"]["hostNetwork"] is True and pod["spec"]["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert (env["KUBERNETES_SERVICE_HOST"], env["KUBERNETES_SERVICE_PORT"]) == ("127.0.0.1", "6443")


def test_a_jobs_own_priority_class_wins_over_the_admin_default_and_jobsets_get_the_patch_too():
    admin = RunnerPod.from_text(ADMIN)
    assert _pod(admin, priorityClassName="batch-high")["spec"]["priorityClassName"] == "batch-high"
    f = ftj(resources={"nodes": 2, "gpus": 1})
    js = jobset.jobset(f, 1, f["spec"], image="reg/runner:1", runner=admin)
    pod = jobset.pod_template_of(js)
    env = {e["name"]: e for e in _runner(pod)["env"]}
    assert pod["spec"]["hostNetwork"] is True and env["KUBERNETES_SERVICE_HOST"]["value"] == "127.0.0.1"
    assert "PET_NNODES" in env and env["FINETUNE_MODEL_CACHE"]["value"] == "/model-cache"


@pytest.mark.parametrize("doc, field", [
    ({"podTemplate": {"spec": {"securityContext": {"runAsUser": 0}}}}, "runner.podTemplate.spec.securityContext"),
    ({"podTemplate": {"spec": {"serviceAccountName": "admin"}}}, "runner.podTemplate.spec.serviceAccountName"),
    ({"podTemplate": {"spec": {"hostPID": True}}}, "runner.podTemplate.spec.hostPID"),
    ({"podTemplate": {"spec": {"containers": [{"name": "runner", "image": "evil"}]}}},
     "runner.podTemplate.spec.containers[0].image"),
    ({"podTemplate": {"spec": {"containers": [{"name": "runner", "command": ["sh"]}]}}},
     "runner.podTemplate.spec.containers[0].command"),
    ({"podTemplate": {"spec": {"containers": [{"name": "sidecar"}]}}}, "runner.podTemplate.spec.containers"),
    ({"podTemplate": {"spec": {"containers": [{"name": "runner", "env": [{"name": "HOME", "value": "/"}]}]}}},
     "runner.podTemplate.spec.containers[runner].env[0]"),
    ({"podTemplate": {"spec": {"containers": [{"name": "runner", "env": [
        {"name": "FINETUNE_JOB_NAME", "value": "x"}]}]}}}, "runner.podTemplate.spec.containers[runner].env[0]"),
    ({"podTemplate": {"spec": {"volumes": [{"name": "scratch", "emptyDir": {}}]}}},
     "runner.podTemplate.spec.volumes[0].name"),
    ({"podTemplate": {"spec": {"volumes": [{"name": "v", "emptyDir": {}}], "containers": [
        {"name": "runner", "volumeMounts": [{"name": "v", "mountPath": "/scratch/x"}]}]}}},
     "runner.podTemplate.spec.containers[runner].volumeMounts[0].mountPath"),
    ({"podTemplate": {"spec": {"containers": [{"name": "runner", "volumeMounts": [
        {"name": "scratch", "mountPath": "/mnt/s"}]}]}}}, "runner.podTemplate.spec.containers[runner].volumeMounts[0].name"),
    ({"podTemplate": {"metadata": {"annotations": {"finetune.dev/spec": "{}"}}}},
     "runner.podTemplate.metadata.annotations['finetune.dev/spec']"),
    ({"podTemplate": {"spec": {"dnsPolicy": "Sometimes"}}}, "runner.podTemplate.spec.dnsPolicy"),
    ({"podTemplate": {"spec": {"terminationGracePeriodSeconds": 5}}},
     "runner.podTemplate.spec.terminationGracePeriodSeconds"),  # too short to save a checkpoint
    ({"modelCache": {"claimName": "Not A Name"}}, "runner.modelCache.claimName"),
])
def test_what_the_patch_may_not_set_is_refused_naming_the_field(doc, field):
    with pytest.raises(RunnerPodError) as e:
        RunnerPod.parse(doc)
    assert f"{field}:" in str(e.value), str(e.value)


def test_the_controller_refuses_to_start_with_a_bad_patch_and_says_why():
    bad = json.dumps({"podTemplate": {"spec": {"securityContext": {"privileged": True}}}})
    r = subprocess.run([sys.executable, "-m", "controller", "run", f"--runner-pod={bad}"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "runner.podTemplate.spec.securityContext: refused: the controller sets the runner's security context" \
        in r.stderr
    assert "Traceback" not in r.stderr


# ------------------------------------------------------------------------------- spec.volumes and policy
ALLOWING = Policy.parse({"volumeClaims": ["team-checkpoints"], "modelCacheClaims": ["team-cache"]},
                        admin_mounts=("/etc/ssl/internal", "/mnt/shared"))


def _review(spec_overrides: dict, policy: Policy) -> list[str]:
    f = ftj(**spec_overrides)
    request = {"uid": "1", "operation": "CREATE", "namespace": "ns", "object": f,
               "userInfo": {"username": "alice"}}
    return webhook.review(request, policy, lambda *a: True)


VOLUME = {"claimName": "team-checkpoints", "mountPath": "/mnt/checkpoints"}


def test_allowed_volumes_and_cache_are_mounted_into_the_runner_pod():
    spec = {"volumes": [VOLUME, {**VOLUME, "mountPath": "/mnt/base", "readOnly": True, "subPath": "models"}],
            "modelCache": {"claimName": "team-cache"},
            "output": {"destination": "s3://models/out", "checkpoints": "/mnt/checkpoints/run-1"}}
    assert _review(spec, ALLOWING) == [] and ALLOWING.refusals(ftj(**spec)["spec"]) == []
    pod = _pod(RunnerPod.from_text(ADMIN), **spec)
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in _runner(pod)["volumeMounts"]}
    assert vols[mounts["/mnt/checkpoints"]["name"]]["persistentVolumeClaim"] == {"claimName": "team-checkpoints"}
    assert mounts["/mnt/base"]["subPath"] == "models" and mounts["/mnt/base"]["readOnly"] is True
    assert vols[mounts["/mnt/base"]["name"]]["persistentVolumeClaim"]["readOnly"] is True
    # the job's own cache claim instead of the admin's
    assert vols[mounts["/model-cache"]["name"]]["persistentVolumeClaim"] == {"claimName": "team-cache"}


@pytest.mark.parametrize("spec, expected", [
    ({"volumes": [VOLUME]}, "spec.volumes[0].claimName: 'team-checkpoints' is refused by the operator's policy "
                            "(policy.volumeClaims allows nothing)"),
    ({"modelCache": {"claimName": "team-cache"}}, "spec.modelCache.claimName: 'team-cache' is refused by the "
                                                  "operator's policy (policy.modelCacheClaims allows nothing)"),
])
def test_by_default_a_job_may_mount_no_volume(spec, expected):
    problems = _review(spec, Policy())
    assert any(p.startswith(expected) for p in problems), problems


@pytest.mark.parametrize("volume, field, words", [
    ({"claimName": "someone-elses", "mountPath": "/mnt/x"}, "spec.volumes[0].claimName", "policy.volumeClaims"),
    ({**VOLUME, "mountPath": "/etc"}, "spec.volumes[0].mountPath", "would hide or replace /etc"),
    ({**VOLUME, "mountPath": "/scratch/work"}, "spec.volumes[0].mountPath", "would hide or replace /scratch"),
    ({**VOLUME, "mountPath": "/tmp"}, "spec.volumes[0].mountPath", "would hide or replace /tmp"),
    ({**VOLUME, "mountPath": "/model-cache"}, "spec.volumes[0].mountPath", "would hide or replace /model-cache"),
    ({**VOLUME, "mountPath": "/mnt/shared/x"}, "spec.volumes[0].mountPath", "would hide or replace /mnt/shared"),
    ({**VOLUME, "mountPath": "mnt/x"}, "spec.volumes[0].mountPath", "must be an absolute, normalized path"),
    ({**VOLUME, "mountPath": "/mnt/../etc"}, "spec.volumes[0].mountPath", "must be an absolute, normalized path"),
    ({**VOLUME, "subPath": "../other-team"}, "spec.volumes[0].subPath", "without '..'"),
    ({**VOLUME, "hostPath": {"path": "/"}}, "spec.volumes[0].hostPath", "mounts only PersistentVolumeClaims"),
    ({"claimName": "team-checkpoints", "mountPath": "/mnt/c", "secret": {"secretName": "x"}},
     "spec.volumes[0].secret", ""),
])
def test_volumes_outside_the_policy_are_refused_at_admission_naming_the_field(volume, field, words):
    problems = _review({"volumes": [volume]}, ALLOWING)
    mine = [p for p in problems if p.startswith(field)]
    assert mine and any(words in p for p in mine), problems


def test_without_a_cache_or_volumes_the_pod_has_neither_and_a_star_allows_any_claim_of_the_namespace():
    pod = _pod(RunnerPod())
    assert not any(v["name"].startswith("finetune-") for v in pod["spec"]["volumes"])
    assert "FINETUNE_MODEL_CACHE" not in {e["name"] for e in _runner(pod)["env"]}
    anyone = Policy.parse({"volumeClaims": ["*"]})
    assert anyone.refusals(ftj(volumes=[{"claimName": "whatever", "mountPath": "/data"}])["spec"]) == []
    assert anyone.refusals(ftj(volumes=[VOLUME, VOLUME])["spec"]) == [
        "spec.volumes[1].mountPath: /mnt/checkpoints is mounted twice; give each volume its own path"]


def test_the_clusters_store_limits_reach_every_runner_pod_and_a_bad_value_stops_the_controller():
    def env(runner_pod):
        return {e["name"]: e.get("value") for e in _runner(_pod(runner_pod))["env"]}

    assert env(None)["FINETUNE_STORE_TIMEOUTS"] == "connect=10,read=30,stall=90,deadline=10800"  # bounded by default
    admin = RunnerPod.parse({**CHART_DEFAULTS, "storeTimeouts": "read=10, stall=40"})
    assert env(admin)["FINETUNE_STORE_TIMEOUTS"] == "connect=10,read=10,stall=40,deadline=10800"
    with pytest.raises(RunnerPodError) as e:
        RunnerPod.parse({**CHART_DEFAULTS, "storeTimeouts": "stall=forever"})
    assert "runner.storeTimeouts" in str(e.value) and "'stall=forever'" in str(e.value)


def test_a_job_running_its_models_own_code_mounts_the_model_cache_read_only():
    admin = RunnerPod.parse({**CHART_DEFAULTS, "modelCache": {"claimName": "shared-models"}})
    for trust, read_only in ((False, None), (True, True)):
        pod = _pod(admin, model={"source": "hf://org/custom-arch", "trustRemoteCode": trust})
        mount = next(m for m in _runner(pod)["volumeMounts"] if m["mountPath"] == "/model-cache")
        assert mount.get("readOnly") is read_only, mount
