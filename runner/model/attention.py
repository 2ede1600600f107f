"""Document-masked attention for packed rows, from PyTorch's own varlen flash kernel.

Packed, padding-free batches are one flat row whose position ids restart at every example; trl's collator
also passes `cu_seq_lens_q/k` and `max_length_q/k`. With those, `torch.nn.attention.varlen.varlen_attn`
computes causal attention inside each example only, skipping the cross-example blocks entirely (SDPA with a
block-diagonal mask computes them and throws them away). Anything else (padded batches, generation with a
KV cache) falls back to SDPA with transformers' usual masks. Such a batch needs no mask at all, so `ready_mask`
gives the model a stand-in that spares transformers' mask preparation (a host read and an s x s mask per forward).
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch

from runner.model import kept_attention

NAME = "varlen"


def available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _cu_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    cu = torch.cat([starts, torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)
    return cu, int(cu.diff().max())


def ready_mask(inputs: Mapping, attn_implementation: str) -> torch.Tensor | None:
    """For a padding-free batch (trl's `cu_seq_lens_q`, no attention mask) on the varlen path: a 4D all-True mask
    held in one element, which transformers takes as made already. Its own preparation would read the position ids
    back to the host (`find_packed_sequence_indices`) and build a (tokens x tokens) block mask every forward, and
    varlen_attention_forward reads neither for such a batch (its sequences come from cu_seq_lens; a single-token
    batch attends to itself). None for any other batch or attention."""
    ids = inputs.get("input_ids")
    if (attn_implementation != NAME or "cu_seq_lens_q" not in inputs or inputs.get("attention_mask") is not None
            or ids is None or ids.dim() != 2):
        return None
    rows, tokens = ids.shape
    return torch.ones((1, 1, 1, 1), dtype=torch.bool, device=ids.device).expand(rows, 1, tokens, tokens)


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: query (b, h, s, d), key/value (b, h_kv, s, d) -> (b, s, h, d)."""
    from torch.nn.attention.varlen import varlen_attn
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    position_ids = kwargs.get("position_ids")
    packed = (
        query.shape[0] == 1
        and query.shape[2] > 1
        and key.shape[2] == query.shape[2]  # no KV cache in play
        and (cu is not None or position_ids is not None)
    )
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    if cu is None:
        cu, max_len = _cu_seqlens(position_ids)
    else:
        cu, max_len = cu.to(torch.int32), int(kwargs.get("max_length_q") or cu.diff().max())
    _, hq, s, d = query.shape
    hkv = key.shape[1]
    if cu.numel() == 2:  # the row is one sequence: plain causal attention, where cuDNN's Hopper kernel is faster
        return single_sequence(query, key, value, scaling), None
    q = query.transpose(1, 2).reshape(s, hq, d)
    k = key.transpose(1, 2).reshape(s, hkv, d)
    v = value.transpose(1, 2).reshape(s, hkv, d)
    extra = _causal_kwargs()
    if hq != hkv:
        if "enable_gqa" in _params():
            extra["enable_gqa"] = True
        else:
            k = k.repeat_interleave(hq // hkv, dim=1)
            v = v.repeat_interleave(hq // hkv, dim=1)
    out = varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scaling, **extra)
    return out.reshape(1, s, hq, d), None


def single_sequence(query, key, value, scaling=None) -> torch.Tensor:
    """Causal attention of one sequence (b=1, h, s, d) -> (1, s, h, d): SDPA, preferring cuDNN's kernel, then
    flash-attention 2, then memory-efficient attention (no backend here materialises the s x s scores). Inside
    an offloaded checkpoint unit, the kernel's output is kept for its recomputation (runner/model/kept_attention.py)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kept = kept_attention.attend(query, key, value, scaling)
    if kept is not None:
        return kept.transpose(1, 2)

    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    gqa = query.shape[1] != key.shape[1]
    try:
        context = sdpa_kernel(backends, set_priority=True)
    except TypeError:  # PyTorch without backend priorities: its own order
        context = sdpa_kernel(backends)
    with context:
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                                               enable_gqa=gqa)
    return out.transpose(1, 2)


_PARAMS: set[str] | None = None


def _params() -> set[str]:
    global _PARAMS
    if _PARAMS is None:
        from torch.nn.attention.varlen import varlen_attn

        _PARAMS = set(inspect.signature(varlen_attn).parameters)
    return _PARAMS


def _causal_kwargs() -> dict:
    # The causal flag moved from `is_causal` to `window_size=(-1, 0)` across PyTorch releases.
    return {"is_causal": True} if "is_causal" in _params() else {"window_size": (-1, 0)}


def register() -> str:
    """Make `attn_implementation="varlen"` loadable by transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, varlen_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
