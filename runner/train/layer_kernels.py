"""Liger's fused layer kernels (RMSNorm, RoPE, SwiGLU), patched into the model by the runner itself, and undone.

trl 1.x deprecates `use_liger_kernel` (removed in trl 2) in favour of Hub kernels (`use_kernels`), which are
downloaded from the Hub when the model loads: not something an offline image or an air-gapped cluster can do.
The runner applies the same Liger kernels that flag applied, from the package in the image, so nothing changes in
speed or memory: the layer kernels only. The loss stays trl's fused LM head (the logits are never materialised);
Liger's fused linear cross-entropy is left off, as trl left it off under the old flag.

Liger patches in place and cannot undo itself: `install` records what it changed (runner/train/patches.py's one way
to patch a model for a run) so that `remove` restores it.
"""
from __future__ import annotations

import sys
from typing import Callable

# What trl's SFTTrainer passed to Liger under `use_liger_kernel` (trl 1.16): everything but the fused loss.
LIGER_CONFIG = {"fused_linear_cross_entropy": False}
_MISSING = object()


class Recorded:
    """A patch that `apply()` makes to `model`, undone from what it changed: attributes set on the model's modules
    (a bound `forward`, say) and names rebound in the Python modules that define their classes and in
    torch.nn.functional (a model's RoPE function, its norm and MLP classes, the cross-entropy)."""

    def __init__(self, model, apply: Callable[[], object]) -> None:
        import torch

        modules = list(model.modules())
        spaces = {sys.modules[type(m).__module__] for m in modules if type(m).__module__ in sys.modules}
        spaces.add(torch.nn.functional)
        before = {m: dict(vars(m)) for m in modules}
        names = {s: dict(vars(s)) for s in spaces}
        apply()
        self.changed = [(m, k, before[m].get(k, _MISSING)) for m in modules
                        for k, v in vars(m).items() if before[m].get(k, _MISSING) is not v]
        self.changed += [(s, k, names[s].get(k, _MISSING)) for s in spaces
                         for k, v in vars(s).items() if names[s].get(k, _MISSING) is not v]

    def remove(self) -> None:
        for target, key, old in reversed(self.changed):
            if old is _MISSING:
                vars(target).pop(key, None)
            else:
                setattr(target, key, old)
        self.changed = []


def install(model) -> Recorded:
    """Patch the (peft-wrapped) model's norms, rotary embedding and MLPs with Liger's kernels, in place."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return Recorded(model, lambda: _apply_liger_kernel_to_instance(model=base, **LIGER_CONFIG))
