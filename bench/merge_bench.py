"""`python -m bench.merge_bench`: time and peak memory of the shard-by-shard merge (runner.merge.fold) on a random
model of a real shape.

    python -m bench.merge_bench --shape llama-3-8b                           # bf16 base in ~5 GiB shards
    python -m bench.merge_bench --shape llama-3-70b --base 4bit --discard-output
    python -m bench.merge_bench --shape tiny                                 # CPU smoke test, seconds

It builds, once (reused from --work-dir), a random base that never exists whole in memory: `--base bf16`
writes each tensor of a LlamaConfig of the real shape (normal weights, std 0.02; unit norms), generated on the
GPU when there is one, straight into safetensors shards of about --shard-mib; `--base 4bit` writes the base
already in NF4, a layer at a time (bench/prequantize.py, as the training benchmark makes its 70B). Then a
random LoRA adapter (r=32, alpha=64, all 7 projections of every layer). Then the job's merge phase,
runner.merge.fold.merge, runs in a fresh process (so its peak RSS is the merge's own) on the GPU when there is one,
and one JSON document is printed: seconds, peak CPU RSS, peak GPU memory, merged size and the checks.

Disk: the base (bf16: 2 bytes/parameter; 4bit: ~0.56) plus the merged output (2 bytes/parameter): 16 + 16 GB
for the 8B, 40 + 140 GB for the 70B from 4 bits. --discard-output deletes each merged shard right after it is
written (the write is still timed; the end-to-end check, which loads the output, is then skipped).
Targets, on an H200: 8B merge <= 26 s; 70B merge < 10 min, peak CPU < 48 GB, GPU < 40 GB.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

GiB = 2**30
RANK, ALPHA = 32, 64
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_config(shape: str, tok):
    from transformers import LlamaConfig

    from bench.training import SHAPES

    return LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)


def tensor_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the model in checkpoint order, from a meta-device skeleton (nothing allocated)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return [(k, tuple(v.shape)) for k, v in skeleton.state_dict().items()]


def write_bf16_base(config, out_dir: Path, shard_bytes: int, dev: torch.device, seed: int = 0) -> None:
    """The random base in bf16 shards of about `shard_bytes`, one shard in memory at a time."""
    from safetensors.torch import save_file

    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for key, shape in tensor_shapes(config):
        n = 2 * int(torch.Size(shape).numel())
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((key, shape))
        size += n
    gen = torch.Generator(device=dev).manual_seed(seed)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for key, shape in group:
            if len(shape) == 1:  # norms
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = torch.randn(shape, generator=gen, device=dev, dtype=torch.bfloat16).mul_(0.02).cpu()
            tensors[key] = t
            total += t.numel() * 2
        save_file(tensors, str(out_dir / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.dtype = torch.bfloat16
    config.save_pretrained(out_dir)  # last: its presence marks the directory complete


def build_base(shape: str, base: str, out_dir: Path, shard_bytes: int) -> Path:
    from runner.quickstart.tiny import build_tokenizer

    if (out_dir / "config.json").exists():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer([" ".join(str(i) for i in range(1000))], out_dir)
    config = llama_config(shape, tok)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if base == "4bit":
        from transformers import BitsAndBytesConfig

        from bench import prequantize

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
        return prequantize.write(config, out_dir, quant, device=dev)
    write_bf16_base(config, out_dir, shard_bytes, dev)
    return out_dir


def write_adapter(config, out_dir: Path, base_dir: Path, seed: int = 1) -> Path:
    """A random LoRA adapter in peft's format: r=32 on the 7 projections of every layer, non-zero B."""
    from safetensors.torch import save_file

    if (out_dir / "adapter_config.json").exists():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    shapes = dict(tensor_shapes(config))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(config.num_hidden_layers):
        for proj in PROJECTIONS:
            part = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            name = f"model.layers.{i}.{part}.{proj}"
            out_f, in_f = shapes[f"{name}.weight"]
            prefix = f"base_model.model.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, in_f, generator=gen) / in_f ** 0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, RANK, generator=gen) * 1e-3
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0,
           "target_modules": list(PROJECTIONS), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
           "base_model_name_or_path": str(base_dir)}
    (out_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return out_dir


def run_merge(base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: str, merge_base: str,
              discard: bool) -> dict:
    """The job's merge phase, timed, in this process (the caller runs it in a fresh one)."""
    from transformers import AutoTokenizer

    from runner.merge import fold as merge_phase
    from runner.api.parse import manifest, parse_job

    spec = parse_job(manifest("merge-bench", {
        "model": {"source": str(base_dir)}, "dataset": {"source": "unused.jsonl"},
        "merge": {"dtype": dtype, "base": merge_base}, "output": {"destination": str(out_dir)},
    })).spec
    tok = AutoTokenizer.from_pretrained(base_dir)
    probe = torch.randint(10, 500, (2, 32))  # every shape has a vocabulary of at least 512
    shutil.rmtree(out_dir, ignore_errors=True)
    written = []

    def drop(path: Path) -> None:
        written.append(path.stat().st_size)
        path.unlink()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    check = merge_phase.merge(spec, base_dir, adapter_dir, tok, probe, out_dir, [],
                              on_shard=drop if discard else None)
    seconds = time.perf_counter() - t
    size = sum(written) + sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))
    return {
        "seconds": round(seconds, 2),
        "peakCpuRssGiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB, 2),
        "peakGpuAllocatedGiB": round(torch.cuda.max_memory_allocated() / GiB, 2) if cuda else None,
        "peakGpuReservedGiB": round(torch.cuda.max_memory_reserved() / GiB, 2) if cuda else None,
        "mergedGiB": round(size / GiB, 3), "mergedBytes": size,
        "shards": len(written) or len(list(out_dir.glob("*.safetensors"))),
        "check": {"method": check.method, "dtype": check.dtype, "relativeError": check.relative_error,
                  "maxAbsError": check.max_abs_error, "layerRelativeError": check.layer_relative_error,
                  "tolerance": check.tolerance, "maxAbsWeight": check.max_abs_weight},
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.merge_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-3-8b", help="tiny, llama-2-7b, llama-3-8b, llama-3-70b")
    p.add_argument("--base", choices=["bf16", "4bit"], default="bf16", help="the random base's format")
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16", help="merge.dtype")
    p.add_argument("--merge-base", choices=["original", "dequantized"], default="original", help="merge.base")
    p.add_argument("--shard-mib", type=float, default=5120, help="shard size of a bf16 base (MiB)")
    p.add_argument("--work-dir", default="/tmp/merge-bench")
    p.add_argument("--discard-output", action="store_true", help="delete each merged shard once written")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    p.add_argument("--merge-only", nargs=3, metavar=("BASE", "ADAPTER", "OUT"), help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.merge_only:
        base_dir, adapter_dir, out_dir = map(Path, args.merge_only)
        print(json.dumps(run_merge(base_dir, adapter_dir, out_dir, args.dtype, args.merge_base,
                                   args.discard_output)), flush=True)
        return 0
    work = Path(args.work_dir)
    base_dir = work / f"{args.shape}-{args.base}"
    t = time.perf_counter()
    build_base(args.shape, args.base, base_dir, int(args.shard_mib * 2**20))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir)
    adapter_dir = write_adapter(config, work / f"{args.shape}-adapter", base_dir)
    built = time.perf_counter() - t
    params = sum(torch.Size(s).numel() for _, s in tensor_shapes(config))
    need, free = 2 * params, shutil.disk_usage(work).free
    if not args.discard_output and need > free:
        print(f"merge_bench: the merged model needs {need / GiB:.0f} GiB of disk, {free / GiB:.0f} GiB free "
              f"under {work}; pass --discard-output", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "bench.merge_bench", "--merge-only", str(base_dir), str(adapter_dir),
           str(work / f"{args.shape}-merged"), "--dtype", args.dtype, "--merge-base", args.merge_base]
    proc = subprocess.run(cmd + (["--discard-output"] if args.discard_output else []), capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        print(proc.stderr[-5000:], file=sys.stderr)
        return proc.returncode
    result = {"shape": args.shape, "base": args.base, "parameters": params,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "buildSeconds": round(built, 1), **json.loads(proc.stdout.strip().splitlines()[-1])}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
