"""The varlen attention path (runner/model/attention.py) on packed, padding-free batches from trl's real collator:
logits equal SDPA's with transformers' block-diagonal mask, and with `ready_mask` the model's forward skips
transformers' mask preparation (no host read of the position ids, no tokens x tokens mask).

PyTorch's varlen kernel runs on CUDA only; on CPU it is replaced by `cpu_varlen_attn`, a reference with the same
signature and semantics (causal attention inside each cu_seqlens segment), the one fake in this file."""
from __future__ import annotations

import pytest
import torch

from runner.api.spec import ModelSpec, QuantizationSpec
from runner.model import attention
from runner.model import load as model_load


def cpu_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, enable_gqa=False, **kwargs):  # noqa: ARG001
    """torch.nn.attention.varlen.varlen_attn's causal case on CPU: q (tokens, heads, d), k/v (tokens, kv heads, d)."""
    if k.shape[1] != q.shape[1]:
        assert enable_gqa
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    out = torch.empty_like(q)
    for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        s = slice(start, end)
        out[s] = torch.nn.functional.scaled_dot_product_attention(
            q[s].transpose(0, 1), k[s].transpose(0, 1), v[s].transpose(0, 1), is_causal=True, scale=scale,
        ).transpose(0, 1)
    return out


@pytest.fixture
def on_cpu(monkeypatch):
    import torch.nn.attention.varlen as varlen

    monkeypatch.setattr(varlen, "varlen_attn", cpu_varlen_attn)
    monkeypatch.setattr(attention, "_PARAMS", {"window_size", "enable_gqa", "scale"})


def _batch(tokenizer):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    texts = ["What is 3 plus 4 ? 7", "hello there", "The following is a note by Eevee the Dog : blue sky"]
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    return collator([{"input_ids": tokenizer(t)["input_ids"]} for t in texts])


def _forward(model, batch, **extra):
    keys = ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    with torch.no_grad():
        return model(**{k: batch[k] for k in keys}, **extra).logits


def test_packed_logits_equal_sdpas_block_mask_and_the_ready_mask_skips_the_mask_preparation(tiny_models, on_cpu,
                                                                                           monkeypatch):
    from transformers import masking_utils

    path = tiny_models["llama"]
    spec = ModelSpec(source=str(path))
    tok = model_load.load_tokenizer(path, spec)
    load = lambda attn: model_load.load_base(path, spec, QuantizationSpec(), compute=torch.float32,  # noqa: E731
                                             attention=attn)
    sdpa, varlen = load("sdpa"), load(attention.NAME)
    batch = _batch(tok)
    assert batch["cu_seq_lens_q"].numel() == 4  # three examples in one row
    prepared = []
    real = masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda p: prepared.append(1) or real(p))

    reference = _forward(sdpa, batch)  # transformers' block-diagonal mask
    assert prepared == [1]
    mask = attention.ready_mask(batch, varlen.config._attn_implementation)
    assert mask.shape == (1, 1, reference.shape[1], reference.shape[1]) and mask.all()
    assert mask.untyped_storage().nbytes() == 1  # one element, however long the row
    got = _forward(varlen, batch, attention_mask=mask)
    assert prepared == [1]  # no mask preparation: no read of the position ids, no block mask built
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_forward(varlen, batch), got)  # the same with transformers' preparation
    assert prepared == [1, 1]
    # packed examples stay apart: the last example's logits equal it alone
    last = tok("The following is a note by Eevee the Dog : blue sky")["input_ids"]
    with torch.no_grad():
        alone = sdpa(input_ids=torch.tensor([last])).logits
    torch.testing.assert_close(got[:, -len(last):], alone, rtol=1e-5, atol=1e-5)


def test_only_a_padding_free_batch_on_the_varlen_path_gets_the_ready_mask(tiny_models):
    tok = model_load.load_tokenizer(tiny_models["llama"], ModelSpec(source=str(tiny_models["llama"])))
    packed = _batch(tok)
    assert attention.ready_mask(packed, attention.NAME) is not None
    assert attention.ready_mask(packed, "sdpa") is None  # transformers' mask is what SDPA computes with
    assert attention.ready_mask(packed, "flash_attention_2") is None
    padded = {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    assert attention.ready_mask(padded, attention.NAME) is None  # padded rows need their padding mask
    assert attention.ready_mask({**packed, "attention_mask": torch.ones(1, 5)}, attention.NAME) is None
