"""Kept attention (runner/model/kept_attention.py) under offloaded checkpointing (runner/train/offload.py), on a tiny
random Llama with LoRA and grouped-query heads, one sequence per row through the varlen attention path: the loss and
every LoRA gradient equal no checkpointing's, the attention kernel runs once per layer (the recomputation replays
its kept output), and every kept tensor is taken back by the backward pass. Plus the plan's rule."""
from __future__ import annotations

import pytest
import torch

from runner.model import attention
from runner.model import kept_attention
from runner.train import memory
from runner.train import offload
from tests.runner.train import test_offload as offload_test

LAYERS = 3  # test_offload._model's


def _model(seed: int = 0, attn: str = attention.NAME):
    """test_offload's tiny Llama with LoRA (3 layers, 4 query heads over 2 key/value heads), on `attn`."""
    attention.register()
    return offload_test._model(seed, attn)


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (1, 40), generator=g)
    return {"input_ids": ids, "labels": ids, "position_ids": torch.arange(40)[None]}  # one sequence


def _train(model, passes: int = 1):
    losses = []
    for i in range(passes):  # gradient accumulation: each pass's forward, then its backward
        losses.append(model(**_batch(seed=1 + i)).loss)
        losses[-1].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return [loss.detach() for loss in losses], grads


@pytest.mark.parametrize("passes", [1, 2], ids=["one pass", "two passes"])
@pytest.mark.parametrize("mode", memory.OFFLOADED, ids=str)
def test_kept_attention_gradients_equal_no_checkpointing_and_the_kernel_runs_once(mode, passes, monkeypatch):
    ref_losses, ref = _train(_model(attn="sdpa"), passes)
    calls = []
    real_forward = kept_attention._forward
    monkeypatch.setattr(kept_attention, "_forward", lambda *a: calls.append(1) or real_forward(*a))
    model = _model()
    handle = offload.install(model, mode, keep_attention=True)
    kept = handle.store.kept
    saved = []
    real_save = kept.save
    kept.save = lambda x: saved.append(tuple(x.shape)) or real_save(x)
    losses, got = _train(model, passes)
    handle.remove()
    # the kernel ran in each forward only: the recomputations replayed it
    assert len(calls) == LAYERS * passes
    # per layer and pass: the log-sum-exp (1, heads, tokens) and the output (1, tokens, heads, head dim)
    assert saved == [(1, 4, 40), (1, 40, 4, 8)] * LAYERS * passes
    assert kept.saved == [] and handle.store.saved == []  # the backward passes took everything back
    for a, b in zip(losses, ref_losses):
        torch.testing.assert_close(a, b)
    assert len(got) == len(ref) > 0
    for name, g in ref.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_without_keep_attention_the_recomputation_runs_attention_again(monkeypatch):
    """The counter above can fail: offloaded units without kept attention never call the kept kernel."""
    calls = []
    monkeypatch.setattr(kept_attention, "_forward", lambda *a: calls.append(1))
    model = _model()
    handle = offload.install(model, memory.OFFLOADED_LAYER)
    assert handle.store.kept is None
    _train(model)
    handle.remove()
    assert calls == []


def test_outside_units_attention_is_plain_sdpa():
    model = _model()
    handle = offload.install(model, memory.OFFLOADED_SPLIT, keep_attention=True)
    with torch.no_grad():
        during = model(**_batch()).logits
    model.eval()
    eval_logits = model(**_batch()).logits.detach()
    handle.remove()
    with torch.no_grad():
        before = _model()(**_batch()).logits
    torch.testing.assert_close(during, before)
    torch.testing.assert_close(eval_logits, before)
    assert handle.store.kept.saved == []


@pytest.mark.parametrize(("mode", "attn", "host", "kept"), [
    (memory.OFFLOADED_LAYER, attention.NAME, None, True),
    (memory.OFFLOADED_SPLIT, attention.NAME, 10**12, True),
    (memory.OFFLOADED_LAYER, attention.NAME, 1_500_000_000, False),  # host memory holds the inputs, not the outputs too
    (memory.OFFLOADED_LAYER, "sdpa", None, False),
    (memory.CHECKPOINTING, attention.NAME, None, False),
])
def test_the_plan_keeps_attention_with_offloaded_units_on_the_varlen_path_where_host_memory_holds_it(
        mode, attn, host, kept):
    from runner.train.plan import kept_attention as rule

    shape = memory.Shape(layers=32, hidden=4096, max_length=4096, layer_kernels=True)
    tokens = 4096  # inputs alone: 1 GiB; with the outputs: about 2 GiB
    assert (memory.host_bytes(memory.OFFLOADED_LAYER, tokens, shape) < 1_500_000_000
            < memory.host_bytes(memory.OFFLOADED_LAYER, tokens, shape, kept_attention=True))
    assert rule(mode, attn, tokens, shape, host) is kept
