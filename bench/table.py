"""`python -m bench table [--check]`: bench/README.md's runner-vs-Unsloth tables, regenerated from the committed
result files of `python -m bench frontier` (RESULTS), between its markers."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (result file, the line above its table)
RESULTS = [
    ("bench/results/h100-llama-3-8b-frontier-packed-syncs.json", "The packed rows after the training step stopped "
     "reading values back from the GPU (`runner/train/host_syncs.py`), one call, both frameworks, one H100 "
     "(`LENGTHS= FRONTIER_ARGS='--only packed,packed-10gib' bash bench/gpu/frontier.sh`):"),
    ("bench/results/h100-llama-3-8b-frontier-kept.json", "Single sequences with kept attention "
     "(`runner/model/kept_attention.py`), the runner alone in one call on one H100, against Unsloth's rows of the "
     "packed and 16k-128k calls below (same GPU kind and model, other machines); 64k also with its attention recomputed, same "
     "call. The 128k row ran without kept attention: after the shorter rows, the process's pinned-memory cache held "
     "their host memory and the plan found too little left beside 128k's inputs:"),
    ("bench/results/h100-llama-3-8b-frontier.json", "The packed rows, one call, both frameworks, one H100 "
     "(`LENGTHS= bash bench/gpu/frontier.sh`; fused LoRA projections, and compiled layers as measured before their "
     "memory fix: results/h100-llama-3-8b-frontier-compiled.json has the fixed row):"),
    ("bench/results/h100-llama-3-8b-frontier-long.json", "Single sequences of 16k-128k tokens, one call, both "
     "frameworks, one H100 (`LENGTHS=16384,32768,65536,131072 FRONTIER_ARGS=--skip-packed bash bench/gpu/frontier.sh`; "
     "2 steps per length, the second timed; the runner under a memory budget of Unsloth's peak):"),
    ("bench/results/h200-llama-3-8b-frontier.json", "One call, both frameworks, one H200 (`bash bench/gpu/frontier.sh`, "
     "lengths 16k-64k, 2 steps per length of which the second is timed):"),
    ("bench/results/h200-llama-3-8b-frontier-cudnn.json", "Then single sequences on cuDNN's attention kernel "
     "(runner/model/attention.py), the runner alone in a second call, against the Unsloth rows above:"),
]
README = ROOT / "bench" / "README.md"
START, END = "<!-- frontier-table:start -->", "<!-- frontier-table:end -->"


def _mode(plan: dict | None) -> str:
    if not plan:
        return ""
    if "mode" in plan:  # {"checkpointing": none|layer|split|tiled, "offload": gpu|host}
        checkpointing, offload = plan["mode"]["checkpointing"], plan["mode"]["offload"]
    else:  # results written before the plan held a mode: gradientCheckpointing, and offload None|layer|split|tiled
        checkpointing = plan.get("offload") or ("layer" if plan.get("gradientCheckpointing") else "none")
        offload = "host" if plan.get("offload") else "gpu"
    on_gpu = plan.get("gpuLayers", 0)  # offloaded, the last layers' inputs kept on the GPU
    mode = {"none": "no checkpointing"}.get(checkpointing, "checkpointing") if offload == "gpu" else (
        f"offloaded checkpointing ({checkpointing}" + (f", {on_gpu} layers' inputs on the GPU" if on_gpu else "") + ")")
    return f"{mode}, {plan['microBatch']}x{plan['microBatchTokens'] // plan['microBatch']}" + (
        f" x{plan['accumulation']}" if plan.get("accumulation", 1) > 1 else "")


def _tps(row: dict) -> str:
    if not row:
        return "not run"
    if "error" in row:
        return "OOM" if "out of memory" in row["error"] else "failed"
    v = row.get("last10MedianTokensPerSecond")
    return f"{v:,.0f}" if v else ""


def _gib(row: dict) -> str:
    v = (row or {}).get("peakAllocatedGiB")
    return f"{v:.1f}" if v is not None else ""


def table(result: dict) -> str:
    lines = ["| workload | runner tokens/s | runner peak GiB | runner plan | Unsloth tokens/s | Unsloth peak GiB "
             "| speed | memory |", "|---|---|---|---|---|---|---|---|"]
    for name, (ours, theirs) in result.get("pairs", {}).items():
        a, b = result["runner"].get(ours, {}), result["unsloth"].get(theirs, {})
        r = result.get("ratios", {}).get(name, {})
        speed = f"{r['speed']:.2f}x" if r.get("speed") else ""
        memory = f"{r['memory']:.2f}x" if r.get("memory") else ""
        lines.append(f"| {name} | {_tps(a)} | {_gib(a)} | {_mode(a.get('plan'))} | {_tps(b)} | {_gib(b)} "
                     f"| {speed} | {memory} |")
    lean = result["runner"].get("lean-profiled", {})
    if lean.get("gpuBusyFraction") is not None:
        lines.append("")
        lines.append(f"Lean row (1x2048 x2, checkpointing, paged 8-bit AdamW): {_tps(lean)} tokens/s, GPU busy "
                     f"{lean['gpuBusyFraction']:.0%} of the profiled steps, {lean['kernelsPerStep']:,} kernels "
                     "per step.")
    for key in ("lossCheck", "lossCheckFusedLora", "lossCheckCompiled"):
        check = result.get(key)
        if check:
            lines.append("")
            lines.append(f"Loss, {check['fast']} against {check['reference']} (same data and initial LoRA weights), "
                         f"{check['steps']} steps: max relative difference {check['maxRelativeDifference']:.1e} "
                         f"(tolerance {check['tolerance']}).")
    return "\n".join(lines) + "\n"


def render(readme: str, results: list[tuple[str, str, dict]]) -> str:
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    files = ", ".join(f for f, _, _ in results)
    body = "\n".join(f"{line}\n\n{table(result)}" for _, line, result in results)
    note = f"<!-- Generated from {files} by `python -m bench table`; do not edit by hand. -->\n"
    return f"{head}{START}\n{note}{body}{END}{tail}"


def main(argv: list[str]) -> int:
    text = README.read_text(encoding="utf-8")
    new = render(text, [(f, line, json.loads((ROOT / f).read_text())) for f, line in RESULTS if (ROOT / f).exists()])
    if "--check" in argv:
        if new != text:
            print("bench/README.md: the frontier table is stale: run python -m bench table", file=sys.stderr)
            return 1
        return 0
    README.write_text(new, encoding="utf-8")
    return 0
