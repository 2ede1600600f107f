"""Unsloth's side of `python -m bench frontier` (its own process: Unsloth patches transformers on import).

    python -m bench.unsloth_worker MODEL_DIR WORKLOADS.json RESULT.json

Loads the random model with Unsloth's 4-bit path (NF4 + double quant, bf16), adds LoRA (r=32, alpha 64, the 7
projections, dropout 0) with `use_gradient_checkpointing` "unsloth" (its offloaded checkpointing) or off, as the
workloads say (one mode per process), and trains each workload with a plain loop: the same examples as the runner
(bench/frontier.py `batches`), fused AdamW at the runner's learning rate, gradients clipped at the runner's 0.3,
Unsloth's own loss. Packed rows are plain causal rows here (examples in a row may attend to each other): no
cheaper for the runner. Every step is timed after a CUDA sync.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import unsloth  # noqa: E402,F401  (first: it patches transformers, peft and trl)
import gc  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402


def main(model_dir: str, workloads_file: str, result_file: str) -> int:
    from unsloth import FastLanguageModel

    from bench.frontier import GiB, TARGETS, batches, summarise

    workloads = json.loads(Path(workloads_file).read_text())
    mode = workloads[0].get("checkpointing", "unsloth")
    out = Path(result_file)
    results = {}
    t = time.perf_counter()
    model, _ = FastLanguageModel.from_pretrained(model_name=model_dir, max_seq_length=max(w["maxLength"] for w in workloads),
                                                 dtype=torch.bfloat16, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=32, lora_alpha=64, lora_dropout=0, bias="none",
                                             target_modules=TARGETS, random_state=0,
                                             use_gradient_checkpointing="unsloth" if mode == "unsloth" else False)
    FastLanguageModel.for_training(model)
    load_s = time.perf_counter() - t
    params = [p for p in model.parameters() if p.requires_grad]
    for w in workloads:
        name = w["name"]
        try:
            steps = batches(model.config.vocab_size, w, w["steps"])
            opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, fused=True)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            seconds, tokens, losses = [], [], []
            for ids, labels in steps:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                loss = model(input_ids=ids.cuda(non_blocking=True), labels=labels.cuda(non_blocking=True)).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 0.3)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(round(loss.item(), 5))
                torch.cuda.synchronize()
                seconds.append(time.perf_counter() - t0)
                tokens.append(ids.numel())
            results[name] = summarise(seconds, tokens, w.get("warmup", 3), torch.cuda.max_memory_allocated() / GiB,
                                      losses=losses, checkpointing=mode, loadSeconds=round(load_s, 1),
                                      reservedGiB=round(torch.cuda.max_memory_reserved() / GiB, 2))
            del opt
        except torch.OutOfMemoryError as e:
            results[name] = {"error": f"out of memory: {str(e)[:200]}", "checkpointing": mode,
                             "peakAllocatedGiB": round(torch.cuda.max_memory_allocated() / GiB, 2)}
        for p in params:
            p.grad = None
        gc.collect()
        torch.cuda.empty_cache()
        out.write_text(json.dumps(results, indent=1))
        print(f"[frontier] unsloth {name} ({mode}): " + json.dumps({k: results[name].get(k) for k in (
            "last10MedianTokensPerSecond", "meanTokensPerSecond", "peakAllocatedGiB", "error")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
