"""manifests/: install.yaml (the chart with its default values; that it is current is test_generated.py's), and
the example FineTuneJobs (one per seed recipe), each valid for the runner and for the CRD on a real API server."""
from __future__ import annotations

import copy

import pytest
import yaml

from runner.api import names
from runner.api.parse import load_job
from tests.deploy.conftest import EXAMPLES, INSTALL, TESTDATA, by_kind, docs

# The seed notebooks' excerpts that name their recipes (copied into the repository: tests/deploy/testdata/).
SEED_EXCERPTS: dict[str, list[str]] = yaml.safe_load((TESTDATA / "seed-recipes.yaml").read_text(encoding="utf-8"))
# Each example and the seed notebook it is the recipe of: (seed file prefix, what the seed names).
EXAMPLE_SEEDS = {
    "polyglot-ko-csv.yaml": ("000_", ["EleutherAI/polyglot-ko-5.8b", "npc_action_tuning_dataset.csv", "### 답변:"]),
    "llama2-jsonl-s3.yaml": ("001_", ["meta-llama/Llama-2-7b-hf", "notes_validation.jsonl", "### Answer:"]),
    "gpt-neox-20b-english-quotes.yaml": ("002_", ["EleutherAI/gpt-neox-20b", "english_quotes", "quote"]),
    "opt-2.7b-piqa-instruction.yaml": ("003_", ["facebook/opt-2.7b", "piqa", "sol1", "sol2", "label"]),
    "llama2-chat-guanaco.yaml": ("004_", ["NousResearch/Llama-2-7b-chat-hf", "mlabonne/guanaco-llama2"]),
}


def example_files():
    return sorted(EXAMPLES.glob("*.yaml"))


def load(path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def test_install_yaml_is_a_namespace_then_the_namespaced_chart():
    objs = docs(INSTALL.read_text())
    assert objs[0]["kind"] == "Namespace"
    namespace = objs[0]["metadata"]["name"]
    assert by_kind(objs, "CustomResourceDefinition")[0]["metadata"]["name"] == names.CRD_NAME
    for obj in objs[1:]:
        if obj["kind"] not in ("CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding",
                               "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"):
            assert obj["metadata"]["namespace"] == namespace, obj["metadata"]


def test_one_commented_example_per_seed_recipe():
    seeds = sorted(SEED_EXCERPTS)
    assert len(seeds) == len(EXAMPLE_SEEDS), seeds
    assert sorted(p.name for p in example_files()) == sorted(EXAMPLE_SEEDS)
    job_names = set()
    for path in example_files():
        prefix, mentions = EXAMPLE_SEEDS[path.name]
        [seed] = [s for s in seeds if s.startswith(prefix)]
        seed_text, text = "\n".join(SEED_EXCERPTS[seed]), path.read_text()
        for m in mentions:
            assert m in seed_text and m in text, f"{path.name} / {seed}: {m!r}"
        assert text.startswith("# Recipe: ") and f"kubectl apply -f manifests/examples/{path.name}" in text
        commented = sum(1 for line in text.splitlines() if "#" in line)
        assert commented >= 10, f"{path.name}: comment the knobs like a recipe ({commented} comment lines)"
        doc = load(path)
        job_names.add(doc["metadata"]["name"])
        assert "namespace" not in doc["metadata"]  # `kubectl apply -n <ns>` decides
    assert len(job_names) == len(EXAMPLE_SEEDS)


@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.name)
def test_example_is_valid_for_the_runner(path):
    job = load_job(path)  # every problem at once, like `python -m runner validate`
    assert job.name == load(path)["metadata"]["name"]


def _missing(sent, got, path="spec") -> list[str]:
    """Paths of `sent` that the API server did not keep as sent (pruned unknown fields, changed values)."""
    if isinstance(sent, dict):
        if not isinstance(got, dict):
            return [path]
        return [m for k, v in sent.items() for m in _missing(v, got.get(k, _MISSING), f"{path}.{k}")]
    if isinstance(sent, list):
        if not isinstance(got, list) or len(got) != len(sent):
            return [path]
        return [m for i, (a, b) in enumerate(zip(sent, got)) for m in _missing(a, b, f"{path}[{i}]")]
    return [] if sent == got else [path]


_MISSING = object()


def dry_run_create(cluster, namespace: str, doc: dict) -> tuple[int, dict]:
    return cluster.request("POST", f"/apis/{names.API_VERSION}/namespaces/{namespace}/{names.PLURAL}?dryRun=All", doc)


def test_examples_are_accepted_by_the_crd_on_a_real_api_server(k8s_cluster, k8s_namespace):
    """Server-side dry run: the API server validates against the CRD schema and applies its defaults. Servers
    without strict field validation drop unknown fields silently, so every field sent must come back as sent."""
    for path in example_files():
        doc = load(path)
        code, body = dry_run_create(k8s_cluster, k8s_namespace, doc)
        assert code == 201, f"{path.name}: HTTP {code}: {body.get('message')}"
        lost = _missing(doc["spec"], body["spec"])
        assert not lost, f"{path.name}: the API server dropped or changed {lost}"
        assert body["spec"]["training"]["seed"] == 42  # the server filled in the defaults
    # the way users apply them
    r = k8s_cluster.kubectl_run("apply", "--dry-run=server", "-n", k8s_namespace, "-f", str(EXAMPLES))
    assert r.stdout.count("created (server dry run)") == len(EXAMPLE_SEEDS), r.stdout

    # and the check can fail: a value out of range is refused, a misspelt field is noticed
    doc = load(example_files()[0])
    bad = copy.deepcopy(doc)
    bad["spec"]["lora"]["r"] = 0
    code, body = dry_run_create(k8s_cluster, k8s_namespace, bad)
    assert code == 422 and "spec.lora.r" in body["message"], body
    typo = copy.deepcopy(doc)
    typo["spec"]["training"]["learningrate"] = 1e-4
    code, body = dry_run_create(k8s_cluster, k8s_namespace, typo)
    assert _missing(typo["spec"], body["spec"]) == ["spec.training.learningrate"]


def test_install_yaml_is_accepted_by_a_real_api_server(k8s_cluster, tmp_path):
    """`kubectl apply -f manifests/install.yaml`, as a server-side dry run (the namespace must exist for that;
    --validate=false: this 1.20 test server's OpenAPI predates the CRD's CEL rules, 1.25+ knows them). The
    PodDisruptionBudget (policy/v1, 1.21+; the chart renders policy/v1beta1 below that) is left out here: the chart
    tests validate it against 1.27+'s schemas."""
    k8s_cluster.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                        "metadata": {"name": "finetune-system"}})
    objs = [o for o in docs(INSTALL.read_text()) if o["kind"] != "PodDisruptionBudget"]
    assert len(objs) == len(docs(INSTALL.read_text())) - 1
    served = tmp_path / "install.yaml"
    served.write_text(yaml.safe_dump_all(objs))
    r = k8s_cluster.kubectl_run("apply", "--dry-run=server", "--validate=false", "-f", str(served))
    kinds = [line.split("/")[0] for line in r.stdout.splitlines()]
    assert len(kinds) == len(objs), r.stdout
    assert "deployment.apps" in kinds and "customresourcedefinition.apiextensions.k8s.io" in kinds
