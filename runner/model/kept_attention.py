"""Causal attention of one sequence whose output outlives a recomputation.

Checkpointing recomputes each layer's forward in the backward pass, and at long sequences attention is the costliest
part of that forward (quadratic in the length; the projections are linear). Inside `keeping(save)`, each call of
`attend` runs the attention kernel itself and hands its log-sum-exp and output to `save` (runner/train/offload.py
sends them to host memory beside the layer's input); inside `replaying(load)` the recomputation takes them back
instead of running the kernel again, and the backward pass runs that kernel's own backward from them. Outside both
`attend` returns None and the caller runs SDPA as usual (runner/model/attention.py's single_sequence).

The kernels are PyTorch's own, called as SDPA calls them: cuDNN's on CUDA (the fastest for one sequence on Hopper),
the flash kernel for CPU elsewhere (the tests). Grouped-query attention expands the key and value heads first, so
the kernel's backward sees as many heads as queries and autograd sums their gradients back. Attention those kernels
do not take (`keepable`: on CUDA cuDNN's limits, 16-bit with heads up to 128 wide on an Ampere or newer GPU), or
whose forward kernel refuses it, is left to SDPA in the forward and the recomputation alike, as without keeping.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class Record:
    """One attention call kept: what `save` returned for its log-sum-exp and its output (taken back in the reverse
    order), and the kernel's small values its backward needs besides."""

    lse: object
    out: object
    aux: tuple = ()


@dataclass
class _Keeping:
    save: Callable[[torch.Tensor], object]
    records: list[Record | None] = field(default_factory=list)  # None: a call the kernel refused (SDPA ran)


@dataclass
class _Replaying:
    load: Callable[[object], torch.Tensor]
    records: list[Record | None]


_STATE = threading.local()  # .active: the _Keeping or _Replaying of the unit being computed, if any


@contextlib.contextmanager
def keeping(save: Callable[[torch.Tensor], object]) -> Iterator[list[Record | None]]:
    """Attention calls inside run their kernel and keep its results through `save`; yields their Records."""
    state = _Keeping(save)
    previous, _STATE.active = getattr(_STATE, "active", None), state
    try:
        yield state.records
    finally:
        _STATE.active = previous


@contextlib.contextmanager
def replaying(load: Callable[[object], torch.Tensor], records: list[Record | None]) -> Iterator[None]:
    """Attention calls inside take their kept results back (`load`), in the order `keeping` kept them."""
    previous, _STATE.active = getattr(_STATE, "active", None), _Replaying(load, list(records))
    try:
        yield
    finally:
        _STATE.active = previous


_REFUSED: list[str] = []  # the first refusal's message, logged once


def _refused(error: RuntimeError) -> None:
    if not _REFUSED:
        _REFUSED.append(str(error).splitlines()[0] if str(error) else type(error).__name__)
        logging.getLogger(__name__).warning("kept attention: the attention kernel refused these inputs (%s); their "
                                            "attention is recomputed instead", _REFUSED[0])


# ------------------------------------------------------------------------------------------------ kernels
def _forward(q, k, v, scale):
    """(out, lse, aux) of causal attention, q/k/v (b, h, s, d) with as many heads each."""
    if q.is_cuda:
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, True, False, scale=scale)
        return out, lse, (seed, offset, cum_q, cum_k, max_q, max_k)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
    return out, lse, ()


def _backward(grad, q, k, v, out, lse, aux, scale):
    if q.is_cuda:
        seed, offset, cum_q, cum_k, max_q, max_k = aux
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            grad, q, k, v, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, True, scale=scale)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(grad, q, k, v, out, lse, 0.0, True,
                                                                               scale=scale)


class _Replayed(torch.autograd.Function):
    """The kept output as the attention of the recomputed q, k, v: no forward kernel; the kernel's backward."""

    @staticmethod
    def forward(ctx, q, k, v, out, lse, aux, scale):
        ctx.aux, ctx.scale = aux, scale
        ctx.save_for_backward(q, k, v, out, lse)
        return out.detach()

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        if grad.stride() != out.stride():
            grad = torch.empty_like(out).copy_(grad)  # the kernel's backward reads it in its output's layout
        dq, dk, dv = _backward(grad, q, k, v, out, lse, ctx.aux, ctx.scale)
        ctx.aux = None
        return dq, dk, dv, None, None, None, None


def _expand(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(b, h, s, d) -> (b, heads, s, d), each head repeated, laid out as the queries are (tokens outermost)."""
    b, h, s, d = x.shape
    if h == heads:
        return x
    return x.transpose(1, 2)[:, :, :, None].expand(b, s, h, heads // h, d).reshape(b, s, heads, d).transpose(1, 2)


def keepable(query: torch.Tensor) -> bool:
    """Whether the kept path's kernels take attention of these queries, forward and backward: on CUDA cuDNN's (fp16
    or bf16, heads up to 128 wide in steps of 8, compute capability 8.0 or newer; called directly, so SDPA's backend
    switches do not apply); on CPU the flash kernel (any floating dtype). The same answer in the forward and its
    recomputation."""
    if not query.is_cuda:
        return True
    d = query.shape[-1]
    return (query.dtype in (torch.float16, torch.bfloat16) and d <= 128 and d % 8 == 0
            and torch.backends.cudnn.is_available() and torch.cuda.get_device_capability(query.device) >= (8, 0))


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None) -> torch.Tensor | None:
    """Causal attention of one sequence, (b, h, s, d) -> (b, h, s, d), kept or replayed; None outside both and
    where the kernels do not take it (the caller runs SDPA)."""
    state = getattr(_STATE, "active", None)
    if state is None or not keepable(query):
        return None
    heads = query.shape[1]
    q, k, v = query, _expand(key, heads), _expand(value, heads)
    if isinstance(state, _Keeping):
        try:
            out, lse, aux = _forward(q, k, v, scale)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:  # the kernel refused these inputs: SDPA now, and again in the recomputation
            _refused(e)
            state.records.append(None)
            return None
        lse_token = state.save(lse)  # first, so that the output comes back first (and the lse with it)
        state.records.append(Record(lse_token, state.save(out.transpose(1, 2)), aux))
        return out
    record = state.records.pop(0)
    if record is None:
        return None
    out = state.load(record.out).transpose(1, 2)
    lse = state.load(record.lse)
    return _Replayed.apply(q, k, v, out, lse, record.aux, scale)
