"""One way to patch a model for a run and undo it.

A patch is an installer, `install(model) -> Patch`, whose `Patch.remove()` restores everything it changed. The
plan's patches (`for_plan`, in the order they are applied):

  layer kernels   Liger's RMSNorm/RoPE/SwiGLU forwards (runner/train/layer_kernels.py), first: the offloaded units
                  call the norms' and MLPs' forward as patched
  offload         offloaded checkpointing units (runner/train/offload.py), for the modes that keep inputs on the host
  fused LoRA      each LoRA projection as one autograd node (runner/train/fused_lora.py)
  compile         each decoder layer compiled (runner/train/compiled.py), last: the graphs trace the patched forwards

`callback(installers)` applies them when training begins and removes them, in reverse order, when it ends; outside
training (evaluation after it, generation, merging) the model computes as loaded. `applied(model, installers)` does
the same around a block.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Protocol

from runner.train import compiled
from runner.train import fused_lora
from runner.train import layer_kernels
from runner.train import offload


class Patch(Protocol):
    def remove(self) -> None:
        """Restore what the patch changed."""


Installer = Callable[[object], Patch]


def for_plan(plan) -> list[Installer]:
    """The patches `plan` (runner.train.plan.Plan) asks for, in the order they are applied."""
    return [install for wanted, install in (
        (plan.layer_kernels, layer_kernels.install),
        (plan.mode.offloaded, lambda model: offload.install(model, plan.mode, plan.kept_attention, plan.gpu_layers)),
        (plan.fused_lora, fused_lora.install),
        (plan.compile, compiled.install),
    ) if wanted]


@contextlib.contextmanager
def applied(model, installers: Iterable[Installer]) -> Iterator[list[Patch]]:
    """The patches applied to `model` inside the block, removed after it in reverse order."""
    done: list[Patch] = []
    try:
        for install in installers:
            done.append(install(model))
        yield done
    finally:
        for patch in reversed(done):
            patch.remove()


class Applied:
    """The patches of one training: applied once, removed once."""

    def __init__(self, installers: Iterable[Installer]) -> None:
        self.installers = list(installers)
        self.block: contextlib.ExitStack | None = None

    def apply(self, model) -> None:
        if self.block is None:
            self.block = contextlib.ExitStack()
            self.block.enter_context(applied(model, self.installers))

    def remove(self) -> None:
        if self.block is not None:
            self.block.close()
            self.block = None


def callback(installers: Iterable[Installer]):
    """A TrainerCallback that applies the patches when training begins and removes them when it ends."""
    from transformers import TrainerCallback

    class Patched(TrainerCallback):
        def __init__(self) -> None:
            self.patches = Applied(installers)

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.patches.apply(model)

        def on_train_end(self, args, state, control, **kw):
            self.patches.remove()

    return Patched()


def remove(trainer) -> None:
    """Remove the patches of `trainer`'s callbacks now: for a training that ended by an exception (on_train_end
    runs only after the last step)."""
    for cb in trainer.callback_handler.callbacks:
        if isinstance(getattr(cb, "patches", None), Applied):
            cb.patches.remove()
