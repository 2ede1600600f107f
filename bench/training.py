"""`python -m bench`: training throughput and memory of the runner's path vs the classic QLoRA notebook recipe.

Builds a random-initialised model of a real shape on the GPU (throughput and memory do not depend on the
weights' values, and no weights can be downloaded there), saves it, loads it through the runner's normal
4-bit path, and trains each configuration on the same synthetic data of realistic lengths:

  notebook  the classic QLoRA notebooks' recipe: rows padded to 512, batch 2, prepare_model_for_kbit_training (fp32
            upcast), gradient checkpointing, paged 8-bit AdamW, LoRA dropout 0.05
  defaults  the runner's defaults: packed rows of 2048 with document-masked (varlen) attention, bf16
            everywhere, no LoRA dropout, fused AdamW, checkpointing chosen by memory
  lean      the memory-lean setting: defaults + gradient checkpointing + paged 8-bit AdamW
  lora16    defaults on a 16-bit base: plain LoRA, no quantization (quantization.bits: 16)
  lora8     defaults on an LLM.int8 base (quantization.bits: 8)

It reports real (non-padding) tokens/s, model FLOPs utilisation, s/step, peak allocated and reserved
memory, and the time to merge the adapter into a 16-bit model and save it, as one JSON document.
"""
from __future__ import annotations

import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from runner.api.parse import manifest, parse_job

SHAPES: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024),  # the bench tokenizer has 1007 tokens
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}
ROOT = Path(__file__).resolve().parents[1]  # the checkout: bench/ is not part of the installed package
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


# ------------------------------------------------------------------------------------------ the model
def matmul_params(c) -> int:
    """Parameters of the decoder layers' projections and the LM head (a config, or a SHAPES namespace)."""
    h, L, kv = c.hidden_size, c.num_hidden_layers, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    return L * (h * h * 2 + h * kv * 2 + 3 * h * c.intermediate_size) + h * c.vocab_size


def bf16_bytes(shape: str) -> int:
    c = SimpleNamespace(**SHAPES[shape])
    return 2 * (matmul_params(c) + c.hidden_size * c.vocab_size)  # + the input embeddings


def build_model(shape: str, out_dir: Path, prequantize: str = "no") -> Path:
    """Random-initialised model of a real shape, built on the GPU and saved with a tokenizer: in bf16, or
    (`prequantize`) already in 4-bit, a layer at a time, so a 70B never exists as 140 GB of bf16."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from runner.quickstart.tiny import build_tokenizer

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer([" ".join(str(i) for i in range(1000))], out_dir)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if prequantize == "yes" or (prequantize == "auto" and bf16_bytes(shape) > 64 * 2**30):
        from transformers import BitsAndBytesConfig

        from bench import prequantize as pq

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
        return pq.write(config, out_dir, quant, device=torch.device(dev))
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out_dir


def synthetic_data(vocab: int, n: int, max_length: int, seed: int = 0):
    """Examples of realistic lengths (log-normal, median ~300 tokens), 30% prompt / 70% completion."""
    import datasets

    from runner.data.dataset import TokenizedData

    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(torch.randn(n, generator=g) * 0.8 + math.log(300)).clamp(32, max_length).long().tolist()
    rows = {"input_ids": [], "completion_mask": []}
    for length in lengths:
        rows["input_ids"].append(torch.randint(10, vocab, (length,), generator=g).tolist())
        prompt = int(length * 0.3)
        rows["completion_mask"].append([0] * prompt + [1] * (length - prompt))
    return TokenizedData(datasets.Dataset.from_dict(rows), None, "prompt-completion", lengths, 0, True)


# ------------------------------------------------------------------------------------ configurations
def job_for(config: str, model_dir: Path, shape: str) -> dict:
    lora = {"r": 32, "alpha": 64, "targetModules": "all-linear"}
    doc = {"model": {"source": str(model_dir)}, "dataset": {"source": "synthetic.jsonl"},
           "lora": lora, "output": {"destination": "/tmp/bench-out"}, "training": {}}
    if config == "notebook":
        doc["model"]["attnImplementation"] = "sdpa"
        doc["dataset"].update(maxLength=512, packing=False)
        doc["lora"]["dropout"] = 0.05
        doc["training"] = {"batchSize": 2, "gradientCheckpointing": True, "optimizer": "paged_adamw_8bit"}
    elif config == "defaults":
        pass
    elif config == "lean":  # 2x2048 tokens per optimizer step as two micro-batches of one packed row
        doc["training"] = {"batchSize": 1, "gradientAccumulationSteps": 2, "gradientCheckpointing": True,
                           "optimizer": "paged_adamw_8bit"}
    elif config in ("lora16", "lora8"):
        doc["quantization"] = {"bits": int(config[4:])}
    elif config.startswith("{"):  # an inline JSON override, for exploring: '{"training": {"batchSize": 4}}'
        for k, v in json.loads(config).items():
            doc[k] = {**doc.get(k, {}), **v}
    else:
        raise SystemExit(f"unknown bench config {config!r}: use notebook, defaults, lean, lora16, lora8 or a JSON "
                         "override")
    return doc


def model_flops_per_token(model_cfg, lengths: list[int]) -> float:
    """4 x matmul params (forward + input-gradient backward; frozen weights get no weight gradient) plus
    causal attention (3x its forward: 2 matmuls of 2*d*ctx each, ctx = half the example on average)."""
    c = model_cfg
    h, L = c.hidden_size, c.num_hidden_layers
    matmul = matmul_params(c)
    mean_ctx = sum(n * n / 2 for n in lengths) / max(sum(lengths), 1)
    attention = 3 * L * 4 * h * mean_ctx
    return 4 * matmul + attention


class StepTimer:
    def __init__(self, warmup: int):
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                if state.global_step == warmup:
                    timer.t0, timer.tokens0 = time.perf_counter(), state.num_input_tokens_seen
                timer.t1, timer.tokens1, timer.steps = time.perf_counter(), state.num_input_tokens_seen, state.global_step

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    timer.losses.append(round(float(logs["loss"]), 5))

        self.callback = _CB()
        self.losses: list[float] = []
        self.t0 = self.t1 = 0.0
        self.tokens0 = self.tokens1 = self.steps = 0
        self.warmup = warmup


def run_config(name: str, model_dir: Path, shape: str, steps: int, warmup: int, work: Path,
               log_every_step: bool = False) -> tuple[dict, Path]:
    from peft import prepare_model_for_kbit_training

    from runner.model import load as model_load
    from runner.train import fsdp as parallel
    from runner.train.plan import make_plan
    from runner.train.trainer import make_trainer

    job = parse_job(job_for(name, model_dir, shape))
    spec = job.spec
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    plan = make_plan(spec, model_dir)
    t_load = time.perf_counter()
    model = parallel.load_base(spec, model_dir, plan)
    load_s = time.perf_counter() - t_load
    tok = model_load.load_tokenizer(model_dir, spec.model)
    if name == "notebook":  # the notebooks call this: it upcasts every non-4-bit weight to fp32
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = parallel.add_lora(model, spec.lora)  # under FSDP the sharded loader added them already
    tokens_per_step = spec.training.batch_size * spec.dataset.max_length * spec.training.gradient_accumulation_steps
    from runner.parallel import distributed

    n_examples = max(64, int(tokens_per_step * (steps + 2) / 300 * 1.3)) * distributed.world_size()
    data = synthetic_data(model.config.vocab_size, n_examples, spec.dataset.max_length)
    plan = plan.with_packing(model)
    timer = StepTimer(warmup)
    overrides = {"max_steps": steps, "save_strategy": "no", "logging_steps": 1 if log_every_step else 10**6,
                 "shuffle_dataset": False}
    if name == "notebook":
        overrides["pad_to_multiple_of"] = 512  # the notebooks pad every row to 512
    trainer = make_trainer(spec, model, tok, data, work / name, plan, callbacks=[timer.callback], **overrides)
    trainer.train()
    peaks = _per_rank(torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0)
    measured = timer.steps - timer.warmup
    seconds = timer.t1 - timer.t0
    tps = (timer.tokens1 - timer.tokens0) / seconds if seconds > 0 else float("nan")
    flops = model_flops_per_token(model.config, data.lengths)
    peak = _peak_tflops()
    result = {
        "config": spec.model_dump(by_alias=True, include={"dataset", "lora", "training", "model", "quantization"},
                                  exclude_none=True),
        "bits": plan.bits,
        "weightGiB": round(plan.weight_bytes / 2**30, 2),
        "packing": plan.packing,
        "strategy": plan.strategy,
        "attention": model.config._attn_implementation,
        "gradientCheckpointing": plan.mode.checkpointed,
        "mode": plan.mode.to_dict(),
        "fusedKernels": plan.layer_kernels,  # Liger's layer kernels (runner/train/layer_kernels.py)
        "fusedLora": plan.fused_lora,
        "measuredSteps": measured,
        "secondsPerStep": round(seconds / max(measured, 1), 4),
        "realTokensPerSecond": round(tps, 1),
        "modelFlopsPerToken": flops,
        # per GPU: the tokens of all ranks over the peak of all GPUs
        "mfu": round(tps * flops / (peak * 1e12 * distributed.world_size()), 4) if peak else None,
        "loadSeconds": round(load_s, 1),
        "peakAllocatedGiB": round(peaks[0], 2) if torch.cuda.is_available() else None,
        "peakAllocatedGiBPerRank": [round(p, 2) for p in peaks],
        "peakReservedGiB": round(torch.cuda.max_memory_reserved() / 2**30, 2) if torch.cuda.is_available() else None,
        "finalLoss": trainer.state.log_history[-1].get("train_loss") if trainer.state.log_history else None,
        "stepLosses": timer.losses,
    }
    adapter = work / f"{name}-adapter"
    parallel.save_adapter(trainer, adapter)
    del trainer, model
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return result, adapter


def _per_rank(value: float) -> list[float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def time_merge(model_dir: Path, adapter: Path, work: Path, shape: str) -> dict:
    from runner.merge import fold as merge_phase
    from runner.model import load as model_load

    spec = parse_job(job_for("defaults", model_dir, shape)).spec
    tok = model_load.load_tokenizer(model_dir, spec.model)
    probe = torch.randint(10, 500, (2, 32))  # every shape has a vocabulary of at least 512
    out = work / "merged"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t = time.perf_counter()
    check = merge_phase.merge(spec, model_dir, adapter, tok, probe, out, [])
    seconds = time.perf_counter() - t
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"seconds": round(seconds, 1), "dtype": check.dtype, "relativeLogitError": check.relative_error,
            "savedGiB": round(size / 2**30, 2)}


# The fast path (varlen attention, fused kernels) against the reference path (SDPA with a block-diagonal
# mask, PyTorch ops), same data, seed and packing: bf16 kernels reorder sums, so losses agree to ~1e-2.
LOSS_TOLERANCE = 0.02


def loss_check(configs: dict, names: list[str]) -> dict:
    fast, ref = configs[names[0]].get("stepLosses") or [], configs[names[1]].get("stepLosses") or []
    n = min(len(fast), len(ref))
    diffs = [abs(a - b) / max(abs(b), 1e-6) for a, b in zip(fast[:n], ref[:n])]
    worst = max(diffs) if diffs else float("nan")
    return {"fast": names[0], "reference": names[1], "steps": n, "maxRelativeDifference": round(worst, 5),
            "tolerance": LOSS_TOLERANCE, "passed": bool(diffs) and worst <= LOSS_TOLERANCE}


def _peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "liger-kernel", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def write_job(shape: str, directory: Path, examples: int = 2000, steps: int = 30, prequantize: str = "no") -> Path:
    """A whole job for `python -m runner run`: the random model, a generated dataset, a job file."""
    import random

    import yaml

    directory.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(shape, directory / "model", prequantize)
    rng = random.Random(0)
    with open(directory / "data.jsonl", "w") as f:
        for _ in range(examples):
            n = int(min(1500, max(24, rng.lognormvariate(math.log(250), 0.8))))
            words = [str(rng.randrange(1000)) for _ in range(n)]
            cut = int(n * 0.3)
            f.write(json.dumps({"prompt": " ".join(words[:cut]), "completion": " " + " ".join(words[cut:])}) + "\n")
    job = manifest(f"bench-{shape}", {
        "model": {"source": str(model_dir)}, "dataset": {"source": str(directory / "data.jsonl")},
        "lora": {"r": 32, "alpha": 64}, "training": {"maxSteps": steps, "saveSteps": steps, "loggingSteps": 5},
        "output": {"destination": str(directory / "output")},
        "evalPrompts": ["1 2 3 4"], "evalMaxNewTokens": 8})
    path = directory / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def run_single(args) -> int:
    from runner.parallel import distributed

    try:
        res, adapter = run_config(args.single, Path(args.model_dir), args.shape, args.steps, args.warmup,
                                  Path(args.work_dir), log_every_step=args.loss_check)
        res["adapter"] = str(adapter)
        res["processes"] = distributed.world_size()
    except torch.OutOfMemoryError as e:
        res = {"error": f"out of memory: {str(e)[:300]}"}
    if distributed.is_main():
        Path(args.single_out).write_text(json.dumps(res, default=str))
    distributed.leave_group()  # every rank leaves the process group before it exits
    return 0


def main(args) -> int:
    if args.single:
        return run_single(args)
    if args.write_job:
        print(write_job(args.shape, Path(args.write_job), prequantize=args.prequantize))
        return 0
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir or work / f"model-{args.shape}")
    t = time.perf_counter()
    build_model(args.shape, model_dir, args.prequantize)
    result = {
        "shape": args.shape,
        "processes": args.nproc,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "peakBf16Tflops": _peak_tflops(),
        "versions": versions(),
        "buildSeconds": round(time.perf_counter() - t, 1),
        "configs": {},
    }
    configs = args.configs.split(";") if ";" in args.configs else args.configs.split(",")
    adapter = None
    for name in configs:
        # Each configuration runs in its own process: nothing of one (paged optimizer pages, allocator
        # caches, a model kept alive by a library) can change the next one's speed or memory.
        print(f"[bench] {name} ...", flush=True)
        out_file = work / "config-result.json"
        out_file.unlink(missing_ok=True)
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}"]
        cmd = [sys.executable, *(launcher if args.nproc > 1 else []),
               "-m", "bench", "--shape", args.shape, "--model-dir", str(model_dir),
               "--work-dir", str(work), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--single", name, "--single-out", str(out_file), *(["--loss-check"] if args.loss_check else [])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        if args.nproc == 1:  # one process, one GPU (see distributed.pin_one_gpu)
            env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        proc = subprocess.run(cmd, env=env)
        if out_file.exists():
            res = json.loads(out_file.read_text())
        else:
            res = {"error": f"exited with {proc.returncode}"}
        result["configs"][name] = res
        if "error" not in res and (name == "defaults" or adapter is None):
            adapter = Path(res["adapter"])
        print(json.dumps({name: {k: res.get(k) for k in ("realTokensPerSecond", "mfu", "secondsPerStep",
                                                         "peakAllocatedGiB", "peakReservedGiB", "error")}}),
              flush=True)
    if args.loss_check:
        result["lossCheck"] = loss_check(result["configs"], configs)
        print(json.dumps({"lossCheck": result["lossCheck"]}), flush=True)
    if args.merge and adapter is not None:
        result["merge"] = time_merge(model_dir, adapter, work, args.shape)
        print(json.dumps({"merge": result["merge"]}), flush=True)
    text = json.dumps(result, indent=2, default=str)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
    return 0
