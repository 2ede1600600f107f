"""Compiled decoder layers (training.compile): regional compilation, as torchtune and Unsloth do it.

Each decoder layer is compiled with `torch.compile` in place (`nn.Module.compile`); the layers share one code
object, and dynamo takes their weights as graph inputs, so one graph serves every layer: two in practice, for the
first layer, whose input (the frozen embeddings' output) needs no gradient, and for the rest. Inside the graph are
the 4-bit dequantisation (bitsandbytes' registered op), the fused LoRA projections (runner/train/fused_lora.py:
their forward and written-out backward are traced), the norms, rotary embedding, attention and MLP, which the
compiler fuses; the embeddings, the LM head and the loss stay eager. The first training step pays the
compilation (its time is logged); every later step reuses the graphs.

`install(model)` compiles the layers for one training and `Compiled.remove()` restores their eager forward;
runner/train/patches.py applies it last, after fused LoRA, when the plan's `compile` is on.
"""
from __future__ import annotations

import time
from typing import Callable

from runner.train.offload import decoder_layers


class Compiled:
    """The layers `install` compiled, to `remove` the compilation again."""

    def __init__(self, layers: list, skipped_before: bool) -> None:
        self.layers = layers
        self.skipped_before = skipped_before

    def remove(self) -> None:
        import torch._dynamo.config

        for layer in self.layers:
            vars(layer).pop("forward", None)  # the class's forward again
        if self.layers:
            torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = self.skipped_before
        self.layers = []


def install(model, backend: str = "inductor") -> Compiled:
    """Every decoder layer's forward compiled (none compiled twice); the first step compiles them.

    Under plain checkpointing a layer's forward is transformers' checkpointing wrapper, and the checkpoint is
    traced into the graph (the compiler then decides what to save and what to recompute). The layer's forward sets
    a context variable (transformers' kernel registry) that a recompute need not set again: dynamo is told so,
    or it would fall back to eager for the whole layer."""
    import torch
    import torch._dynamo.config

    layers = [layer for layer in decoder_layers(model) if "forward" not in vars(layer)]
    skipped = torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint
    if layers:
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for layer in layers:
        layer.forward = torch.compile(layer.forward, backend=backend)
    return Compiled(layers, skipped)


def callback(log: Callable[[str], None]):
    """A TrainerCallback that logs what compiling cost: the first step's time (it compiles) and the second's."""
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.began = 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.began = time.monotonic()

        def on_step_end(self, args, state, control, **kw):
            if len(self.seconds) < 2:
                self.seconds.append(time.monotonic() - self.began)
                if len(self.seconds) == 2:
                    first, second = self.seconds
                    log(f"compile: the first step took {first:.1f} s (compiling the layers), the second "
                        f"{second:.2f} s")

    return StepTimes()
