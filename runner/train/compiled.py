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


# Compiler settings for the training, restored after it (module, name, value):
#  - a layer's forward sets a context variable (transformers' kernel registry) that a checkpoint's recompute need not
#    set again: said so, or dynamo falls back to eager for the whole checkpointed layer;
#  - no common-subexpression elimination across forward and backward: fused LoRA dequantises the 4-bit weight again
#    in its backward, and merged with the forward's dequantisation the 16-bit weight would be saved for backward,
#    every layer's (12.4 GiB more for a Llama-3-8B, measured: bench/README.md).
SETTINGS = (("torch._dynamo.config", "skip_fwd_side_effects_in_bwd_under_checkpoint", True),
            ("torch._functorch.config", "cse", False))


class Compiled:
    """The layers `install` compiled, to `remove` the compilation again."""

    def __init__(self, layers: list, settings_before: list) -> None:
        self.layers = layers
        self.settings_before = settings_before

    def remove(self) -> None:
        for layer in self.layers:
            vars(layer).pop("forward", None)  # the class's forward again
        for module, name, value in self.settings_before:
            setattr(module, name, value)
        self.layers, self.settings_before = [], []


def install(model, backend: str = "inductor") -> Compiled:
    """Every decoder layer's forward compiled (none compiled twice); the first step compiles them. Under plain
    checkpointing a layer's forward is transformers' checkpointing wrapper, and the checkpoint is traced into the
    graph (the compiler then decides what to save and what to recompute)."""
    import importlib

    import torch

    layers = [layer for layer in decoder_layers(model) if "forward" not in vars(layer)]
    before = []
    if layers:
        for module_name, name, value in SETTINGS:
            module = importlib.import_module(module_name)
            before.append((module, name, getattr(module, name)))
            setattr(module, name, value)
    for layer in layers:
        layer.forward = torch.compile(layer.forward, backend=backend)
    return Compiled(layers, before)


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
