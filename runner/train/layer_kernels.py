"""Liger's fused layer kernels (RMSNorm, RoPE, SwiGLU), patched into the model by the runner itself.

trl 1.x deprecates `use_liger_kernel` (removed in trl 2) in favour of Hub kernels (`use_kernels`), which are
downloaded from the Hub when the model loads: not something an offline image or an air-gapped cluster can do.
The runner applies the same Liger kernels that flag applied, from the package in the image, so nothing changes in
speed or memory: the layer kernels only. The loss stays trl's fused LM head (the logits are never materialised);
Liger's fused linear cross-entropy is left off, as trl left it off under the old flag.
"""
from __future__ import annotations

# What trl's SFTTrainer passed to Liger under `use_liger_kernel` (trl 1.16): everything but the fused loss.
LIGER_CONFIG = {"fused_linear_cross_entropy": False}


def apply(model) -> None:
    """Patch the (peft-wrapped) model's norms, rotary embedding and MLPs with Liger's kernels, in place."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _apply_liger_kernel_to_instance(model=base, **LIGER_CONFIG)
