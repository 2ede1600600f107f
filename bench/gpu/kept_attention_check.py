"""On a GPU: kept attention (runner/model/kept_attention.py) against recomputed attention under offloaded
checkpointing, both on cuDNN's kernel. A Llama of 4 layers with the 8B's layer shape (hidden 4096, 32 query heads
and 8 key/value heads of 128, MLP 14,336), bf16, LoRA r=32 on every projection, one sequence per step: the loss and
every LoRA gradient of the two paths (the same after one step), and the seconds of a forward+backward at each length.

    python bench/gpu/kept_attention_check.py [OUT.json] [LENGTHS]     (default: $OUT/kept-attention-check.json,
                                                                      16384,65536)
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from runner.model import attention
from runner.train import memory
from runner.train import offload


def model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    attention.register()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=1024, max_position_embeddings=131072, use_cache=False,
                      attn_implementation=attention.NAME, torch_dtype=torch.bfloat16)
    base = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    for p in base.parameters():
        p.requires_grad_(False)
    m = get_peft_model(base, LoraConfig(r=32, lora_alpha=64, target_modules="all-linear", lora_dropout=0.0))
    for name, p in m.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return m.train()


def step(m, n: int, seed: int = 1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.randint(0, 1024, (1, n), device="cuda", generator=g)
    m.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    loss = m(input_ids=ids, labels=ids, position_ids=torch.arange(n, device="cuda")[None]).loss
    loss.backward()
    torch.cuda.synchronize()
    return loss.item(), time.perf_counter() - t


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", "/tmp/out")) / "kept-attention-check.json"
    lengths = [int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "16384,65536").split(",")]
    m = model()
    rows = []
    for n in lengths:
        row = {"tokens": n}
        grads = {}
        for keep in (False, True):
            handle = offload.install(m, memory.OFFLOADED_LAYER, kept_layers=4 if keep else 0)
            try:
                step(m, n, seed=2)  # warm-up
                torch.cuda.reset_peak_memory_stats()
                times = []
                for _ in range(3):
                    loss, s = step(m, n)
                    times.append(s)
                grads[keep] = {k: p.grad.float().clone() for k, p in m.named_parameters() if p.requires_grad}
                key = "kept" if keep else "recomputed"
                row[key] = {"loss": loss, "seconds": sorted(times)[1],
                            "peakAllocatedGiB": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
            finally:
                handle.remove()
        worst = max(((grads[True][k] - g).norm() / g.norm().clamp(min=1e-12)).item() for k, g in grads[False].items())
        row["maxRelativeGradDifference"] = worst
        row["speedup"] = round(row["recomputed"]["seconds"] / row["kept"]["seconds"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del grads
        torch.cuda.empty_cache()
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
              "ok": all(r["maxRelativeGradDifference"] < 1e-2
                        and abs(r["kept"]["loss"] - r["recomputed"]["loss"]) <= 1e-3 * abs(r["recomputed"]["loss"])
                        for r in rows)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({"ok": result["ok"]}))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
