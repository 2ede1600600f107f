"""Jobs on several nodes: one JobSet per attempt (controller/jobset.py).

The pure half builds and reads JobSets as dicts. The cluster half runs the controller against the real API server
(1.20) with the JobSet CRD of a pinned JobSet release applied: testdata/ holds that release's own CRD
(config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml at tag JOBSET_RELEASE), gzipped but otherwise verbatim
(JOBSET_CRD_SHA256 is the upstream file's). What the 1.20 server lacks, and what is done about it:
  * the CRD's x-kubernetes-validations (CEL rules: immutability of a few fields, Kubernetes 1.25+) are stripped
    before it is applied, and so are its 33 `default: ""` (on `name` of object references in the pod template,
    which 1.20 refuses as "must be of type string: null"; the one such `name` that keys a list map,
    imagePullSecrets[].name, becomes required instead) - the only changes;
  * Indexed Jobs (completionMode, Kubernetes 1.21+): the Job API drops the field, so the test annotates each
    pod with its completion index as the Indexed Job controller does.
The JobSet controller itself does not run here: FakeJobSetController plays it (the headless Service and the child
Job as JobSet v0.12 builds them, with its labels and owner references, and the JobSet's terminal condition), as
FakeKubelet plays the kubelet. A real JobSet controller, pod DNS and several hosts are untested here (README
"Several nodes").
"""
from __future__ import annotations

import copy
import gzip
import hashlib
import json
from pathlib import Path

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from controller import children, jobset, rbac
from controller.attempts import attempts_of
from controller.kube import ns_path
from controller.policy import Policy
from controller.status import Options, assess
from runner.api import names
from tests.cluster.cluster import wait_for
from tests.controller import builders
from tests.controller.builders import T0, ftj, pod, result, ts

JOBSET_RELEASE = "v0.12.0"
JOBSET_CRD = Path(__file__).parent / "testdata" / f"jobset.x-k8s.io_jobsets-{JOBSET_RELEASE}.yaml.gz"
JOBSET_CRD_SHA256 = "d022b87624512cf0b6741b31b24a2bea9945b5a838b50713af29332c878bb6fe"
CRD_NAME = f"{jobset.PLURAL}.{jobset.GROUP}"
CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


# =========================================================================================== pure
def test_the_jobset_of_an_attempt():
    f = ftj("demo", resources={"nodes": 3, "gpus": 8, "memory": "100Gi"}, queueName="team-a")
    js = jobset.jobset(f, 2, f["spec"], image="reg/runner:1", deadline_seconds=100)
    assert (js["apiVersion"], js["kind"], js["metadata"]["name"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet", "demo-2")
    md = js["metadata"]
    assert md["labels"]["kueue.x-k8s.io/queue-name"] == "team-a" and md["labels"]["finetune.dev/attempt"] == "2"
    assert md["ownerReferences"][0]["kind"] == "FineTuneJob" and md["ownerReferences"][0]["controller"] is True
    [rjob] = js["spec"]["replicatedJobs"]
    job_spec = rjob["template"]["spec"]
    assert (rjob["name"], rjob["replicas"]) == ("node", 1)
    assert {k: job_spec[k] for k in ("parallelism", "completions", "completionMode", "backoffLimit",
                                      "activeDeadlineSeconds")} == {
        "parallelism": 3, "completions": 3, "completionMode": "Indexed", "backoffLimit": 0,
        "activeDeadlineSeconds": 100}
    assert js["spec"]["failurePolicy"] == {"maxRestarts": 0}
    assert js["spec"]["network"] == {"enableDNSHostnames": True, "publishNotReadyAddresses": True}
    # The pod template is the single-node Job's, plus torchrun's variables.
    single = children.job(f, 2, f["spec"], image="reg/runner:1")["spec"]["template"]
    tmpl = copy.deepcopy(job_spec["template"])
    [c] = tmpl["spec"]["containers"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}
    assert env["PET_NNODES"] == "3" and env["PET_MASTER_ADDR"] == "demo-2-node-0-0.demo-2"
    assert env["PET_MASTER_PORT"] == "29500" and env["PET_LOCAL_ADDR"] == "demo-2-node-0-$(PET_NODE_RANK).demo-2"
    assert env["PET_NODE_RANK"] == {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    assert [e["name"] for e in c["env"]].index("PET_LOCAL_ADDR") > [e["name"] for e in c["env"]].index(
        "PET_NODE_RANK")  # $(VAR) expands only variables defined before it
    c["env"] = [e for e in c["env"] if not e["name"].startswith("PET_")]
    assert tmpl == single
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_jobset_names_are_dns_labels_that_leave_room_for_the_pods_hostnames():
    for ftj_name in ("demo", "llama.v2", "7b-run", "x" * 253, "a" * 60 + ".b"):
        name = jobset.name(ftj_name, 12)
        hostname = f"{name}-node-0-63"
        assert len(hostname) <= 63 and hostname[0].isalpha() and all(c.isalnum() or c == "-" for c in hostname)
    assert jobset.name("demo", 3) == "demo-3"
    assert jobset.name("a.b", 1) != jobset.name("a-b", 1)
    assert jobset.attempt_name("llama.v2", 1, {"resources": {"nodes": 2}}) == jobset.name("llama.v2", 1)
    assert jobset.attempt_name("llama.v2", 1, {"resources": {"nodes": 1}}) == "llama.v2-1"


def js_obj(attempt: int = 1, *, completed: bool = False, failed: bool = False, nodes: int = 2) -> dict:
    j = builders.job(attempt)
    conds = []
    if completed:
        conds.append({"type": "Completed", "status": "True", "lastTransitionTime": ts(-1)})
    if failed:
        conds.append({"type": "Failed", "status": "True", "reason": "FailedJobs", "lastTransitionTime": ts(-1),
                      "message": "jobset failed due to one or more job failures"})
    return {"kind": "JobSet", "metadata": {**j["metadata"], "uid": f"js-uid-{attempt}"},
            "spec": {"replicatedJobs": [{"name": "node", "template": {"spec": {"parallelism": nodes,
                                                                                "template": j["spec"]["template"]}}}]},
            "status": {"conditions": conds}}


def node_pod(attempt: int, rank: int, phase: str, **kw) -> dict:
    p = pod(attempt, phase, name=f"demo-{attempt}-node-0-{rank}-abcde", owner_uid="child-job", **kw)
    p["metadata"]["labels"][jobset.LABEL_JOBSET_UID] = f"js-uid-{attempt}"
    p["metadata"]["annotations"] = {jobset.COMPLETION_INDEX: str(rank)}
    return p


def run(f, jobs=(), pods=(), now=T0, **kw):
    return assess(f, list(jobs), list(pods), now=now, options=Options(retry_backoff=10), **kw)


def test_a_jobset_attempt_is_running_only_when_every_node_runs():
    f = ftj(resources={"nodes": 2})
    a = run(f, [js_obj()], [node_pod(1, 0, "Running"), node_pod(1, 1, "Pending", unschedulable=True)])
    assert (a.status["phase"], a.status["reason"]) == ("Pending", "Unschedulable") and not a.actions
    a = run(f, [js_obj()], [node_pod(1, 0, "Running")])  # node 1's pod not made yet
    assert a.status["phase"] == "Pending"
    f["status"] = {"runner": {"pod": "demo-1-node-0-0-abcde", "phase": "Training"}}
    a = run(f, [js_obj()], [node_pod(1, 0, "Running"), node_pod(1, 1, "Running")])
    assert a.status["phase"] == "Training" and "2 nodes" in a.status["message"]
    # node 1 done, node 0 still publishing, the JobSet not Completed yet: still running
    a = run(f, [js_obj()], [node_pod(1, 0, "Running"), node_pod(1, 1, "Succeeded", exit_code=0)])
    assert a.status["phase"] == "Training"


def test_a_completed_jobset_succeeds_with_node0s_result():
    f = ftj(resources={"nodes": 2})
    pods = [node_pod(1, 0, "Succeeded", exit_code=0, message=result(output="s3://models/out")),
            node_pod(1, 1, "Succeeded", exit_code=0)]
    assert run(f, [js_obj()], pods).status["phase"] == "Running"  # not until the JobSet says so
    s = run(f, [js_obj(completed=True)], pods).status
    assert (s["phase"], s["output"]) == ("Succeeded", "s3://models/out")


@pytest.mark.parametrize("node1, reason, counted", [
    ({"exit_code": 1, "message": "Traceback: boom"}, "TrainingFailed", True),  # node 0's failure decides
    ({"exit_code": 137, "reason": "OOMKilled"}, "OutOfMemory", None),  # a permanent one on any node decides
    ({"exit_code": 143, "pod_reason": "Evicted"}, "TrainingFailed", False),  # a disruption is not counted
])
def test_which_nodes_failure_decides(node1, reason, counted):
    f = ftj(resources={"nodes": 2})
    rank0 = node_pod(1, 0, "Failed", exit_code=1, message=result("TrainingFailed", 1, message="peer died"))
    [x] = attempts_of([js_obj(failed=True)], [rank0, node_pod(1, 1, "Failed", **node1)])
    assert x.outcome == "failed" and x.failure.reason == reason
    a = run(f, [js_obj(failed=True)], [rank0, node_pod(1, 1, "Failed", **node1)])
    if counted is None:
        assert (a.status["phase"], a.status["reason"]) == ("Failed", "OutOfMemory")
    else:
        assert a.status["failedAttempts"] == int(counted) and a.status["phase"] == "Pending"
        assert (x.pod is rank0) == counted


def test_the_next_attempt_waits_for_every_pod_of_a_failed_jobset():
    f = ftj(resources={"nodes": 2})
    pods = [node_pod(1, 0, "Failed", exit_code=1, message=result("TrainingFailed", 1)),
            node_pod(1, 1, "Running", deleting=True)]  # the Job controller stops it
    a = run(f, [js_obj(failed=True)], pods, now=T0 + 100)
    assert not [x for x in a.actions if x.kind == "create-attempt"] and "waiting for 1 pod" in a.status["message"]
    a = run(f, [js_obj(failed=True)], pods[:1], now=T0 + 100)
    [create] = [x for x in a.actions if x.kind == "create-attempt"]
    assert (create.name, a.status["jobName"]) == ("demo-2", "demo-2")


def test_suspend_and_ttl_delete_jobsets():
    f = ftj(resources={"nodes": 2}, suspend=True)
    a = run(f, [js_obj()], [node_pod(1, 0, "Running")])
    assert [(x.kind, x.resource, x.name) for x in a.actions] == [("delete-job", "jobsets", "demo-1")]


def test_without_jobset_a_job_on_several_nodes_is_refused_and_one_node_is_not():
    why = jobset.refusal(2)
    a = run(ftj(resources={"nodes": 2}), no_jobsets=why)
    assert (a.status["phase"], a.status["reason"]) == ("Failed", "InvalidSpec") and not a.actions
    assert "install JobSet" in a.status["message"] and jobset.INSTALL in a.status["message"]
    assert [x.kind for x in run(ftj(resources={"nodes": 1}), no_jobsets=why).actions] == ["create-attempt"]


def test_the_policy_keeps_torchruns_variables_to_the_controller():
    spec = builders.spec(env=[{"name": "PET_MASTER_ADDR", "value": "elsewhere"}])
    assert any("PET_MASTER_ADDR is reserved" in r for r in Policy().refusals(spec))


def test_chart_rbac_on_jobsets_follows_jobset_enabled(k8s_binaries):
    from tests.deploy.conftest import by_kind, docs, template

    def render(*sets):
        objs = docs(template(k8s_binaries.helm, *sets).stdout)
        [role] = [r for r in by_kind(objs, "ClusterRole") if r["metadata"]["name"] == "finetune-operator"]
        args = by_kind(objs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
        return [{k: r[k] for k in ("apiGroups", "resources", "verbs")} for r in role["rules"]], args

    rules, args = render()
    assert rbac.JOBSET_RULES[0] in rules and "--no-jobsets" not in args
    rules, args = render("jobset.enabled=false")
    assert rules == [r for r in rbac.RULES if r not in rbac.JOBSET_RULES] and "--no-jobsets" in args


class StubKube:
    def __init__(self, items):
        self.items, self.calls = items, []

    def request(self, method, path, body=None, **kw):
        self.calls.append((method, path, kw.get("query")))
        if path.endswith(f"/apis/{jobset.API_VERSION}"):
            return {"resources": [{"name": jobset.PLURAL}]}
        return {"items": self.items}


def test_jobsets_missing_from_the_watch_cache_are_listed_and_polled():
    """Kopf can miss a JobSet CRD installed while the controller runs (controller/reconciler.py: _jobs)."""
    from controller.reconciler import UNWATCHED_POLL, Reconciler, Snapshot

    js = js_obj()
    del js["kind"]  # as a list's items may come
    kube = StubKube([js])
    r = Reconciler(kube, image="reg/runner:1", clock=lambda: T0)
    f = ftj(resources={"nodes": 2}, status={"attempt": 1, "jobName": "demo-1"})
    jobs, unwatched = r._jobs(Snapshot(f, jobs=[], pods=[]))
    assert unwatched and [j["kind"] for j in jobs] == ["JobSet"]
    assert kube.calls == [("GET", "/apis/jobset.x-k8s.io/v1alpha2/namespaces/ns/jobsets",
                           [("labelSelector", f"finetune.dev/job-uid={builders.UID}")])]
    a = assess(f, jobs, [node_pod(1, 0, "Running"), node_pod(1, 1, "Running")], now=T0)
    assert a.status["phase"] == "Running" and not a.actions  # not taken for a stopped attempt's pods
    # in the cache, or one node, or no attempt yet: nothing listed
    assert r._jobs(Snapshot(f, jobs=[js_obj()]))[1] is False
    assert r._jobs(Snapshot(ftj(resources={"nodes": 2}), jobs=[]))[1] is False
    assert len(kube.calls) == 1 and UNWATCHED_POLL <= 10


# ======================================================================================== cluster
def jobset_crd_doc() -> dict:
    """The pinned release's CRD, checked against its upstream hash, without what 1.20 refuses (module doc)."""
    raw = gzip.decompress(JOBSET_CRD.read_bytes())
    assert hashlib.sha256(raw).hexdigest() == JOBSET_CRD_SHA256, "testdata is not the JobSet release's CRD"
    doc = yaml.load(raw, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert doc["metadata"]["name"] == CRD_NAME and [v["name"] for v in doc["spec"]["versions"]] == [jobset.VERSION]

    def strip(node):
        if isinstance(node, dict):
            out = {k: strip(v) for k, v in node.items()
                   if k != "x-kubernetes-validations" and not (k == "default" and v == "")}
            items = out.get("items") or {}
            for key in out.get("x-kubernetes-list-map-keys") or []:  # a key needs a default or to be required
                if "default" not in items["properties"][key] and key not in items.get("required", []):
                    items["required"] = [*items.get("required", []), key]
            return out
        return [strip(v) for v in node] if isinstance(node, list) else node
    return strip(doc)


def _served(cluster) -> bool:
    code, doc = cluster.request("GET", f"/apis/{jobset.API_VERSION}")
    return code == 200 and any(r.get("name") == jobset.PLURAL for r in doc.get("resources") or [])


def _remove_crd(cluster) -> None:
    cluster.request("DELETE", f"{CRDS}/{CRD_NAME}")
    wait_for(lambda: cluster.request("GET", f"{CRDS}/{CRD_NAME}")[0] == 404 and not _served(cluster), 60,
             what="JobSet CRD removed")


@pytest.fixture(scope="module")
def _jobset_crd_removed_after(k8s_cluster):
    yield
    _remove_crd(k8s_cluster)  # the other tests' cluster has no JobSet


def _install_crd(cluster) -> None:
    if not _served(cluster):
        code, body = cluster.request("POST", CRDS, jobset_crd_doc(), timeout=60)
        assert code in (201, 409), body.get("message")
        wait_for(lambda: _served(cluster), 60, what="JobSet API served")


@pytest.fixture
def jobset_crd(k8s_cluster, _jobset_crd_removed_after):
    _install_crd(k8s_cluster)
    return CRD_NAME


@pytest.fixture
def no_jobset_crd(k8s_cluster):
    if k8s_cluster.request("GET", f"{CRDS}/{CRD_NAME}")[0] == 200:
        _remove_crd(k8s_cluster)


class FakeJobSetController:
    """What the JobSet controller (v0.12) does for a JobSet like ours: the headless Service and the child Job,
    labelled and owned as JobSet does; the JobSet's terminal condition. The Job controller of the test cluster
    makes the pods; the completion index (Indexed Jobs, 1.21+) is annotated here."""

    def __init__(self, kube, ns: str):
        self.kube, self.ns = kube, ns

    def get(self, name: str) -> dict:
        return self.kube.request("GET", ns_path(jobset.API_VERSION, self.ns, jobset.PLURAL, name))

    def wait(self, name: str, timeout: float = 20) -> dict:
        def found():
            try:
                return self.get(name)
            except ApiException as e:
                if e.status == 404:
                    return None
                raise
        return wait_for(found, timeout, what=f"JobSet {name}")

    def start(self, js: dict, fake_kubelet) -> list[dict]:
        """The pods of the JobSet's nodes, node 0 first."""
        name, uid = js["metadata"]["name"], js["metadata"]["uid"]
        owner = {"apiVersion": jobset.API_VERSION, "kind": jobset.KIND, "name": name, "uid": uid,
                 "controller": True, "blockOwnerDeletion": True}
        [rjob] = js["spec"]["replicatedJobs"]
        marks = {jobset.LABEL_JOBSET_NAME: name, jobset.LABEL_JOBSET_UID: uid,
                 "jobset.sigs.k8s.io/replicatedjob-name": rjob["name"], "jobset.sigs.k8s.io/job-index": "0",
                 "jobset.sigs.k8s.io/restart-attempt": "0", "jobset.sigs.k8s.io/replicatedjob-replicas": "1"}
        self.kube.create(ns_path("v1", self.ns, "services"), {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "ownerReferences": [owner]},
            "spec": {"clusterIP": "None", "selector": {jobset.LABEL_JOBSET_NAME: name},
                     "publishNotReadyAddresses": True}})
        spec = copy.deepcopy(rjob["template"]["spec"])
        tmpl = spec["template"]
        tmpl["metadata"]["labels"] = {**tmpl["metadata"].get("labels", {}), **marks}
        tmpl["metadata"]["annotations"] = {**tmpl["metadata"].get("annotations", {}), **marks}
        tmpl["spec"]["subdomain"] = name
        job_name = f"{name}-{rjob['name']}-0"
        self.kube.create(ns_path("batch/v1", self.ns, "jobs"), {
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": job_name, "labels": marks, "annotations": marks, "ownerReferences": [owner]},
            "spec": spec})
        pods = wait_for(lambda: (lambda ps: ps if len(ps) == spec["parallelism"] else None)(
            fake_kubelet.job_pods(self.ns, job_name)), 20, what=f"pods of {job_name}")
        out = []
        for index, p in enumerate(sorted(pods, key=lambda p: p["metadata"]["name"])):
            out.append(self.kube.merge_patch(ns_path("v1", self.ns, "pods", p["metadata"]["name"]), {
                "metadata": {"annotations": {jobset.COMPLETION_INDEX: str(index)}}}))
        return out

    def finish(self, name: str, condition: str, reason: str, message: str) -> None:
        from controller.attempts import format_time
        import time

        self.kube.merge_patch(ns_path(jobset.API_VERSION, self.ns, jobset.PLURAL, name, "status"), {"status": {
            "terminalState": condition, "conditions": [{
                "type": condition, "status": "True", "reason": reason, "message": message,
                "lastTransitionTime": format_time(time.time())}]}})


def runner_result(reason=None, code=0, **fields) -> str:
    return json.dumps(result(reason, code, **fields))


def _env(pod_spec: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod_spec["containers"][0]["env"]}


@pytest.mark.k8s
def test_without_the_jobset_crd_several_nodes_are_refused_at_once(no_jobset_crd, _jobset_crd_removed_after,
                                                                    controller, cluster_api, fake_kubelet, kube,
                                                                    k8s_cluster):
    cluster_api.create_ftj(ftj_doc("multi", resources={"nodes": 2}))
    cluster_api.create_ftj(ftj_doc("single", resources={"nodes": 1}))
    s = cluster_api.wait_phase("multi", "Failed", reason="InvalidSpec")
    assert "install JobSet" in s["message"] and "jobset.x-k8s.io" in s["message"], s["message"]
    assert s.get("attempt") is None and not cluster_api.jobs("multi")
    # one node never needs JobSet
    pod0 = wait_for(lambda: fake_kubelet.job_pods(cluster_api.ns, "single-1"), 20, what="pod of single-1")[0]
    fake_kubelet.succeeded(pod0, message=runner_result(output="s3://models/single"))
    cluster_api.wait_phase("single", "Succeeded")

    # JobSet installed while the controller runs: the next job runs on it, without a restart
    _install_crd(k8s_cluster)
    cluster_api.create_ftj(ftj_doc("later", resources={"nodes": 2}))
    fake = FakeJobSetController(kube, cluster_api.ns)
    for p in fake.start(fake.wait("later-1"), fake_kubelet):
        fake_kubelet.running(p)
    cluster_api.wait_phase("later", "Running")  # the controller watches the new JobSet (and its pods)
    assert cluster_api.status("multi")["phase"] == "Failed"  # a refused job stays refused


@pytest.mark.k8s
def test_a_job_on_two_nodes_runs_as_one_jobset_until_it_completes(jobset_crd, controller, cluster_api, fake_kubelet,
                                                                   kube):
    ns = cluster_api.ns
    cluster_api.create_ftj(ftj_doc("multi", resources={"nodes": 2, "gpus": 4, "memory": "64Gi"},
                                   queueName="gpu-queue"))
    fake = FakeJobSetController(kube, ns)
    js = fake.wait("multi-1")  # accepted by the API server's validation against JobSet's own schema
    s = cluster_api.wait_phase("multi", "Pending")
    assert (s["attempt"], s["jobName"]) == (1, "multi-1") and not cluster_api.jobs("multi")
    md = js["metadata"]
    owner = md["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("FineTuneJob", "multi", True)
    assert md["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert md["annotations"]["finetune.dev/job-name"] == "multi"
    [rjob] = js["spec"]["replicatedJobs"]
    job_spec = rjob["template"]["spec"]
    assert (rjob["name"], rjob["replicas"], job_spec["parallelism"], job_spec["completions"],
            job_spec["completionMode"], job_spec["backoffLimit"]) == ("node", 1, 2, 2, "Indexed", 0)
    assert js["spec"]["failurePolicy"]["maxRestarts"] == 0 and js["spec"]["network"]["enableDNSHostnames"] is True
    pod_spec = job_spec["template"]["spec"]
    container = pod_spec["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "4", "memory": "64Gi"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    env = _env(pod_spec)
    assert (env["PET_NNODES"], env["PET_MASTER_ADDR"], env["PET_MASTER_PORT"]) == (
        "2", "multi-1-node-0-0.multi-1", "29500")
    assert env[names.ENV_JOB_NAME] == "multi" and env[names.ENV_ATTEMPT] == "1"

    pods = fake.start(js, fake_kubelet)
    assert [p["metadata"]["labels"][jobset.LABEL_JOBSET_NAME] for p in pods] == ["multi-1", "multi-1"]
    fake_kubelet.running(pods[0])
    fake_kubelet.unschedulable(pods[1])
    s = cluster_api.wait_phase("multi", "Pending", reason="Unschedulable")
    fake_kubelet.running(pods[1])
    s = cluster_api.wait_phase("multi", "Running")
    assert "2 nodes" in s["message"] and pods[0]["metadata"]["name"] in s["message"]
    fake_kubelet.succeeded(pods[1])
    fake_kubelet.succeeded(pods[0], message=runner_result(output="s3://models/multi", metrics={"train_loss": 0.4}))
    fake.finish("multi-1", "Completed", "AllJobsCompleted", "jobset completed successfully")
    s = cluster_api.wait_phase("multi", "Succeeded")
    assert s["output"] == "s3://models/multi" and s["metrics"] == {"train_loss": 0.4}
    assert sorted(cluster_api.event_reasons("multi", "Succeeded")) == ["Pending", "Running", "Succeeded", "Unschedulable"]

    # Deleting the FineTuneJob removes the JobSet, and through it its Service, Job and pods.
    cluster_api.delete_ftj("multi")

    def gone():
        fake_kubelet.process_deletions(ns)
        left = [p["metadata"]["name"] for p in fake_kubelet.pods(ns)] + [j["metadata"]["name"] for j in
                                                                         cluster_api.jobs()]
        left += [x["metadata"]["name"] for x in cluster_api.list(jobset.API_VERSION, jobset.PLURAL)]
        left += [x["metadata"]["name"] for x in cluster_api.list("v1", "services")]
        return not left
    wait_for(gone, 90, interval=0.5, what="JobSet, Service, Job and pods garbage-collected")


@pytest.mark.k8s
def test_a_failed_jobset_is_retried_as_a_new_attempt(jobset_crd, controller, cluster_api, fake_kubelet, kube):
    ns = cluster_api.ns
    cluster_api.create_ftj(ftj_doc("again", resources={"nodes": 2}, backoffLimit=2))
    fake = FakeJobSetController(kube, ns)
    first = fake.wait("again-1")
    pods = fake.start(first, fake_kubelet)
    for p in pods:
        fake_kubelet.running(p)
    cluster_api.wait_phase("again", "Running")
    # node 1 crashes; node 0's rank 0 then fails retryably (its collective broke), and JobSet fails the whole set
    fake_kubelet.failed(pods[1], exit_code=1, message="Traceback: gloo: Connection closed by peer")
    fake_kubelet.failed(pods[0], exit_code=1, message=runner_result(
        "TrainingFailed", 1, message="RuntimeError: Connection closed by peer", retryable=True))
    fake.finish("again-1", "Failed", "FailedJobs", "jobset failed due to one or more job failures")
    second = fake.wait("again-2", timeout=30)
    s = cluster_api.status("again")
    assert (s["attempt"], s["failedAttempts"], s["jobName"]) == (2, 1, "again-2")
    assert "AttemptFailed" in cluster_api.event_reasons("again", "AttemptFailed")
    key = "finetune.dev/spec"  # the retry runs the same spec (and so resumes from the same checkpoints)
    assert (jobset.pod_template_of(second)["metadata"]["annotations"][key]
            == jobset.pod_template_of(first)["metadata"]["annotations"][key])
    pods = fake.start(second, fake_kubelet)
    for p in pods[::-1]:
        fake_kubelet.succeeded(p, message=runner_result(output="s3://models/again") if p is pods[0] else None)
    fake.finish("again-2", "Completed", "AllJobsCompleted", "jobset completed successfully")
    s = cluster_api.wait_phase("again", "Succeeded")
    assert (s["attempt"], s["failedAttempts"], s["output"]) == (2, 1, "s3://models/again")


def ftj_doc(name: str, **spec) -> dict:
    from tests.controller.conftest import ftj_doc as doc

    return doc(name, **spec)
