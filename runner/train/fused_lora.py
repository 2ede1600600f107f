"""LoRA projections as one autograd node each (Unsloth's `matmul_lora`): y = x W^T + s (x A^T) B^T.

peft computes a LoRA projection as separate modules: the base layer's output, a defensive copy of it, x A^T,
(x A^T) B^T, a multiplication by the scale and an addition, each a pass over the (tokens x out_features)
output in both directions, and the autograd graph of all of them. Here the LoRA product is accumulated into the
base output by the matrix multiply itself (`addmm_`, beta 1, alpha s), and the backward pass is written out:

    dx = dy W + s (dy B) A        dB = s dy^T (x A^T)        dA = s (dy B)^T x

with W the 16-bit weight (4-bit weights are dequantised again in the backward pass, as bitsandbytes does, so
nothing of the size of W is kept). Saved for backward: x and the small x A^T, as in peft.

It applies in training mode, on LoRA layers with one active plain adapter (no DoRA, no dropout: `lora.dropout`
> 0 keeps peft's path) over a bitsandbytes 4-bit or a 16-bit `nn.Linear` base; every other case, eval and
generation keep peft's forward. `install(model)` patches the layers, `Installed.remove()` restores them;
runner/train/patches.py does both around the training when the plan's `fused_lora` is on.
"""
from __future__ import annotations

import torch


def _dequantized(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight as a (out, in) tensor of `dtype`."""
    weight = base.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        return weight.to(dtype)
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight.data, state).to(dtype)


class _LoraMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, b, base, scale, dtype):
        w = _dequantized(base, dtype)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        a_, b_ = a.to(dtype), b.to(dtype)
        xa = x2 @ a_.t()
        out = x2 @ w.t()
        out.addmm_(xa, b_.t(), alpha=scale)
        if base.bias is not None:
            out += base.bias.to(dtype)
        ctx.save_for_backward(x2, xa, a, b)
        ctx.base, ctx.scale, ctx.dtype, ctx.shape, ctx.x_dtype = base, scale, dtype, x.shape, x.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, xa, a, b = ctx.saved_tensors
        dtype, s = ctx.dtype, ctx.scale
        dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)
        a_, b_ = a.to(dtype), b.to(dtype)
        dyb = dy2 @ b_  # (tokens, r)
        da = db = dx = None
        if ctx.needs_input_grad[2]:
            db = (dy2.t() @ xa).mul_(s).to(b.dtype)
        if ctx.needs_input_grad[1]:
            da = (dyb.t() @ x2).mul_(s).to(a.dtype)
        if ctx.needs_input_grad[0]:
            dx = dy2 @ _dequantized(ctx.base, dtype)
            dx.addmm_(dyb, a_, alpha=s)
            dx = dx.view(ctx.shape).to(ctx.x_dtype)
        ctx.base = None
        return dx, da, db, None, None, None


def lora_matmul(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, base: torch.nn.Module, scale: float,
                dtype: torch.dtype) -> torch.Tensor:
    """x W^T + scale (x a^T) b^T (+ bias), computed in `dtype`, W the base layer's (dequantised) weight."""
    return _LoraMatmul.apply(x, a, b, base, float(scale), dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _plain_adapter(layer) -> str | None:
    """The one active adapter of a LoRA layer the fused path can run, or None."""
    active = list(getattr(layer, "active_adapters", []))
    if len(active) != 1 or getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False):
        return None
    name = active[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name):
        return None
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return None
    return name


def fusable(layer) -> bool:
    """A peft LoRA layer over a 4-bit bitsandbytes or a 16-bit nn.Linear base, with a plain adapter."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(layer, LoraLayer) or _plain_adapter(layer) is None:
        return False
    base = layer.get_base_layer()
    if getattr(base.weight, "quant_state", None) is not None:
        return base.weight.dtype == torch.uint8 and getattr(base.weight, "quant_type", "nf4") in ("nf4", "fp4")
    return type(base) is torch.nn.Linear and base.weight.dtype in (torch.bfloat16, torch.float16, torch.float32)


class Installed:
    """The layers `install` patched, to `remove` the patch again."""

    def __init__(self, layers: list) -> None:
        self.layers = layers

    def remove(self) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)  # the class's forward again
        self.layers = []


def install(model) -> Installed:
    """Every fusable LoRA layer of `model` computes its training forward as one `lora_matmul`."""
    layers = [m for m in model.modules() if fusable(m) and "forward" not in vars(m)]  # not patched twice
    for layer in layers:
        original = layer.forward  # bound method of the class

        def forward(x, *args, _layer=layer, _original=original, **kwargs):
            # training mode, with or without grad: an offloaded unit's no-grad forward computes as its recompute
            name = _plain_adapter(_layer) if _layer.training and not args and not kwargs else None
            if name is None:
                return _original(x, *args, **kwargs)
            return lora_matmul(x, _layer.lora_A[name].weight, _layer.lora_B[name].weight, _layer.get_base_layer(),
                               _layer.scaling[name], _compute_dtype(x))

        layer.forward = forward
    return Installed(layers)
