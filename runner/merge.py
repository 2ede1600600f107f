"""Merge phase: reload the base in 16-bit (never merge into 4-bit layers), fold the adapter in, and prove
the merged model still computes what base+adapter computed, with no fp16 overflow."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from runner.api.errors import PermanentError, MERGE_FAILED
from runner.model import device
from runner.api.spec import FineTuneJobSpec

FP16_MAX = 65504.0
# Relative mean |logit difference| allowed between base+adapter and the merged weights. A broken merge
# (wrong scale, wrong layers, 4-bit rounding) is off by O(1); 16-bit rounding of W + BA is measured at
# ~1e-3 on tiny models and ~9e-3 (fp16) on a random-initialised Llama-3-8B, whose logits are near-uniform.
TOLERANCE = {"float16": 3e-2, "bfloat16": 8e-2}


@dataclass
class MergeCheck:
    dtype: str
    relative_error: float
    max_abs_error: float
    tolerance: float
    max_abs_weight: float
    samples: list[str]


def probe_inputs(tokenizer, texts: list[str], n: int = 4, max_tokens: int = 64) -> torch.Tensor:
    """A few real inputs to compare logits on (the first training texts, or a fixed sentence)."""
    picked = [t for t in texts if t.strip()][:n] or ["The quick brown fox jumps over the lazy dog."]
    enc = [tokenizer(t, truncation=True, max_length=max_tokens)["input_ids"] for t in picked]
    length = min(len(e) for e in enc)
    return torch.tensor([e[:length] for e in enc])


@torch.no_grad()
def _dequantized(quantized, dtype: torch.dtype, dev, trust_remote_code: bool):
    """A base saved already in 4-bit has no 16-bit weights: merge into its dequantized weights (what the
    adapter was trained against), in a plain 16-bit model that saves without any 4-bit loading state."""
    from transformers import AutoModelForCausalLM

    state = quantized.dequantize().to(dtype).state_dict()  # also drops config.quantization_config
    with torch.device(dev):
        base = AutoModelForCausalLM.from_config(quantized.config, dtype=dtype, trust_remote_code=trust_remote_code)
    missing, unexpected = base.load_state_dict(state, strict=False)  # tied weights appear once
    if unexpected or (missing and not getattr(base.config.get_text_config(), "tie_word_embeddings", False)):
        raise PermanentError(f"merge: the dequantized base does not fit its own architecture (missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}); set merge.enabled: false to publish "
                             "the adapter alone", reason=MERGE_FAILED)
    return base


def merge(
    spec: FineTuneJobSpec,
    base_dir: Path,
    adapter_dir: Path,
    tokenizer,
    probe: torch.Tensor,
    out_dir: Path,
    eval_prompts: list[str],
) -> MergeCheck:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from runner.model import generate

    name = spec.merge.dtype
    dtype = getattr(torch, name)
    dev = device()
    base = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=dtype, device_map={"": dev}, trust_remote_code=spec.model.trust_remote_code
    )
    if getattr(base.config, "quantization_config", None) is not None:
        base = _dequantized(base, dtype, dev, spec.model.trust_remote_code)
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    probe = probe.to(dev)
    before = model(input_ids=probe).logits.float()
    merged = model.merge_and_unload()
    after = merged(input_ids=probe).logits.float()

    diff = (after - before).abs()
    rel = float(diff.mean() / before.abs().mean().clamp_min(1e-6))
    max_w = 0.0
    for pname, p in merged.state_dict().items():
        if not p.dtype.is_floating_point:
            continue
        if not torch.isfinite(p).all():
            raise PermanentError(
                f"merge: merged weight {pname} has inf/NaN in {name}; set merge.dtype: bfloat16",
                reason=MERGE_FAILED,
            )
        max_w = max(max_w, float(p.abs().max()))
    if name == "float16" and max_w >= FP16_MAX:
        raise PermanentError(
            f"merge: a merged weight reaches {max_w:.0f}, beyond float16's range; set merge.dtype: bfloat16",
            reason=MERGE_FAILED,
        )
    tol = TOLERANCE[name]
    if not torch.isfinite(after).all() or rel > tol:
        raise PermanentError(
            f"merge: merged model disagrees with base+adapter (relative logit error {rel:.2e} > {tol:.0e}); "
            "try merge.dtype: bfloat16, or publish the adapter alone (merge.enabled: false)",
            reason=MERGE_FAILED,
        )
    samples = generate(merged, tokenizer, eval_prompts, spec.eval_max_new_tokens)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return MergeCheck(name, rel, float(diff.max()), tol, max_w, samples)
