"""The measured-throughput table the cost estimate scales from (runner/api/cost.py), built from bench/results.

    python -m bench throughput          # writes bench/results/throughput.json and its runtime copy,
                                        # runner/api/throughput.json (tests/bench/test_throughput.py: they agree)

Each row is one configuration of a committed result file, as the runner runs it (the runner's defaults, and the
memory modes the plan picks under a budget or at long sequences): its GPU kind, model shape, bits, strategy,
processes, memory mode, tokens per micro-batch, the mean causal context of its tokens, LoRA rank and real tokens
per second per GPU. The bench configurations that are not the runner's way (the notebook recipe's fp32 upcast, the
fused-kernels-off reference) are left out. GPU kinds without a measurement (a100, l40s, a10g, l4) get rows derived
from the H100's, scaled by the ratio of dense bf16 peaks, and marked `derived` with that basis: an assumption of
equal utilisation, not a measurement.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
OUT = RESULTS / "throughput.json"
RUNTIME = Path(__file__).resolve().parents[1] / "runner" / "api" / "throughput.json"

# GPU kinds: CUDA's name, the memory CUDA reports (h200: measured in results/h200-llama-3-8b-frontier.json's plan;
# the others: the card's nominal size less the ~1% CUDA keeps), the dense bf16 peak in TFLOPS.
GPUS = {
    "h100": {"name": "NVIDIA H100 80GB HBM3", "memoryBytes": 85_029_158_912, "bf16Tflops": 989.0},
    "h200": {"name": "NVIDIA H200", "memoryBytes": 150_109_880_320, "bf16Tflops": 989.0},
    "a100": {"name": "NVIDIA A100-SXM4-80GB", "memoryBytes": 85_095_874_560, "bf16Tflops": 312.0},
    "l40s": {"name": "NVIDIA L40S", "memoryBytes": 47_697_362_944, "bf16Tflops": 362.0},
    "a10g": {"name": "NVIDIA A10G", "memoryBytes": 23_836_557_312, "bf16Tflops": 125.0},
    "l4": {"name": "NVIDIA L4", "memoryBytes": 23_580_639_232, "bf16Tflops": 121.0},
}
DERIVED_FROM = "h100"
# Model names matched against model.source (lower case) by the controller, which reads no config.
PATTERNS = {"llama-3-8b": r"llama-?3(\.\d+)?-8b", "llama-3-70b": r"llama-?3(\.\d+)?-70b", "llama-2-7b": r"llama-?2-7b"}


def _shape(name: str) -> dict:
    from bench.training import SHAPES

    c = SHAPES[name]
    heads = c["num_attention_heads"]
    return {"layers": c["num_hidden_layers"], "hidden": c["hidden_size"], "intermediate": c["intermediate_size"],
            "heads": heads, "kv_heads": c["num_key_value_heads"], "head_dim": c["hidden_size"] // heads,
            "vocab": c["vocab_size"]}


def _context(flops: float, shape: dict) -> float:
    """The mean context a bench result's modelFlopsPerToken implies (bench/training.py: 4 x matmul params +
    12 x layers x hidden x context)."""
    from runner.api.cost import ModelShape

    s = ModelShape(**shape)
    return round((flops - 4 * s.params) / (12 * s.layers * s.heads * s.head_dim), 1)


def _bench_row(gpu: str, file: str, config: str, model: str) -> dict:
    doc = json.loads((RESULTS / file).read_text())
    c = doc["configs"][config]
    spec, processes = c["config"], doc.get("processes", 1)
    mode = c.get("mode")
    mode = (mode["checkpointing"] + (", host" if mode["offload"] == "host" else "")) if mode else (
        "layer" if c["gradientCheckpointing"] else "none")
    t = spec["training"]
    return {"gpu": gpu, "model": model, "bits": c.get("bits") or 4,
            "strategy": c.get("strategy") or ("data" if processes > 1 else "single"), "processes": processes,
            "mode": mode, "microBatchTokens": t["batchSize"] * spec["dataset"]["maxLength"],
            "context": _context(c["modelFlopsPerToken"], _shape(model)), "loraR": spec["lora"]["r"],
            "tokensPerSecond": round(c["realTokensPerSecond"] / processes, 1), "source": f"{file}: {config}"}


def _frontier_row(file: str, config: str, model: str, context: float) -> dict:
    doc = json.loads((RESULTS / file).read_text())
    r = doc["runner"][config]
    plan = r["plan"]
    mode = ("layer" if plan["gradientCheckpointing"] else "none") + (", host" if plan.get("offload") else "")
    packed = config.startswith("packed")
    return {"gpu": "h200", "model": model, "bits": plan["bits"], "strategy": plan["strategy"],
            "processes": plan["processes"], "mode": mode, "microBatchTokens": plan["microBatchTokens"],
            "context": context if packed else plan["microBatchTokens"] / 2, "loraR": 32,
            "tokensPerSecond": r["last10MedianTokensPerSecond" if packed else "meanTokensPerSecond"],
            "source": f"{file}: {config}"}


def rows() -> list[dict]:
    out = {
        "h100-8b-packed": _bench_row("h100", "h100-llama-3-8b.json", "defaults", "llama-3-8b"),
        "h100-8b-lean": _bench_row("h100", "h100-llama-3-8b.json", "lean", "llama-3-8b"),
        "h200-8b-packed": _bench_row("h200", "h200-llama-3-8b.json", "defaults", "llama-3-8b"),
        "h200-8b-lean": _bench_row("h200", "h200-llama-3-8b.json", "lean", "llama-3-8b"),
        "h200-8b-bits16": _bench_row("h200", "h200-llama-3-8b-bits.json", "lora16", "llama-3-8b"),
        "h200-8b-bits8": _bench_row("h200", "h200-llama-3-8b-bits.json", "lora8", "llama-3-8b"),
        "h200x2-8b-data": _bench_row("h200", "h200x2-llama-3-8b-dp.json", "defaults", "llama-3-8b"),
        "h200x2-8b-fsdp": _bench_row("h200", "h200x2-llama-3-8b-fsdp-vs-dp.json", '{"training":{"strategy":"fsdp"}}',
                                     "llama-3-8b"),
        "h200x2-70b-fsdp": _bench_row("h200", "h200x2-llama-3-70b-fsdp.json", '{"training":{"strategy":"fsdp"}}',
                                      "llama-3-70b"),
    }
    # The frontier's examples are bench/training.py's synthetic ones, as in the defaults row: the same context.
    packed_context = out["h200-8b-packed"]["context"]
    frontier = "h200-llama-3-8b-frontier.json"
    out["h200-8b-packed-10gib"] = _frontier_row(frontier, "packed-10gib", "llama-3-8b", packed_context)
    for n in (16, 32, 64):
        out[f"h200-8b-single-{n}k"] = _frontier_row(frontier, f"single-{n}k", "llama-3-8b", packed_context)
    measured = [{"id": k, **v} for k, v in out.items()]
    derived = []
    for kind, gpu in GPUS.items():
        if any(r["gpu"] == kind for r in measured):
            continue
        ratio = gpu["bf16Tflops"] / GPUS[DERIVED_FROM]["bf16Tflops"]
        for r in measured:
            if r["gpu"] == DERIVED_FROM:
                derived.append({**r, "id": r["id"].replace(DERIVED_FROM, kind, 1), "gpu": kind,
                                "tokensPerSecond": round(r["tokensPerSecond"] * ratio, 1),
                                "derived": f"the {r['id']} row x the dense bf16 peak ratio {gpu['bf16Tflops']:g} / "
                                           f"{GPUS[DERIVED_FROM]['bf16Tflops']:g} TFLOPS (equal utilisation "
                                           "assumed, not measured)"})
    return measured + derived


def table() -> dict:
    from runner.api.cost import ModelShape

    models = {k: {"pattern": PATTERNS[k], "shape": _shape(k)} for k in PATTERNS}
    out = []
    for r in rows():
        s = ModelShape(**models[r["model"]]["shape"])
        r["flopsPerToken"] = round(s.flops_per_token(lora_params=s.lora_params(r["loraR"], ["all-linear"]),
                                                     context=r["context"], recompute=r["mode"] != "none"))
        out.append(r)
    return {"about": "Measured training throughput per GPU kind and shape, the cost estimate's basis "
                     "(runner/api/cost.py). Generated by `python -m bench throughput` from bench/results; do not "
                     "edit. tokensPerSecond: real tokens per second per GPU; flopsPerToken: cost.py's formula.",
            "gpus": GPUS, "models": models, "rows": out}


def text() -> str:
    return json.dumps(table(), indent=1) + "\n"


def main(argv: list[str] | None = None) -> int:
    doc = text()
    for path in (OUT, RUNTIME):
        path.write_text(doc)
        print(f"wrote {path}", file=sys.stderr)
    return 0
