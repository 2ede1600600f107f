"""Merge phase: fold the adapter into a 16-bit copy of the base (never into quantized layers: the base's own
16-bit files are read, whatever quantization.bits training used), one safetensors shard at a time
(runner.merge.shards), and prove the merged model still computes what base+adapter computed, with no fp16
overflow.

Checks. Always, layer by layer while merging (the model is never whole in memory): every merged tensor is
finite and within float16's range, and every merged linear layer's output on random probe vectors matches
base W @ x + scale * B (A x) to within TOLERANCE. When the merged model is small enough (its bytes at most
FULL_CHECK_FRACTION of the available RAM and, on a GPU, of its free memory: the check then holds the merged
model plus a copy of the adapted base weights, at most half of either), also end to end as before: logits of
the merged model, loaded back from the written files, against base+adapter (peft) on real probe inputs, and
the eval-prompt samples from the merged model. For a larger model (a 70B on one GPU) only the layer checks run
and MergeCheck.samples is empty: that is the only case the samples are skipped.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from runner.api.errors import PermanentError, MERGE_FAILED
from runner.api.spec import FineTuneJobSpec
from runner.merge.shards import FP16_MAX, Requantize, merge_files, merged_bytes
from runner.model.files import BaseFiles
from runner.model.load import device, is_quantized_linear, meta_model
from runner.train.plan import Machine, compute_dtype

__all__ = ["FP16_MAX", "TOLERANCE", "FULL_CHECK_FRACTION", "MergeCheck", "probe_inputs", "merge"]

# Relative mean |logit difference| allowed between base+adapter and the merged weights. A broken merge
# (wrong scale, wrong layers, 4-bit rounding) is off by O(1); 16-bit rounding of W + BA is measured at
# ~1e-3 on tiny models and ~9e-3 (fp16) on a random-initialised Llama-3-8B, whose logits are near-uniform.
# The layer-by-layer probe check uses the same bound (16-bit rounding alone gives ~3e-4 fp16, ~3e-3 bf16).
TOLERANCE = {"float16": 3e-2, "bfloat16": 8e-2}
# The end-to-end check runs when the merged model takes at most this share of the free memory.
FULL_CHECK_FRACTION = 0.25


@dataclass
class MergeCheck:
    dtype: str
    relative_error: float  # logits (method "logits"), else the worst layer's probe error (method "layers")
    max_abs_error: float
    tolerance: float
    max_abs_weight: float
    samples: list[str]
    method: str = "logits"
    layer_relative_error: float = 0.0


def probe_inputs(tokenizer, texts: list[str], n: int = 4, max_tokens: int = 64) -> torch.Tensor:
    """A few real inputs to compare logits on (the first training texts, or a fixed sentence)."""
    picked = [t for t in texts if t.strip()][:n] or ["The quick brown fox jumps over the lazy dog."]
    enc = [tokenizer(t, truncation=True, max_length=max_tokens)["input_ids"] for t in picked]
    length = min(len(e) for e in enc)
    return torch.tensor([e[:length] for e in enc])


def full_check_fits(size: int, dev: torch.device) -> bool:
    """Whether a merged model of `size` bytes may be loaded whole for the end-to-end check."""
    import psutil

    free = psutil.virtual_memory().available
    if dev.type == "cuda":
        free = min(free, torch.cuda.mem_get_info(dev)[0])
    return size <= FULL_CHECK_FRACTION * free


def _requantize(spec: FineTuneJobSpec, base_dir: Path, dev: torch.device) -> Requantize | None:
    """merge.base: dequantized on a 16-bit base: the linear layers 4-bit (or 8-bit) training quantized, and
    how. Training in 16 bits rounded nothing."""
    if spec.merge.base != "dequantized" or spec.quantization.bits == 16:
        return None
    keys = {f"{n}.weight" for n, m in meta_model(base_dir, spec.model).named_modules() if is_quantized_linear(n, m)}
    stored = BaseFiles(base_dir)
    if stored.quantized:
        return None  # a 4-bit base: its dequantized weights are the only ones there are
    missing = sorted(keys - set(stored.weight_map))
    if missing:
        raise PermanentError(f"merge.base: dequantized: the checkpoint names its linear weights differently from "
                             f"the model ({missing[0]} not found); use merge.base: original", reason=MERGE_FAILED)
    q = spec.quantization
    return Requantize(keys, q.quant_type, q.double_quant, compute_dtype(spec, Machine.here()), bits=q.bits)


def merge(
    spec: FineTuneJobSpec,
    base_dir: Path,
    adapter_dir: Path,
    tokenizer,
    probe: torch.Tensor,
    out_dir: Path,
    eval_prompts: list[str],
    *,
    on_shard: Callable[[Path], None] | None = None,
) -> MergeCheck:
    name = spec.merge.dtype
    dtype, dev, tol = getattr(torch, name), device(), TOLERANCE[name]
    full = on_shard is None and full_check_fits(merged_bytes(base_dir, dtype), dev)
    stats = merge_files(base_dir, adapter_dir, out_dir, dtype=dtype, device=dev,
                        requantize=_requantize(spec, base_dir, dev), tolerance=tol, keep_base=full,
                        on_shard=on_shard)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    layers = MergeCheck(name, stats.layer_relative_error, stats.layer_max_abs_error, tol, stats.max_abs_weight,
                        [], "layers", stats.layer_relative_error)
    if not full:
        return layers
    after, before, samples = _end_to_end(spec, out_dir, adapter_dir, tokenizer, probe.to(dev), eval_prompts,
                                         dtype, dev, stats.base_weights)
    diff = (after - before).abs()
    rel = float(diff.mean() / before.abs().mean().clamp_min(1e-6))
    if not torch.isfinite(after).all() or rel > tol:
        raise PermanentError(
            f"merge: merged model disagrees with base+adapter (relative logit error {rel:.2e} > {tol:.0e}); "
            "try merge.dtype: bfloat16, or publish the adapter alone (merge.enabled: false)",
            reason=MERGE_FAILED,
        )
    return MergeCheck(name, rel, float(diff.max()), tol, stats.max_abs_weight, samples, "logits",
                      stats.layer_relative_error)


@torch.no_grad()
def _end_to_end(spec, out_dir, adapter_dir, tokenizer, probe, eval_prompts, dtype, dev, base_weights):
    """The merged model as written (loaded back), its logits and samples; then the same model with the base
    weights put back into the adapted layers and the adapter applied by peft: the reference logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from runner.model.load import generate

    merged = AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype, device_map={"": dev},
                                                  trust_remote_code=spec.model.trust_remote_code)
    merged.eval()
    after = merged(input_ids=probe).logits.float()
    samples = generate(merged, tokenizer, eval_prompts, spec.eval_max_new_tokens)
    for key in list(base_weights):
        try:
            param = merged.get_parameter(key)
        except AttributeError as e:
            raise PermanentError(f"merge: the merged model has no parameter {key} to check the merge on",
                                 reason=MERGE_FAILED) from e
        param.copy_(base_weights.pop(key))
    model = PeftModel.from_pretrained(merged, adapter_dir)
    model.eval()
    before = model(input_ids=probe).logits.float()
    return after, before, samples
