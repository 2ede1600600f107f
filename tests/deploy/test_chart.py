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
NOT_IN_KUBERNETES = {"CustomResourceDefinition", "ServiceMonitor"}

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
    "webhook": ("webhook.enabled=true",),
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
                       "Deployment", "Secret", "ValidatingWebhookConfiguration"}


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
    ("metrics.serviceMonitor.interval=often", "interval"),
    ("crds.keep=maybe", "keep"),
    ("runner.storeTimeouts=read=soon", "storeTimeouts"),
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
    return [{k: r[k] for k in ("apiGroups", "resources", "verbs")} for r in obj["rules"]]


CLUSTER_SCOPED = ("customresourcedefinitions", "namespaces")


def test_rbac_matches_the_controllers_own_rules(rendered):
    """Cluster mode: exactly `python -m controller rbac`. Namespaced mode: the same rules on namespaced
    resources as Roles in each watched namespace; cluster-wide only read access to CRDs and Namespaces."""
    assert _rules(by_kind(rendered["defaults"], "ClusterRole")[0]) == rbac.RULES
    assert not by_kind(rendered["defaults"], "Role")

    namespaced = [r for r in rbac.RULES if not set(r["resources"]) & set(CLUSTER_SCOPED)]
    discovery = [r for r in rbac.RULES if set(r["resources"]) & set(CLUSTER_SCOPED)]
    objs = rendered["namespaced"]
    roles = by_kind(objs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert _rules(role) == namespaced
    bindings = by_kind(objs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    sa = by_kind(objs, "ServiceAccount")[0]["metadata"]
    for b in bindings + by_kind(objs, "ClusterRoleBinding"):
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}]
    [cluster_role] = [r for r in by_kind(objs, "ClusterRole") if not r["metadata"]["name"].endswith(USER_ROLES)]
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
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    deploy = by_kind(rendered["defaults"], "Deployment")[0]
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"] == {"type": "Recreate"}

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
    assert c["env"] == [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}]
    pod = by_kind(everything, "Deployment")[0]["spec"]["template"]
    assert pod["metadata"]["annotations"] == {"a": "b"} and pod["metadata"]["labels"]["team"] == "ml"
    assert pod["spec"]["nodeSelector"] == {"pool": "system"}
    assert pod["spec"]["imagePullSecrets"] == [{"name": "ctl-pull"}]
    assert pod["spec"]["priorityClassName"] == "system-cluster-critical"
    assert pod["spec"]["serviceAccountName"] == by_kind(everything, "ServiceAccount")[0]["metadata"]["name"]
    assert by_kind(rendered["no-crd-no-service"], "Deployment")[0]["spec"]["template"]["spec"][
        "serviceAccountName"] == "existing"


def test_webhook_is_registered_with_its_own_ca_and_served_by_the_controller(rendered):
    """webhook.enabled: the registration trusts the generated CA, calls the controller's path through a Service
    on the controller's webhook port, and the controller may create SubjectAccessReviews (controller/webhook.py)."""
    import base64

    from controller import webhook

    assert not by_kind(rendered["defaults"], "ValidatingWebhookConfiguration")
    objs = rendered["webhook"]
    [hook] = by_kind(objs, "ValidatingWebhookConfiguration")[0]["webhooks"]
    [secret] = by_kind(objs, "Secret")
    assert hook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
    assert base64.b64decode(secret["data"]["tls.crt"]).startswith(b"-----BEGIN CERTIFICATE-----")
    assert hook["failurePolicy"] == "Fail" and hook["sideEffects"] == "None"
    assert hook["rules"][0]["operations"] == ["CREATE", "UPDATE"]
    svc = next(s for s in by_kind(objs, "Service") if s["metadata"]["name"] == hook["clientConfig"]["service"]["name"])
    assert hook["clientConfig"]["service"]["path"] == webhook.PATH and svc["spec"]["ports"][0]["targetPort"] == "webhook"
    c = _controller(objs)
    assert "--webhook-cert=/etc/finetune-webhook/tls.crt" in c["args"]
    assert {"name": "webhook", "containerPort": 8443, "protocol": "TCP"} in c["ports"]
    role = next(r for r in by_kind(objs, "ClusterRole") if r["metadata"]["name"].endswith("-webhook"))
    assert _rules(role) == rbac.WEBHOOK_RULES


def test_metrics_service_and_service_monitor_select_the_controller(rendered):
    objs = rendered["everything"]
    deploy = by_kind(objs, "Deployment")[0]
    [svc] = by_kind(objs, "Service")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc["spec"]["ports"] == [{"name": "http-metrics", "port": 8080, "targetPort": "http", "protocol": "TCP"}]
    assert svc["metadata"]["annotations"] == {"prometheus.io/scrape": "true"}
    [sm] = by_kind(objs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"] == [{"port": "http-metrics", "path": "/metrics", "interval": "30s",
                                        "scrapeTimeout": "10s"}]
    assert not by_kind(rendered["defaults"], "ServiceMonitor")
    assert not by_kind(rendered["no-crd-no-service"], "Service")
