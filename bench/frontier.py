"""`python -m bench frontier`: the runner against Unsloth on the memory/speed frontier, in one call.

Same model (a random-initialised model of a real shape, NF4 + double quant, bf16), same LoRA (r=32, alpha 64, the
7 projections), same data, each framework in its own process, each process loading the model once and training
every workload in turn:

  packed   4 x 2048 tokens per step from the benchmark's synthetic examples (>= 30 steps)
  single   one sequence of N tokens per step (16k, 32k, 64k, 128k, ...)

Unsloth (optional: `unsloth` importable, see bench/gpu/setup.sh) runs first, with and without its offloaded
checkpointing; the runner then trains each single sequence under a memory budget equal to Unsloth's measured peak
at that length (`training.memoryBudget`: the plan picks the mode), the packed workload with memory to spare and
under 10 GiB. Every row has per-step seconds, the median of the last 10 steps' tokens/s, peak allocated memory,
and the runner's rows the ratio to Unsloth's; runner rows can be profiled (GPU-busy fraction, kernels per step) to
tell a host-bound configuration from a GPU-bound one.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench import training as tb

GiB = 2**30
CUDA = torch.cuda.is_available()  # on CPU (a dry run of the tiny shape) the GPU figures are 0


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _peak() -> tuple[float, float]:
    """Peak allocated and reserved GiB since the last reset."""
    if not CUDA:
        return 0.0, 0.0
    return torch.cuda.max_memory_allocated() / GiB, torch.cuda.max_memory_reserved() / GiB


def _reset() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
LORA = {"r": 32, "alpha": 64, "targetModules": "all-linear"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------------------ the data
def single_data(vocab: int, n: int, length: int, seed: int = 0):
    """`n` examples of exactly `length` tokens, 30% prompt: one sequence per step."""
    import datasets

    from runner.data.dataset import TokenizedData

    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "completion_mask": []}
    for _ in range(n):
        rows["input_ids"].append(torch.randint(10, vocab, (length,), generator=g).tolist())
        rows["completion_mask"].append([0] * int(length * 0.3) + [1] * (length - int(length * 0.3)))
    return TokenizedData(datasets.Dataset.from_dict(rows), None, "prompt-completion", [length] * n, 0, True)


def batches(vocab: int, workload: dict, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same examples as the runner's, as (input_ids, labels) rows for a plain training loop: packed rows of
    `maxLength` (examples concatenated, prompt tokens labelled -100) or single sequences."""
    rows, length = workload["batchSize"], workload["maxLength"]
    if workload.get("single"):
        data = single_data(vocab, steps, length).train
    else:
        data = tb.synthetic_data(vocab, max(64, int(rows * length * (steps + 2) / 300 * 1.3)), length).train
    ids, labels, out = [], [], []
    for ex in data:
        ids += ex["input_ids"]
        labels += [t if m else -100 for t, m in zip(ex["input_ids"], ex["completion_mask"])]
    per_step = rows * length
    for s in range(steps):
        a = slice(s * per_step, (s + 1) * per_step)
        if len(ids[a]) < per_step:
            break
        out.append((torch.tensor(ids[a]).view(rows, length), torch.tensor(labels[a]).view(rows, length)))
    return out


# --------------------------------------------------------------------------------------- the figures
def summarise(step_seconds: list[float], step_tokens: list[int], warmup: int, peak: float, **extra) -> dict:
    tps = [t / s for t, s in zip(step_tokens, step_seconds)]
    timed = tps[warmup:]
    last = tps[max(warmup, len(tps) - 10):]  # the last 10 steps, never a warm-up step
    return {
        "steps": len(step_seconds),
        "stepSeconds": [round(s, 4) for s in step_seconds],
        "tokensPerStep": step_tokens[-1] if step_tokens else 0,
        "meanTokensPerSecond": round(sum(step_tokens[warmup:]) / max(sum(step_seconds[warmup:]), 1e-9), 1)
        if timed else None,
        "last10MedianTokensPerSecond": round(statistics.median(last), 1) if last else None,
        "last10Spread": round((max(last) - min(last)) / statistics.median(last), 4) if len(last) > 1 else None,
        "peakAllocatedGiB": round(peak, 2),
        **extra,
    }


def profile_busy(prof, steps: int) -> dict:
    """GPU-busy fraction (union of kernel and copy intervals over the profiled wall time) and kernels per step."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end, first, last = 0.0, None, None, None
    for a, b in spans:
        first = a if first is None else min(first, a)
        last = b if last is None else max(last, b)
        if end is None or a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    return {"kernelsPerStep": len(spans) // max(steps, 1),
            "gpuBusyFraction": round(busy / max((last or 0) - (first or 0), 1), 3) if spans else None}


# ---------------------------------------------------------------------------------- the runner's side
def _step_callback(rec: dict, profile_at: int | None):
    from transformers import TrainerCallback

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if profile_at is not None and state.global_step == profile_at:
                rec["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                rec["prof"].__enter__()
            if "t" not in rec:
                _sync()
                rec["t"], rec["n"] = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kw):
            _sync()
            now = time.perf_counter()
            rec["seconds"].append(now - rec["t"])
            rec["tokens"].append(state.num_input_tokens_seen - rec["n"])
            rec["t"], rec["n"] = now, state.num_input_tokens_seen
            if "prof" in rec and state.global_step == state.max_steps:
                rec["prof"].__exit__(None, None, None)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                rec["losses"].append(round(float(logs["loss"]), 5))

    return Steps()


def runner_worker(model_dir: Path, shape: str, workloads: list[dict], out: Path, work: Path) -> None:
    """Every workload on one loaded base: LoRA weights restored before each, so the losses compare."""
    from runner.model import load as model_load
    from runner.train import fsdp as parallel
    from runner.api.parse import parse_job
    from runner.train.plan import make_plan
    from runner.train.trainer import make_trainer

    results = json.loads(out.read_text()) if out.exists() else {}
    first = parse_job(tb.job_for(json.dumps({"lora": LORA}), model_dir, shape)).spec
    plan0 = make_plan(first, model_dir)
    model = parallel.load_base(first, model_dir, plan0)
    tok = model_load.load_tokenizer(model_dir, first.model)
    model = model_load.add_lora(model, first.lora)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    packing = plan0.with_packing(model).packing
    for w in workloads:
        name = w["name"]
        try:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in start:
                        p.copy_(start[n])
            training = {"batchSize": w["batchSize"], "gradientCheckpointing": w.get("checkpointing"),
                        **({"memoryBudget": w["budget"]} if w.get("budget") else {}), **w.get("training", {})}
            doc = {"dataset": {"maxLength": w["maxLength"]}, "training": training, "lora": LORA}
            spec = parse_job(tb.job_for(json.dumps(doc), model_dir, shape)).spec
            plan = dataclasses.replace(make_plan(spec, model_dir), packing=packing, **w.get("plan", {}))
            print(f"[frontier] runner {name}: {plan.line()}", flush=True)
            steps = w["steps"]
            if w.get("single"):
                data = single_data(model.config.vocab_size, steps * plan.micro_batch * plan.accumulation + 2,
                                   w["maxLength"])
            else:
                n = max(64, int(w["batchSize"] * w["maxLength"] * (steps + 2) / 300 * 1.3))
                data = tb.synthetic_data(model.config.vocab_size, n, w["maxLength"])
            rec = {"seconds": [], "tokens": [], "losses": []}
            profile_at = steps - 2 if w.get("profile") and CUDA else None
            trainer = make_trainer(spec, model, tok, data, work / name, plan,
                                   callbacks=[_step_callback(rec, profile_at)], max_steps=steps,
                                   save_strategy="no", logging_steps=1, shuffle_dataset=False)
            model.gradient_checkpointing_disable()  # a previous workload's plain checkpointing
            _reset()
            trainer.train()
            peak, reserved = _peak()
            seconds, tokens = rec["seconds"], rec["tokens"]
            if profile_at is not None:  # the profiled steps are left out of the figures
                prof_info = profile_busy(rec["prof"], 2)
                seconds, tokens = seconds[:-2], tokens[:-2]
            else:
                prof_info = {}
            results[name] = summarise(seconds, tokens, w.get("warmup", 3), peak, losses=rec["losses"],
                                      plan=plan.to_dict(), **prof_info,
                                      reservedGiB=round(reserved, 2))
            del trainer
        except torch.OutOfMemoryError as e:
            results[name] = {"error": f"out of memory: {str(e)[:200]}", "peakAllocatedGiB": round(_peak()[0], 2)}
        _reset()
        out.write_text(json.dumps(results, indent=1))
        print(f"[frontier] runner {name}: " + json.dumps({k: results[name].get(k) for k in (
            "last10MedianTokensPerSecond", "peakAllocatedGiB", "gpuBusyFraction", "kernelsPerStep", "error")}),
            flush=True)


# ------------------------------------------------------------------------------------------- driver
def _worker(kind: str, model_dir: Path, args, workloads: list[dict], out: Path, extra_env: dict,
            timeout: int | None = None) -> None:
    spec = out.with_suffix(".workloads.json")
    spec.write_text(json.dumps(workloads))
    cmd = [sys.executable, "-m", "bench", "frontier", "--worker", kind, "--model-dir", str(model_dir), "--shape", args.shape, "--workloads", str(spec),
           "--result", str(out), "--work-dir", args.work_dir]
    if kind == "unsloth":
        cmd = [sys.executable, "-m", "bench.unsloth_worker", str(model_dir), str(spec), str(out)]
    env = {**os.environ, **extra_env}
    env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    try:
        subprocess.run(cmd, env=env, timeout=timeout or args.worker_timeout)
    except subprocess.TimeoutExpired:
        print(f"[frontier] {kind} worker timed out", flush=True)


def ratios(result: dict) -> dict:
    """Runner row / Unsloth row, for throughput (median of the last 10 steps) and peak memory."""
    out = {}
    for name, (ours, theirs) in result.get("pairs", {}).items():
        a, b = result["runner"].get(ours, {}), result["unsloth"].get(theirs, {})
        ta, tb_ = a.get("last10MedianTokensPerSecond"), b.get("last10MedianTokensPerSecond")
        out[name] = {"runner": ours, "unsloth": theirs,
                     "speed": round(ta / tb_, 3) if ta and tb_ else None,
                     "memory": round(a["peakAllocatedGiB"] / b["peakAllocatedGiB"], 3)
                     if a.get("peakAllocatedGiB") and b.get("peakAllocatedGiB") else None}
    return out


def main(args) -> int:
    if args.worker == "runner":
        runner_worker(Path(args.model_dir), args.shape, json.loads(Path(args.workloads).read_text()),
                      Path(args.result), Path(args.work_dir))
        return 0
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = tb.build_model(args.shape, Path(args.model_dir or work / f"model-{args.shape}"))
    lengths = [int(x) for x in args.lengths.split(",") if x]
    steps, short = args.steps, args.long_steps
    packed = dict(maxLength=2048, batchSize=4, steps=steps, warmup=3)
    result = {"shape": args.shape, "gpu": torch.cuda.get_device_name() if CUDA else "cpu", "versions": tb.versions(),
              "lengths": lengths, "runner": {}, "unsloth": {}, "pairs": {}}
    out = Path(args.out)

    def save():
        result["ratios"] = ratios(result)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))

    singles = [dict(name=f"single-{n // 1024}k" if n >= 1024 else f"single-{n}", maxLength=n, batchSize=1, steps=short, warmup=1, single=True)
               for n in sorted(lengths, reverse=True)]  # longest first: the host memory it plans with is all free
    if args.unsloth_from:  # Unsloth's rows from earlier calls of this benchmark (same GPU kind, model, data)
        for f in args.unsloth_from.split(","):
            result["unsloth"].update(json.loads(Path(f).read_text())["unsloth"])
        result["unslothFrom"] = args.unsloth_from
    elif not args.no_unsloth:
        uenv = {"PYTHONPATH": os.pathsep.join(filter(None, [args.unsloth_path, os.environ.get("PYTHONPATH")]))}
        runs = (("unsloth", [dict(packed, name="packed-offload"), *singles]), ("none", [dict(packed, name="packed")]))
        if args.skip_packed:
            runs = (("unsloth", singles),)
        for gc_mode, loads in runs:
            if not loads:
                continue
            part = work / f"unsloth-{gc_mode}.json"
            part.unlink(missing_ok=True)
            _worker("unsloth", model_dir, args, [dict(w, checkpointing=gc_mode) for w in loads], part, uenv,
                    args.unsloth_timeout if gc_mode == "unsloth" else None)
            if part.exists():
                result["unsloth"].update(json.loads(part.read_text()))
            save()
    budgets = {w["name"]: result["unsloth"].get(w["name"], {}).get("peakAllocatedGiB") for w in singles}
    loads = [dict(packed, name="packed"), dict(packed, name="packed-compiled", training={"compile": True}),
             dict(packed, name="packed-peft-lora", plan={"fused_lora": False}),
             dict(packed, name="packed-10gib", budget=10.0),
             dict(packed, name="lean-profiled", batchSize=1, steps=16, training={"gradientAccumulationSteps": 2,
                  "optimizer": "paged_adamw_8bit"}, checkpointing=True,
                  plan={"micro_batch": 1, "accumulation": 2, "micro_batch_tokens": 2048}, profile=True)]
    if args.skip_packed:
        loads = []
    loads += [dict(w, budget=budgets[w["name"]]) for w in singles]
    # the same sequences with the attention recomputed (runner/model/kept_attention.py off): its A/B
    loads += [dict(w, name=f"{w['name']}-recompute", budget=budgets[w["name"]], plan={"kept_attention": 0})
              for w in singles]
    if args.only:
        loads = [w for w in loads if w["name"] in args.only.split(",")]
    part = work / "runner.json"
    part.unlink(missing_ok=True)
    _worker("runner", model_dir, args, loads, part, {})
    if part.exists():
        result["runner"].update(json.loads(part.read_text()))
    result["pairs"] = {**({} if args.skip_packed else {"packed (memory to spare)": ("packed", "packed"),
                                                       "packed, compiled layers": ("packed-compiled", "packed"),
                                                       "packed, <= 10 GiB": ("packed-10gib", "packed-offload")}),
                       **{w["name"]: (w["name"], w["name"]) for w in singles},
                       **{f"{w['name']}, attention recomputed": (f"{w['name']}-recompute", w["name"]) for w in singles}}
    for key, fast, reference in (("lossCheck", "packed-10gib", "packed"),
                                 ("lossCheckFusedLora", "packed", "packed-peft-lora"),
                                 ("lossCheckCompiled", "packed-compiled", "packed")):
        a, b = result["runner"].get(reference, {}), result["runner"].get(fast, {})
        if a.get("losses") and b.get("losses"):
            result[key] = tb.loss_check({"a": {"stepLosses": b["losses"]}, "b": {"stepLosses": a["losses"]}},
                                        ["a", "b"]) | {"fast": fast, "reference": reference}
    save()
    print(json.dumps({"ratios": result["ratios"], "lossCheck": result.get("lossCheck"),
                      "lossCheckFusedLora": result.get("lossCheckFusedLora"),
                      "lossCheckCompiled": result.get("lossCheckCompiled")}, indent=1), flush=True)
    return 0


def parser():
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench frontier", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-3-8b")
    p.add_argument("--model-dir", default=None)
    p.add_argument("--work-dir", default="/tmp/frontier")
    p.add_argument("--out", default="frontier.json")
    p.add_argument("--steps", type=int, default=30, help="steps of the packed workloads")
    p.add_argument("--long-steps", type=int, default=3, help="steps of each single-sequence workload")
    p.add_argument("--lengths", default="16384,32768,65536", help="single-sequence lengths, comma-separated")
    p.add_argument("--no-unsloth", action="store_true")
    p.add_argument("--skip-packed", action="store_true", help="single sequences only (both frameworks)")
    p.add_argument("--unsloth-from", default=None, help="take Unsloth's rows from earlier result files (comma-separated)")
    p.add_argument("--unsloth-path", default="/tmp/site-unsloth", help="put first on PYTHONPATH for Unsloth")
    p.add_argument("--only", default=None, help="runner workloads to run (comma-separated names)")
    p.add_argument("--worker-timeout", type=int, default=1200, help="seconds for each worker process")
    p.add_argument("--unsloth-timeout", type=int, default=None, help="seconds for Unsloth's checkpointed worker")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workloads", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p
