"""Activation checkpointing whose saved inputs live in CPU memory (Unsloth's "unsloth" checkpointing, extended).

Plain checkpointing keeps every decoder layer's input on the GPU (2 bytes per token per hidden unit per layer:
32 GiB for one 128k-token sequence of a Llama-3-8B) and recomputes the layer in the backward pass. Here each
checkpointed unit's input is copied to pinned CPU memory on a side stream during the forward pass (the GPU copy
is freed as soon as the copy is done), and brought back in the backward pass one unit ahead, on the same side
stream, so the copies overlap the recomputation. The GPU holds the weights, one unit's activations and a couple
of unit inputs in flight, whatever the number of layers.

Units: for the common pre-norm decoder layer (input_layernorm -> self_attn -> residual add ->
post_attention_layernorm -> mlp -> residual add: Llama, Mistral, Qwen2/3) the attention half and the MLP half are
checkpointed separately, norms inside, residual adds outside (an add saves nothing for backward), so only the
larger half's activations are ever live: about half of a whole layer's at long sequences, for the same single
recomputation. Any other architecture checkpoints whole decoder layers (transformers' GradientCheckpointingLayer).

`callback(mode)` installs it when training begins, after the Liger patches (runner/layer_kernels.py: they replace
the norms' and MLPs' forward, and the units call those), and removes it when training ends; the trainer's own gradient
checkpointing must be off. Outside training (eval, generation) the units run as plain modules.
"""
from __future__ import annotations

import torch

_SPLIT_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


class _Store:
    """Unit inputs of one forward pass, in pinned CPU memory, in the order they were saved."""

    def __init__(self) -> None:
        self.saved: list = []  # per slot: [cpu tensor, gpu tensor prefetched or None, event or None]
        self.stream = None

    def _side(self, device: torch.device):
        if self.stream is None:
            self.stream = torch.cuda.Stream(device)
        return self.stream

    def save(self, x: torch.Tensor) -> int:
        if not x.is_cuda:  # CPU (tests): the same bookkeeping, a copy instead of a transfer
            self.saved.append([x.detach().clone(), None, None])
            return len(self.saved) - 1
        side, main = self._side(x.device), torch.cuda.current_stream(x.device)
        cpu = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        side.wait_stream(main)  # x is written
        with torch.cuda.stream(side):
            cpu.copy_(x.detach(), non_blocking=True)
        x.record_stream(side)  # x's memory is not reused before the copy has read it
        self.saved.append([cpu, None, None])
        return len(self.saved) - 1

    def _fetch(self, slot: int, device: torch.device) -> None:
        entry = self.saved[slot]
        if entry[1] is not None or not isinstance(entry[0], torch.Tensor) or device.type != "cuda":
            return
        side = self._side(device)
        with torch.cuda.stream(side):
            gpu = torch.empty(entry[0].shape, dtype=entry[0].dtype, device=device)
            gpu.copy_(entry[0], non_blocking=True)
            entry[1], entry[2] = gpu, side.record_event()

    def load(self, slot: int, device: torch.device) -> torch.Tensor:
        """The input saved in `slot`, on `device`; starts bringing back the slot before it (the next backward)."""
        entry = self.saved[slot]
        if device.type != "cuda":
            x = entry[0]
        else:
            self._fetch(slot, device)
            main = torch.cuda.current_stream(device)
            main.wait_event(entry[2])
            x = entry[1]
            x.record_stream(main)
            if slot > 0:
                self._fetch(slot - 1, device)
        self.saved[slot] = None  # the CPU copy goes back to the pinned-memory cache
        if slot == 0:
            self.saved.clear()  # the pass's backward is done
        return x


class _Offloaded(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, store, flag, x, *args):  # noqa: ARG004 (flag makes the output require grad)
        ctx.run, ctx.store, ctx.args, ctx.device = run, store, args, x.device
        ctx.autocast = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        ctx.rng = _rng_state(x.device)
        ctx.slot = store.save(x)
        with torch.no_grad():
            out = run(x, *args)
        ctx.is_tuple = isinstance(out, tuple)
        return out

    @staticmethod
    def backward(ctx, *grads):
        x = ctx.store.load(ctx.slot, ctx.device).detach().requires_grad_(True)
        enabled, dtype = ctx.autocast
        devices = [ctx.device.index or 0] if ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), \
                torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
            _set_rng_state(ctx.device, ctx.rng)
            out = ctx.run(x, *ctx.args)
        outs = out if ctx.is_tuple else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads)
                 if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        n, ctx.run, ctx.args = len(ctx.args), None, None
        return (None, None, None, x.grad, *(None,) * n)


def _rng_state(device: torch.device):
    cpu = torch.get_rng_state()
    return cpu, torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


_FLAG: dict = {}


def _flag(device: torch.device) -> torch.Tensor:
    """An empty tensor that requires grad: the unit's output then does too, even when its input does not (the
    frozen embeddings' output), so the backward reaches the LoRA weights inside."""
    if device not in _FLAG:
        _FLAG[device] = torch.empty(0, device=device, requires_grad=True)
    return _FLAG[device]


def checkpoint(run, store: _Store, x: torch.Tensor, *args):
    """`run(x, *args)` with its activations recomputed in the backward pass and `x` kept in CPU memory meanwhile."""
    return _Offloaded.apply(run, store, _flag(x.device), x, *args)


class Offload:
    """What `install` changed on a model, to `remove` it again."""

    def __init__(self, model, store: _Store) -> None:
        self.model, self.store = model, store
        self.split: list = []  # (norm, norm forward, module, module forward)
        self.layers: list = []  # whole layers checkpointed by transformers' hook

    @property
    def mode(self) -> str:
        return "split" if self.split else "layer"

    def remove(self) -> None:
        for norm, norm_fwd, module, fwd in self.split:
            norm.forward, module.forward = norm_fwd, fwd
        for layer in self.layers:
            layer.gradient_checkpointing = False
        self.split, self.layers = [], []


def decoder_layers(model) -> list:
    """The model's decoder layers: the modules transformers can checkpoint (GradientCheckpointingLayer)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _splittable(layer) -> bool:
    return all(isinstance(getattr(layer, p, None), torch.nn.Module) for p in _SPLIT_PARTS)


def install(model, split: bool = True) -> Offload:
    store = _Store()
    done = Offload(model, store)
    layers = decoder_layers(model)
    if not layers:
        raise ValueError("offloaded checkpointing: the model has no decoder layers transformers can checkpoint")
    for layer in layers:
        if split and _splittable(layer):
            _split(layer, store, done)
        else:
            layer.gradient_checkpointing = True
            layer._gradient_checkpointing_func = lambda fn, x, *a: checkpoint(fn, store, x, *a)
            done.layers.append(layer)
    return done


def _identity(x, *args, **kwargs):  # noqa: ARG001
    return x


def _split(layer, store: _Store, done: Offload) -> None:
    """Norm + attention and norm + MLP as two checkpointed units: the norms become identities in the layer's own
    forward and run inside the units instead."""
    for norm_name, name, returns_tuple in (("input_layernorm", "self_attn", True),
                                           ("post_attention_layernorm", "mlp", False)):
        norm, module = getattr(layer, norm_name), getattr(layer, name)
        norm_fwd, fwd = norm.forward, module.forward

        def unit(*args, _norm=norm_fwd, _fwd=fwd, _tuple=returns_tuple, _module=module, **kwargs):
            if args:
                x, args = args[0], args[1:]
            else:
                x = kwargs.pop("hidden_states")

            def run(h):
                out = _fwd(_norm(h), *args, **kwargs)
                return out[0] if _tuple else out

            out = checkpoint(run, store, x) if _module.training and torch.is_grad_enabled() else run(x)
            return (out, None) if _tuple else out

        norm.forward, module.forward = _identity, unit
        done.split.append((norm, norm_fwd, module, fwd))


def callback(mode: str):
    """A TrainerCallback that installs offloaded checkpointing ("layer" or "split" units) for the training."""
    from transformers import TrainerCallback

    class OffloadedCheckpointing(TrainerCallback):
        def __init__(self) -> None:
            self.handle: Offload | None = None

        def on_train_begin(self, args, state, control, model=None, **kw):
            if self.handle is None:
                self.handle = install(model, split=mode == "split")

        def on_train_end(self, args, state, control, **kw):
            if self.handle is not None:
                self.handle.remove()
                self.handle = None

    return OffloadedCheckpointing()
