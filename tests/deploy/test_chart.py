"""The Helm chart (charts/finetune-operator): lint, strict values, self-documenting values, and rendered output
validated against the Kubernetes schemas of every supported version (1.27 to the newest kubernetes-validate has).
The chart installed into a real API server is tested in test_install.py."""
from __future__ import annotations

import json
import re

import kubernetes_validate
import pytest
import yaml
from packaging.version import Version

from controller import crd, generate, rbac
from tests.deploy.conftest import CHART, CHART_CRD, CRD_FILE, by_kind, docs, helm, set_args, template

OLDEST_SUPPORTED = Version("1.27")
VERSIONS = [v for v in kubernetes_validate.utils.all_versions() if Version(v) >= OLDEST_SUPPORTED]
# Kinds whose schema is not Kubernetes' own: the CRD is checked by a real API server (test_install.py) and
# against controller/crd.py below; ServiceMonitor belongs to the Prometheus Operator.
NOT_IN_KUBERNETES = {"CustomResourceDefinition", "ServiceMonitor", "Issuer", "Certificate"}  # (cert-manager's)

# Value sets that together render every template and every branch of them.
VALUE_SETS = {
    "defaults": (),
    "namespaced": ("watchNamespaces={team-a,team-b}", "runner.gpuResourceName=amd.com/gpu",
                   "runner.imagePullSecrets={regcred}", "controller.verbose=true",
                   "controller.extraArgs={--retry-backoff=5}"),
    "everything": ("metrics.serviceMonitor.enabled=true", "metrics.serviceMonitor.labels.release=prom",
                   "--set-string=metrics.service.annotations.prometheus\\.io/scrape=true",
                   "imagePullSecrets={ctl-pull}",
                   "nodeSelector.pool=system", "tolerations[0].key=dedicated", "tolerations[0].operator=Exists",
                   "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0]"
                   ".matchExpressions[0].key=pool",
                   "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0]"
                   ".matchExpressions[0].operator=Exists",
                   "priorityClassName=system-cluster-critical", "podAnnotations.a=b", "podLabels.team=ml",
                   "serviceAccount.annotations.iam=role", "controller.extraEnv[0].name=HTTPS_PROXY",
                   "controller.extraEnv[0].value=http://proxy:3128", "crds.keep=false",
                   "image.tag=1.2.3", "runner.image.tag=1.2.3"),
    "webhook": ("webhook.certificate=cert-manager",),
    "no-webhook-one-replica": ("webhook.enabled=false", "replicaCount=1", "leaderElection.enabled=false"),
    "no-crd-no-service": ("crds.install=false", "metrics.service.enabled=false", "rbac.create=false",
                          "serviceAccount.create=false", "serviceAccount.name=existing"),
}


@pytest.fixture(scope="module")
def rendered(helm_bin) -> dict[str, list[dict]]:
    # rendered for the clusters the manifests are validated against (1.27+); older ones: test_cel_rules_...
    return {name: docs(template(helm_bin, f"--kube-version={generate.INSTALL_KUBE_VERSION}", *sets).stdout)
            for name, sets in VALUE_SETS.items()}


def test_helm_lint_is_clean(helm_bin):
    for sets in VALUE_SETS.values():
        out = helm(helm_bin, "lint", str(CHART), "--strict", *set_args(sets)).stdout
        assert "0 chart(s) failed" in out and "[WARNING]" not in out and "[ERROR]" not in out, out


def test_rendered_manifests_are_valid_for_every_supported_kubernetes(rendered):
    assert VERSIONS[0] == "1.27.0" and len(VERSIONS) >= 5, VERSIONS
    checked, seen = set(), set()
    for name, objs in rendered.items():
        for obj in objs:
            key = json.dumps(obj, sort_keys=True)
            if obj["kind"] in NOT_IN_KUBERNETES or key in seen:
                continue
            seen.add(key)
            for version in VERSIONS:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    raise AssertionError(f"[{name}] {obj['kind']}/{obj['metadata']['name']} is invalid for "
                                         f"Kubernetes {version}: {e.caught}") from None
            checked.add(obj["kind"])
    assert checked == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Service",
                       "Deployment", "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration",
                       "PodDisruptionBudget"}


def test_chart_declares_the_kubernetes_versions_it_installs_on(helm_bin):
    """Chart.yaml kubeVersion: helm itself refuses an older cluster (1.20.2 is the oldest run, by tests/e2e)."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == ">=1.20.0-0"
    assert template(helm_bin, "--kube-version=1.20.2").returncode == 0
    assert template(helm_bin, "--kube-version=1.33.0").returncode == 0
    old = template(helm_bin, "--kube-version=1.19.9", check=False)
    assert old.returncode != 0 and "chart requires kubeVersion: >=1.20.0-0" in old.stderr, old.stderr


def test_strict_validation_catches_a_typo_in_a_free_form_value(helm_bin):
    """podSecurityContext/securityContext are Kubernetes objects: a misspelt field fails schema validation."""
    objs = docs(template(helm_bin, "securityContext.readOnlyRootFileSystem=true").stdout)
    deploy = by_kind(objs, "Deployment")[0]
    with pytest.raises(kubernetes_validate.ValidationError, match="readOnlyRootFileSystem"):
        kubernetes_validate.validate(deploy, VERSIONS[-1], strict=True)


@pytest.mark.parametrize("bad, complaint", [
    ("imageTag=1.0", "imageTag"),                                   # unknown top-level key
    ("controller.wokers=4", "wokers"),                              # unknown nested key
    ("controller.workers=many", "workers"),                         # wrong type
    ("controller.workers=0", "workers"),                            # out of range
    ("image.pullPolicy=Sometimes", "pullPolicy"),                   # not one of the allowed values
    ("watchNamespaces={Team_A}", "watchNamespaces"),                # not a namespace name
    ("runner.gpuResourceName=nvidia gpu", "gpuResourceName"),       # not a resource name
    ("runner.gpuResourceName=memory", "gpuResourceName"),           # a built-in resource: pods would ask 1 byte
    ("runner.gpuResourceName=cpu", "gpuResourceName"),
    ("runner.gpuResourceName=kubernetes.io/gpu", "gpuResourceName"),  # Kubernetes' own domain
    ("runner.storeTimeouts=read=soon", "storeTimeouts"),
    ("metrics.serviceMonitor.interval=often", "interval"),
    ("crds.keep=maybe", "keep"),
    ("metrics.service.annotations.scrape=true", "scrape"),          # annotation values are strings
    ("resources.requests.gpu=1", None),                             # accepted: any resource name is allowed
])
def test_values_schema_rejects_unknown_and_mistyped_values(helm_bin, bad, complaint):
    p = template(helm_bin, bad, check=False)
    if complaint is None:
        assert p.returncode == 0, p.stderr
        return
    assert p.returncode != 0 and "values don't meet the specifications of the schema" in p.stderr, p.stderr
    assert complaint in p.stderr, p.stderr


def test_template_guards_explain_what_to_set(helm_bin):
    p = template(helm_bin, "crds.install=false", "runner.gpuResourceName=amd.com/gpu", check=False)
    assert p.returncode != 0 and "need crds.install=true" in p.stderr
    p = template(helm_bin, "serviceAccount.create=false", check=False)
    assert p.returncode != 0 and "serviceAccount.name" in p.stderr
    p = template(helm_bin, "metrics.serviceMonitor.enabled=true", "metrics.service.enabled=false", check=False)
    assert p.returncode != 0 and "metrics.service.enabled" in p.stderr


def _values_keys(node: dict, schema: dict, path: str = ""):
    """(path, schema) of every key of values.yaml that the schema structures (free-form objects are leaves)."""
    for key, value in node.items():
        sub = schema.get("properties", {}).get(key)
        assert sub is not None, f"values.yaml key {path}{key} is not in values.schema.json"
        yield f"{path}{key}", sub
        if isinstance(value, dict) and sub.get("properties"):
            yield from _values_keys(value, sub, f"{path}{key}.")


def test_every_value_is_documented_in_values_yaml_and_the_schema():
    values_text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(values_text)
    schema = json.loads((CHART / "values.schema.json").read_text())

    keys = dict(_values_keys(values, schema))
    # the schema knows no key that values.yaml leaves out (each is documented where users look)
    def schema_paths(s: dict, path: str = ""):
        for k, sub in s.get("properties", {}).items():
            if path == "" and k == "global":
                continue
            yield f"{path}{k}"
            yield from schema_paths(sub, f"{path}{k}.")
    assert set(schema_paths(schema)) == set(keys), set(schema_paths(schema)) ^ set(keys)

    def closed(s: dict, path: str) -> None:  # every structured object rejects unknown keys
        if s.get("properties"):
            assert s.get("additionalProperties") is False, f"{path or 'values'}: unknown keys are not rejected"
            for k, sub in s["properties"].items():
                closed(sub, f"{path}.{k}" if path else k)
    closed(schema, "")
    for path, sub in keys.items():
        assert sub.get("description"), f"values.schema.json: {path} has no description"

    # values.yaml: a comment line right above every key it structures
    lines = values_text.splitlines()
    stack: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z][\w]*):", line)
        if not m:
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [key])
        stack.append((indent, key))
        if path not in keys:
            continue  # inside a free-form Kubernetes object (e.g. securityContext): documented by its parent
        above = lines[i - 1].strip() if i else ""
        assert above.startswith("#"), f"values.yaml: `{path}` has no comment above it"


def test_crd_is_the_generated_one_with_this_releases_runner_defaults(rendered):
    assert CHART_CRD.read_text() == CRD_FILE.read_text(), (
        f"{CHART_CRD.relative_to(CHART.parents[1])} differs from {CRD_FILE.relative_to(CHART.parents[1])}; "
        f"copy it: cp {CRD_FILE.relative_to(CHART.parents[1])} {CHART_CRD.relative_to(CHART.parents[1])}")
    expected = crd.crd()
    default = by_kind(rendered["defaults"], "CustomResourceDefinition")[0]
    assert default["spec"] == expected["spec"]  # numbers and strings survive the chart's YAML round trip
    assert default["metadata"]["name"] == expected["metadata"]["name"]
    assert default["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert not by_kind(rendered["no-crd-no-service"], "CustomResourceDefinition")
    assert "annotations" not in by_kind(rendered["everything"], "CustomResourceDefinition")[0]["metadata"]

    spec = by_kind(rendered["namespaced"], "CustomResourceDefinition")[0]["spec"]["versions"][0]["schema"][
        "openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert spec["resources"]["properties"]["gpuResourceName"]["default"] == "amd.com/gpu"
    assert spec["imagePullSecrets"]["default"] == ["regcred"]


@pytest.mark.parametrize("version, cel", [("1.20.2", False), ("1.24.9", False), ("1.25.0", True), ("1.31.0", True)])
def test_cel_rules_only_where_the_api_server_knows_them(helm_bin, version, cel):
    """Before 1.25 an API server refuses `x-kubernetes-validations` (helm's OpenAPI check: unknown field), so the
    chart leaves the CEL rules out there and installs on every version its kubeVersion admits."""
    objs = docs(template(helm_bin, f"--kube-version={version}").stdout)
    spec = by_kind(objs, "CustomResourceDefinition")[0]["spec"]
    assert spec == crd.crd(cel=cel)["spec"]
    assert ("x-kubernetes-validations" in json.dumps(spec)) is cel


def _rules(obj: dict) -> list[dict]:
    return [{k: r[k] for k in ("apiGroups", "resources", "resourceNames", "verbs") if k in r} for r in obj["rules"]]


CLUSTER_SCOPED = ("customresourcedefinitions", "namespaces")


def test_rbac_matches_the_controllers_own_rules(rendered):
    """Cluster mode: exactly `python -m controller rbac`. Namespaced mode: the same rules on namespaced
    resources as Roles in each watched namespace; cluster-wide only read access to CRDs and Namespaces."""
    assert _rules(by_kind(rendered["defaults"], "ClusterRole")[0]) == rbac.RULES
    assert not [r for r in by_kind(rendered["defaults"], "Role") if not r["metadata"]["name"].endswith("-self")]

    namespaced = [r for r in rbac.RULES if not set(r["resources"]) & set(CLUSTER_SCOPED)]
    discovery = [r for r in rbac.RULES if set(r["resources"]) & set(CLUSTER_SCOPED)]
    objs = rendered["namespaced"]
    roles = [r for r in by_kind(objs, "Role") if not r["metadata"]["name"].endswith("-self")]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert _rules(role) == namespaced
    bindings = [b for b in by_kind(objs, "RoleBinding") if not b["metadata"]["name"].endswith("-self")]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    sa = by_kind(objs, "ServiceAccount")[0]["metadata"]
    for b in bindings + by_kind(objs, "ClusterRoleBinding"):
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}]
    [cluster_role] = [r for r in by_kind(objs, "ClusterRole") if not r["metadata"]["name"].endswith(
        (*USER_ROLES, "-webhook"))]
    assert _rules(cluster_role) == discovery
    assert all(set(r["verbs"]) <= {"get", "list", "watch"} for r in cluster_role["rules"])
    assert not by_kind(rendered["no-crd-no-service"], "ClusterRole")


USER_ROLES = ("-editor", "-viewer")


def test_users_get_finetunejobs_and_nothing_else(rendered):
    """The editor and viewer ClusterRoles (README "Security"): exactly controller/rbac.py's user rules,
    aggregated into Kubernetes' own admin/edit and view roles."""
    roles = {r["metadata"]["name"].rsplit("-", 1)[-1]: r for r in by_kind(rendered["defaults"], "ClusterRole")
             if r["metadata"]["name"].endswith(USER_ROLES)}
    assert _rules(roles["editor"]) == rbac.EDITOR_RULES and _rules(roles["viewer"]) == rbac.VIEWER_RULES
    assert roles["editor"]["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert roles["viewer"]["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"


def _controller(objs: list[dict]) -> dict:
    return by_kind(objs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]


def test_deployment_flags_probes_and_security(rendered):
    c = _controller(rendered["defaults"])
    assert c["image"] == "finetune-controller:0.1.0"
    assert c["args"][:7] == ["run", "--http-port=8080", "--http-host=0.0.0.0", "--image=finetune-runner:0.1.0",
                             "--workers=8", "--retry-backoff=10", "--image-pull-timeout=300"]
    # the admin policy (values `policy`): the secure defaults of controller/policy.py
    from controller.policy import Policy

    assert c["args"][7:8] == [f"--policy={Policy().describe().replace(' ', '')}"]
    # the admin's additions to runner pods (values runner.podTemplate, runner.modelCache): none by default; and the
    # default resources of runner pods whose job sets none (runner.defaultResources)
    from controller.podtemplate import DefaultResources, RunnerPod

    assert c["args"][8].startswith("--runner-pod=")
    runner_pod = RunnerPod.from_text(c["args"][8].split("=", 1)[1])
    assert runner_pod == RunnerPod(default_resources=DefaultResources.model_validate(
        {"requests": {"cpu": "500m", "memory": "4Gi"}, "limits": {"memory": "32Gi"}}),
        store_timeouts="connect=10,read=30,stall=90,deadline=10800")  # a frozen store ends the attempt in minutes
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 8080}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8080}
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                          {"name": "webhook", "containerPort": 8443, "protocol": "TCP"}]
    deploy = by_kind(rendered["defaults"], "Deployment")[0]
    # two replicas, one leader (controller/leader.py), a new pod up before an old one goes
    assert deploy["spec"]["replicas"] == 2 and deploy["spec"]["strategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    assert c["args"][c["args"].index("--leader-elect"):][:5] == [
        "--leader-elect", "--lease-name=finetune-operator-leader", "--lease-duration=15",
        "--renew-deadline=10", "--retry-period=2"]
    [pdb] = by_kind(rendered["defaults"], "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1 and pdb["spec"]["selector"]["matchLabels"].items() <= \
        deploy["spec"]["template"]["metadata"]["labels"].items()
    [role] = [r for r in by_kind(rendered["defaults"], "Role") if r["metadata"]["name"].endswith("-self")]
    assert _rules(role) == rbac.self_rules("finetune-operator-leader",
                                           "finetune-operator-webhook-state")
    one = rendered["no-webhook-one-replica"]
    assert not by_kind(one, "PodDisruptionBudget") and "--leader-elect" not in _controller(one)["args"]
    # with the webhook off, Secret references it did not check are still refused by default
    assert "--unattributed-secrets=refuse" in _controller(one)["args"]

    # the Pod Security Standard "restricted" (manifests/install.yaml's namespace enforces it)
    pod = deploy["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert all(set(v) <= {"name", "emptyDir", "configMap", "secret", "projected", "downwardAPI"}
               for v in pod["volumes"])

    c = _controller(rendered["namespaced"])
    assert c["args"][-4:] == ["--namespace=team-a", "--namespace=team-b", "--verbose", "--retry-backoff=5"]
    everything = rendered["everything"]
    c = _controller(everything)
    assert c["image"] == "finetune-controller:1.2.3" and "--image=finetune-runner:1.2.3" in c["args"]
    assert c["env"][2:] == [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}]
    assert c["env"][1] == {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    assert c["env"][0] == {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}
    pod = by_kind(everything, "Deployment")[0]["spec"]["template"]
    assert pod["metadata"]["annotations"] == {"a": "b"} and pod["metadata"]["labels"]["team"] == "ml"
    assert pod["spec"]["nodeSelector"] == {"pool": "system"}
    assert pod["spec"]["imagePullSecrets"] == [{"name": "ctl-pull"}]
    assert pod["spec"]["priorityClassName"] == "system-cluster-critical"
    assert pod["spec"]["serviceAccountName"] == by_kind(everything, "ServiceAccount")[0]["metadata"]["name"]
    assert by_kind(rendered["no-crd-no-service"], "Deployment")[0]["spec"]["template"]["spec"][
        "serviceAccountName"] == "existing"


def test_webhook_is_on_by_default_with_the_controllers_own_certificate(rendered):
    """By default both halves of the webhook are registered, failing closed, calling the controller's paths through
    a Service on its webhook port; the controller makes and rotates the certificate itself (no Secret in the chart,
    no caBundle: the controller writes it, and helm's three-way merge keeps it), may create SubjectAccessReviews and
    write these two registrations only. With webhook.certificate=cert-manager: an Issuer, a Certificate, the CA
    injected by cert-manager and the certificate mounted."""
    from controller import webhook

    objs = rendered["defaults"]
    [hook] = by_kind(objs, "ValidatingWebhookConfiguration")[0]["webhooks"]
    [mutating] = by_kind(objs, "MutatingWebhookConfiguration")[0]["webhooks"]
    assert not by_kind(objs, "Secret") and "caBundle" not in hook["clientConfig"]
    for h, path in ((hook, webhook.PATH), (mutating, webhook.ATTRIBUTE_PATH)):
        assert h["failurePolicy"] == "Fail" and h["sideEffects"] == "None"
        assert h["rules"][0]["operations"] == ["CREATE", "UPDATE"] and h["clientConfig"]["service"]["path"] == path
    svc = next(s for s in by_kind(objs, "Service") if s["metadata"]["name"] == hook["clientConfig"]["service"]["name"])
    assert svc["spec"]["ports"][0]["targetPort"] == 8443
    c = _controller(objs)
    name = "finetune-operator"  # the release (tests/deploy/conftest.py)
    assert {"--state-secret=" + name + "-webhook-state", f"--webhook-service={name}-webhook",
            f"--webhook-registration=validating/{name}", f"--webhook-registration=mutating/{name}",
            "--unattributed-secrets=refuse", "--webhook-port=8443"} <= set(c["args"])
    role = next(r for r in by_kind(objs, "ClusterRole") if r["metadata"]["name"].endswith("-webhook"))
    assert _rules(role) == rbac.WEBHOOK_RULES + rbac.registration_rules(name)

    objs = rendered["webhook"]
    c = _controller(objs)
    assert "--webhook-cert=/etc/finetune-webhook/tls.crt" in c["args"] and not [
        a for a in c["args"] if a.startswith("--webhook-service")]
    [cert] = by_kind(objs, "Certificate")
    assert cert["spec"]["dnsNames"][-1] == f"{name}-webhook.finetune-system.svc"
    for kind in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"):
        assert by_kind(objs, kind)[0]["metadata"]["annotations"] == {
            "cert-manager.io/inject-ca-from": f"finetune-system/{name}-webhook"}


def test_metrics_service_and_service_monitor_select_the_controller(rendered):
    objs = rendered["everything"]
    deploy = by_kind(objs, "Deployment")[0]
    [svc] = [s for s in by_kind(objs, "Service") if s["metadata"]["name"].endswith("-metrics")]
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc["spec"]["ports"] == [{"name": "http-metrics", "port": 8080, "targetPort": 8080, "protocol": "TCP"}]
    assert svc["metadata"]["annotations"] == {"prometheus.io/scrape": "true"}
    [sm] = by_kind(objs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"] == [{"port": "http-metrics", "path": "/metrics", "interval": "30s",
                                        "scrapeTimeout": "10s"}]
    assert not by_kind(rendered["defaults"], "ServiceMonitor")
    assert not [s for s in by_kind(rendered["no-crd-no-service"], "Service") if s["metadata"]["name"].endswith("-metrics")]
