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

With `gpu_layers`, the last that many layers' units keep their inputs on the GPU, as plain checkpointing does: the
plan's choice where host memory cannot hold them all (runner/train/memory.py). They are the first the backward pass
needs, so it starts without waiting for a copy.

With `kept_layers`, a unit's attention of one long sequence also sends its output and log-sum-exp to host memory
(runner/model/kept_attention.py), and the recomputation takes them back instead of running the attention kernel:
at 64k-128k tokens attention is the larger part of a layer's forward, for 2 more bytes per token per hidden unit
per layer of host memory.

`install(model, mode)` patches the units in for one of the memory modes that keep their inputs on the host
(runner/train/memory.py), and its `remove()` undoes that; runner/train/patches.py does both around the training,
after the Liger patches (runner/train/layer_kernels.py: they replace the norms' and MLPs' forward, and the units call
those). The trainer's own gradient checkpointing must be off. Outside training (eval, generation) the units run as
plain modules.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from runner.api.errors import PermanentError
from runner.model import kept_attention
from runner.train import memory
from runner.train.memory import Checkpointing, Mode

_SPLIT_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


@dataclass
class _Saved:
    """One unit's input: in CPU memory, and once brought back, on the GPU with the event that says it is there;
    or kept on the GPU all along (`cpu` None)."""

    cpu: torch.Tensor | None
    gpu: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None
    version: int = 0  # resident: the tensor's version when saved (an in-place change after it is an error)


class _Store:
    """Unit inputs of one forward pass, in pinned CPU memory, in the order they were saved."""

    def __init__(self, kept: _Store | None = None) -> None:
        self.saved: list[_Saved | None] = []  # None: taken back by the backward pass
        self.stream = None
        self.kept = kept  # where the units' attention outputs are kept (None: recomputed)

    def _side(self, device: torch.device):
        if self.stream is None:
            self.stream = torch.cuda.Stream(device)
        return self.stream

    def save(self, x: torch.Tensor, resident: bool = False) -> int:
        """Keep `x` for the backward pass: copied to pinned CPU memory, or (`resident`) on its device as it is."""
        if resident:
            kept = x.detach()  # shares x's storage and version counter
            self.saved.append(_Saved(None, kept, version=kept._version))
            return len(self.saved) - 1
        if not x.is_cuda:  # CPU (tests): the same bookkeeping, a copy instead of a transfer
            self.saved.append(_Saved(x.detach().clone()))
            return len(self.saved) - 1
        side, main = self._side(x.device), torch.cuda.current_stream(x.device)
        cpu = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        side.wait_stream(main)  # x is written
        with torch.cuda.stream(side):
            cpu.copy_(x.detach(), non_blocking=True)
        x.record_stream(side)  # x's memory is not reused before the copy has read it
        self.saved.append(_Saved(cpu))
        return len(self.saved) - 1

    def _fetch(self, slot: int, device: torch.device) -> None:
        entry = self.saved[slot]
        if entry is None or entry.gpu is not None or device.type != "cuda":
            return
        side = self._side(device)
        with torch.cuda.stream(side):
            entry.gpu = torch.empty(entry.cpu.shape, dtype=entry.cpu.dtype, device=device)
            entry.gpu.copy_(entry.cpu, non_blocking=True)
            entry.ready = side.record_event()

    def load(self, slot: int, device: torch.device) -> torch.Tensor:
        """The input saved in `slot`, on `device`; starts bringing back the slot before it (the next backward)."""
        entry = self.saved[slot]
        if entry.cpu is None:  # resident: never left the device
            x = entry.gpu
            if x._version != entry.version:
                raise PermanentError("offloaded checkpointing: a layer's input kept on the GPU was changed in place "
                                     "after the layer ran, so its recomputation would be wrong (this model's layers "
                                     "do not support offloading); leave training.memoryBudget unset, or high enough "
                                     "for plain checkpointing, on a GPU with room for it")
        elif device.type != "cuda":
            x = entry.cpu
        else:
            self._fetch(slot, device)
            main = torch.cuda.current_stream(device)
            main.wait_event(entry.ready)
            x = entry.gpu
            x.record_stream(main)
        if slot > 0:
            self._fetch(slot - 1, device)
        self.saved[slot] = None  # the CPU copy goes back to the pinned-memory cache
        if slot == 0:
            self.saved.clear()  # the pass's backward is done
        return x


# Token-wise units (a norm and the MLP) run over the sequence in chunks of this many tokens, forward and backward:
# their intermediate activations (3 x 14,336 per token for a Llama-3-8B MLP) then take a chunk's worth of memory
# however long the sequence. Chunks this long keep the matmuls as efficient as whole sequences.
CHUNK_TOKENS = memory.CHUNK_TOKENS


def _spans(x: torch.Tensor, chunk: int | None) -> list[slice]:
    n = x.shape[-2]
    if not chunk or n <= chunk:
        return [slice(None)]
    return [slice(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def _chunked(run, x: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """`run(x)` for a token-wise `run` (same shape out as in), a chunk of the sequence (dim -2) at a time."""
    spans = _spans(x, chunk)
    if len(spans) == 1:
        return run(x)
    out = torch.empty_like(x)
    for s in spans:
        out[..., s, :] = run(x[..., s, :])
    return out


def _chunked_backward(run, x: torch.Tensor, grad: torch.Tensor, chunk: int | None) -> torch.Tensor | None:
    """Recompute a token-wise `run` a chunk at a time, each chunk's backward done before the next is recomputed
    (the parameters' gradients accumulate); the gradient of `x`. Call under enable_grad with the RNG state the
    forward pass started from (the chunks consume it in the same order)."""
    spans = _spans(x, chunk)
    dx = torch.zeros_like(x) if len(spans) > 1 else None
    for s in spans:
        xc = x[..., s, :].detach().requires_grad_(True)
        out = run(xc)
        if out.requires_grad:
            torch.autograd.backward(out, grad[..., s, :])
        if dx is None:  # one span: its gradient is the whole input's
            return xc.grad
        if xc.grad is not None:
            dx[..., s, :] = xc.grad
    return dx


class _Recompute:
    """The autocast and RNG state of a forward pass, to recompute it exactly in the backward pass."""

    def __init__(self, x: torch.Tensor) -> None:
        self.device = x.device
        self.autocast = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        self.rng = _rng_state(x.device)

    def __call__(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        stack.enter_context(torch.random.fork_rng(devices=devices))
        stack.enter_context(torch.enable_grad())
        enabled, dtype = self.autocast
        stack.enter_context(torch.autocast(self.device.type, dtype=dtype, enabled=enabled))
        _set_rng_state(self.device, self.rng)
        return stack


class _Offloaded(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, store, flag, chunk, keep, resident, x, *args):  # noqa: ARG004 (flag: output requires grad)
        ctx.run, ctx.store, ctx.args, ctx.device, ctx.chunk = run, store, args, x.device, chunk
        ctx.recompute = _Recompute(x)
        ctx.slot = store.save(x, resident)
        kept = store.kept if keep else None
        with torch.no_grad(), (kept_attention.keeping(kept.save) if kept is not None
                               else contextlib.nullcontext([])) as records:
            out = _chunked(run, x, chunk) if chunk else run(x, *args)
        ctx.records = records
        ctx.is_tuple = isinstance(out, tuple)
        return out

    @staticmethod
    def backward(ctx, *grads):
        x = ctx.store.load(ctx.slot, ctx.device).detach().requires_grad_(True)
        n = len(ctx.args)
        if ctx.chunk:  # token-wise unit: recomputed and back-propagated a chunk at a time
            with ctx.recompute():
                dx = None if grads[0] is None else _chunked_backward(ctx.run, x, grads[0], ctx.chunk)
            ctx.run, ctx.args = None, None
            return (None, None, None, None, None, None, dx, *(None,) * n)
        kept = ctx.store.kept
        with ctx.recompute(), (kept_attention.replaying(lambda slot: kept.load(slot, ctx.device), ctx.records)
                               if ctx.records else contextlib.nullcontext()):
            out = ctx.run(x, *ctx.args)
        outs = out if ctx.is_tuple else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads)
                 if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        ctx.run, ctx.args = None, None
        return (None, None, None, None, None, None, x.grad, *(None,) * n)


class _Tiled(torch.autograd.Function):
    """A token-wise unit checkpointed on the GPU a chunk at a time (its input kept; used inside a recomputed
    layer, where that input is live anyway): a whole sequence's MLP activations never exist at once."""

    @staticmethod
    def forward(ctx, run, flag, chunk, x):  # noqa: ARG004
        ctx.run, ctx.chunk, ctx.recompute = run, chunk, _Recompute(x)
        ctx.save_for_backward(x)
        with torch.no_grad():
            return _chunked(run, x, chunk)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        with ctx.recompute():
            dx = _chunked_backward(ctx.run, x, grad, ctx.chunk)
        ctx.run = None
        return None, None, None, dx


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


def checkpoint(run, store: _Store, x: torch.Tensor, *args, chunk: int | None = None, keep: bool = False,
               resident: bool = False):
    """`run(x, *args)` with its activations recomputed in the backward pass and `x` kept in CPU memory meanwhile
    (`resident`: on the GPU); `chunk`: `run` is token-wise (no args), and runs and is recomputed `chunk` tokens at a
    time; `keep`: its attention's output is kept in `store.kept` for the recomputation."""
    return _Offloaded.apply(run, store, _flag(x.device), chunk, keep, resident, x, *args)


def tiled(run, x: torch.Tensor, chunk: int | None = None):
    """A token-wise `run(x)` a chunk at a time; with grad, checkpointed: recomputed a chunk at a time in backward."""
    chunk = chunk or CHUNK_TOKENS
    if torch.is_grad_enabled():
        return _Tiled.apply(run, _flag(x.device), chunk, x)
    return _chunked(run, x, chunk)


@dataclass(frozen=True)
class _Unit:
    """A norm and the module after it made one unit, with the forwards they had as their own before (None: their
    class's), to put back."""

    norm: torch.nn.Module
    norm_forward: object | None
    module: torch.nn.Module
    forward: object | None

    @classmethod
    def of(cls, norm: torch.nn.Module, module: torch.nn.Module) -> _Unit:
        return cls(norm, vars(norm).get("forward"), module, vars(module).get("forward"))

    def restore(self) -> None:
        for m, own in ((self.norm, self.norm_forward), (self.module, self.forward)):
            if own is None:
                vars(m).pop("forward", None)
            else:
                m.forward = own


class Offload:
    """What `install` changed on a model, to `remove` it again."""

    def __init__(self, model, store: _Store, mode: Mode) -> None:
        self.model, self.store, self.mode = model, store, mode
        self.patched: list[_Unit] = []  # split units, tiled MLPs
        self.layers: list = []  # whole layers checkpointed by transformers' hook

    def remove(self) -> None:
        for unit in reversed(self.patched):
            unit.restore()
        for layer in self.layers:
            layer.gradient_checkpointing = False
        self.patched, self.layers = [], []


def decoder_layers(model) -> list:
    """The model's decoder layers: the modules transformers can checkpoint (GradientCheckpointingLayer)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _splittable(layer) -> bool:
    return all(isinstance(getattr(layer, p, None), torch.nn.Module) for p in _SPLIT_PARTS)


def install(model, mode: Mode = memory.OFFLOADED_SPLIT, kept_layers: int = 0, gpu_layers: int = 0) -> Offload:
    """Offloaded checkpointing on every decoder layer, as `mode` (one of memory.OFFLOADED) checkpoints: whole layers,
    split (attention and MLP halves apart, the MLP a chunk of tokens at a time) or tiled (whole layers, their MLP
    recomputed a chunk at a time: half of split's CPU memory, one more MLP forward). Layers that are not pre-norm
    decoder layers: whole. `kept_layers`: in the first that many layers one sequence's attention output
    (runner/model/kept_attention.py) goes to host memory with the unit's input, and the recomputation skips the
    attention kernel. `gpu_layers`: the last that many layers keep their units' inputs on the GPU."""
    if mode not in memory.OFFLOADED:
        raise ValueError(f"offloaded checkpointing: {mode} is not one of {', '.join(map(str, memory.OFFLOADED))}")
    store = _Store(_Store() if kept_layers else None)
    done = Offload(model, store, mode)
    layers = decoder_layers(model)
    if not layers:
        raise ValueError("offloaded checkpointing: the model has no decoder layers transformers can checkpoint")
    for i, layer in enumerate(layers):
        keep, resident = i < kept_layers, i >= len(layers) - gpu_layers
        if mode.checkpointing is Checkpointing.SPLIT and _splittable(layer):
            _split(layer, store, done, keep, resident)
            continue
        if mode.checkpointing is Checkpointing.TILED and _splittable(layer):
            _tile_mlp(layer, done)
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = lambda fn, x, *a, _keep=keep, _res=resident: checkpoint(
            fn, store, x, *a, keep=_keep, resident=_res)
        done.layers.append(layer)
    return done


def _identity(x, *args, **kwargs):  # noqa: ARG001
    return x


def _split(layer, store: _Store, done: Offload, keep: bool = False, resident: bool = False) -> None:
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

            if not (_module.training and torch.is_grad_enabled()):
                out = run(x)
            else:  # the MLP half is token-wise: run and recomputed a chunk of tokens at a time
                out = checkpoint(run, store, x, chunk=None if _tuple else CHUNK_TOKENS, keep=keep and _tuple,
                                 resident=resident)
            return (out, None) if _tuple else out

        done.patched.append(_Unit.of(norm, module))  # before the patch
        norm.forward, module.forward = _identity, unit


def _tile_mlp(layer, done: Offload) -> None:
    """The post-attention norm and the MLP as one token-wise unit run a chunk of tokens at a time (runner's
    `tiled`): the norm becomes an identity in the layer's own forward and runs inside the unit."""
    norm, mlp = layer.post_attention_layernorm, layer.mlp
    norm_fwd, fwd = norm.forward, mlp.forward

    def unit(x, _norm=norm_fwd, _fwd=fwd, _module=mlp):
        run = lambda h: _fwd(_norm(h))  # noqa: E731
        return tiled(run, x) if _module.training else run(x)

    done.patched.append(_Unit.of(norm, mlp))  # before the patch
    norm.forward, mlp.forward = _identity, unit
