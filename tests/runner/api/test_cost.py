"""The cost estimate a spec alone allows (runner/api/cost.py): the table's measured row scaled by FLOPs per token,
as its docstring's formula says, for the GPU kind the spec names, and `unknown` where the spec cannot tell."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from runner.api import cost
from runner.api.parse import manifest, parse_job

L, H, KV, I, V = 32, 4096, 1024, 14336, 128256  # Llama-3-8B: layers, hidden, KV width, MLP width, vocabulary


def spec(**over):
    doc = {"model": {"source": "hf://meta-llama/Meta-Llama-3-8B-Instruct"}, "dataset": {"source": "/d.jsonl"},
           "lora": {"r": 32, "alpha": 64}, "training": {"maxSteps": 30}, "output": {"destination": "/out"}}
    for key, value in over.items():
        doc[key] = {**doc.get(key, {}), **value}
    return parse_job(manifest("j", doc)).spec


def row(row_id: str) -> dict:
    return next(r for r in json.loads(cost.TABLE.read_text())["rows"] if r["id"] == row_id)


def flops(context: float, *, r: int = 32, recompute: bool = False) -> float:
    """The docstring's F, written out for Llama-3-8B with LoRA on all 7 projections."""
    base = L * (2 * H * H + 2 * H * KV + 3 * H * I) + H * V
    lora = L * r * ((H + H) * 2 + (H + KV) * 2 + (H + I) * 3)
    c = 1 if recompute else 0
    return (4 + 2 * c) * base + (6 + 2 * c) * lora + (3 + c) * 4 * L * H * context


def test_the_8b_estimate_is_the_h100_row_scaled_by_flops_per_token():
    e = cost.from_spec(spec(), "h100")
    r = row("h100-8b-packed")
    tokens = 30 * 4 * 2048  # maxSteps x batchSize x maxLength: packed rows are full
    per_second = r["tokensPerSecond"] * flops(r["context"]) / flops(2048 / 2)
    assert (e.row, e.steps, e.tokens) == ("h100-8b-packed", 30, tokens)
    assert e.flops_per_token == round(flops(1024))
    assert e.seconds == pytest.approx(tokens / per_second, abs=0.06)
    assert e.gpu_hours == pytest.approx(tokens / per_second / 3600, abs=1e-3)
    assert e.summary == f"{tokens / per_second:.0f}s, {tokens / per_second / 3600:.2g} h100-hours"
    assert "params x1.00" in e.distance and "tokens per micro-batch x1.00" in e.distance
    assert r["flopsPerToken"] == round(flops(r["context"]))  # the table's own figure: the same formula


def test_two_gpus_halve_the_time_and_keep_the_gpu_hours():
    one, two = cost.from_spec(spec(), "h200"), cost.from_spec(spec(resources={"gpus": 2}, training={"maxSteps": 15}),
                                                               "h200")
    assert two.tokens == one.tokens and two.gpus == 2
    assert two.seconds < one.seconds and two.gpu_hours == pytest.approx(2 * two.seconds / 3600, abs=1e-3)


@pytest.mark.parametrize("labels, kind", [
    ({"nvidia.com/gpu.product": "NVIDIA-H200"}, "h200"),
    ({"cloud.google.com/gke-accelerator": "nvidia-l4"}, "l4"),
    ({"cloud.google.com/gke-accelerator": "nvidia-l40s"}, "l40s"),
    ({"cloud.google.com/gke-accelerator": "nvidia-a100-80gb"}, "a100"),
    ({"kubernetes.io/hostname": "h200-node"}, None),
])
def test_the_gpu_kind_comes_from_the_node_selector(labels, kind):
    s = spec(nodeSelector=labels)
    assert cost.gpu_of(s) == kind
    e = cost.from_spec(s)
    assert e.gpu == (kind or cost.DEFAULT_GPU)
    assert ("nodeSelector" in e.gpu_source) and (("assumed" in e.gpu_source) == (kind is None))


def test_a_kind_not_measured_uses_a_row_marked_derived_with_its_basis():
    e = cost.from_spec(spec(), "a100")
    assert e.row.startswith("a100-") and "derived" in e.row_source and "312 / 989" in e.row_source
    assert e.seconds > cost.from_spec(spec(), "h100").seconds * 3


def test_what_a_spec_cannot_tell_is_unknown():
    by_epochs = cost.from_spec(spec(training={"maxSteps": None, "epochs": 2}))
    assert by_epochs.summary == "unknown" and "runner preview" in by_epochs.why and by_epochs.seconds is None
    assert by_epochs.flops_per_token  # the shape is still known
    other = cost.from_spec(spec(model={"source": "s3://models/my-model"}))
    assert other.summary == "unknown" and "model shape" in other.why and other.row is None


def test_a_long_model_source_is_looked_at_to_its_first_characters_only():
    assert cost.from_spec(spec(model={"source": "/models/llama-3-8b"})).summary != "unknown"
    e = cost.from_spec(spec(model={"source": "/models/" + "a" * 600 + "/llama-3-8b"}))
    assert e.summary == "unknown"  # the spec is untrusted: the name is read to its first 512 characters


def test_a_model_far_from_every_measured_size_is_not_scaled_by_flops():
    small = cost.ModelShape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, vocab=1024)
    far = cost.estimate(replace(cost.spec_job(spec(), "h100"), shape=small,
                                lora_params=small.lora_params(8, ["q_proj"])))
    assert far.summary == "unknown" and "no measured row near this model's size" in far.why and far.seconds is None
    qwen_1b = cost.ModelShape(layers=28, hidden=1536, intermediate=8960, heads=12, kv_heads=2, head_dim=128,
                              vocab=151936)
    rough = cost.estimate(replace(cost.spec_job(spec(), "h100"), shape=qwen_1b))
    assert rough.seconds and any("rough figure" in n for n in rough.notes)
    assert not any("rough" in n for n in cost.from_spec(spec(), "h100").notes)
