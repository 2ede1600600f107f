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


@pytest.mark.parametrize("kept", [LAYERS, 2], ids=["every layer", "2 of 3 layers"])
@pytest.mark.parametrize("passes", [1, 2], ids=["one pass", "two passes"])
@pytest.mark.parametrize("mode", memory.OFFLOADED, ids=str)
def test_kept_attention_gradients_equal_no_checkpointing_and_the_kernel_runs_once(mode, passes, kept, monkeypatch):
    ref_losses, ref = _train(_model(attn="sdpa"), passes)
    calls = []
    real_forward = kept_attention._forward
    monkeypatch.setattr(kept_attention, "_forward", lambda *a: calls.append(1) or real_forward(*a))
    model = _model()
    handle = offload.install(model, mode, kept_layers=kept)
    store = handle.store.kept
    saved = []
    real_save = store.save
    store.save = lambda x: saved.append(tuple(x.shape)) or real_save(x)
    losses, got = _train(model, passes)
    handle.remove()
    # the kernel ran in the kept layers' forward only: their recomputations replayed it
    assert len(calls) == kept * passes
    # per kept layer and pass: the log-sum-exp (1, heads, tokens) and the output (1, tokens, heads, head dim)
    assert saved == [(1, 4, 40), (1, 40, 4, 8)] * kept * passes
    assert store.saved == [] and handle.store.saved == []  # the backward passes took everything back
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


def test_attention_the_kernel_refuses_trains_as_recomputed_attention(monkeypatch):
    """cuDNN refuses some inputs (a GPU, dtype or head width it has no kernel for): the job trains as it does
    without kept attention, over gradient accumulation too, instead of failing."""
    ref_losses, ref = _train(_model(attn="sdpa"), passes=2)

    def refuse(*args):
        raise RuntimeError("cuDNN Frontend error: No valid execution plans built.")

    monkeypatch.setattr(kept_attention, "_forward", refuse)
    model = _model()
    handle = offload.install(model, memory.OFFLOADED_LAYER, kept_layers=LAYERS)
    losses, got = _train(model, passes=2)
    handle.remove()
    assert handle.store.kept.saved == [] and handle.store.saved == []
    for a, b in zip(losses, ref_losses):
        torch.testing.assert_close(a, b)
    assert len(got) == len(ref) > 0
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(("dtype", "head_dim"), [(torch.float32, 128), (torch.bfloat16, 256), (torch.float16, 100)],
                         ids=["fp32", "heads of 256", "heads of 100"])
def test_cuda_attention_outside_cudnns_limits_is_left_to_sdpa(dtype, head_dim):
    """Where cuDNN's kernels have no support (its backward would fail after a kept forward), nothing is kept: the
    caller's SDPA picks a kernel that runs it, as without kept attention."""
    from types import SimpleNamespace

    query = SimpleNamespace(is_cuda=True, dtype=dtype, shape=(1, 32, 4096, head_dim))  # the rule reads only these
    assert not kept_attention.keepable(query)
    with kept_attention.keeping(lambda x: x) as records:
        assert kept_attention.attend(query, None, None, None) is None
    assert records == []


def test_outside_units_attention_is_plain_sdpa():
    model = _model()
    handle = offload.install(model, memory.OFFLOADED_SPLIT, kept_layers=LAYERS)
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


@pytest.mark.parametrize(("mode", "attn", "host", "room", "kept"), [
    (memory.OFFLOADED_LAYER, attention.NAME, None, float("inf"), 32),
    (memory.OFFLOADED_SPLIT, attention.NAME, 10**12, 2**30, 32),
    (memory.OFFLOADED_LAYER, attention.NAME, 1_500_000_000, 2**30, 12),  # 1 GiB of inputs, 32.6 MiB a kept layer
    (memory.OFFLOADED_LAYER, attention.NAME, 1_000_000_000, 2**30, 0),  # not even the inputs: the mode is not chosen
    (memory.OFFLOADED_LAYER, attention.NAME, None, 2**26, 0),  # no GPU room for the replay (80 MiB at 4k tokens)
    (memory.OFFLOADED_LAYER, "sdpa", None, float("inf"), 0),
    (memory.CHECKPOINTING, attention.NAME, None, float("inf"), 0),
])
def test_the_plan_keeps_attention_with_offloaded_units_on_the_varlen_path_in_as_many_layers_as_host_memory_holds(
        mode, attn, host, room, kept):
    from runner.train.plan import kept_attention as rule

    shape = memory.Shape(layers=32, hidden=4096, max_length=4096, layer_kernels=True)
    tokens = 4096
    assert memory.host_bytes(memory.OFFLOADED_LAYER, tokens, shape) == 2**30
    assert memory.host_bytes(memory.OFFLOADED_LAYER, tokens, shape, kept_layers=32) > 2 * 2**30
    assert rule(mode, attn, tokens, shape, host, room) == kept


def test_the_plan_sizes_kept_attention_by_the_query_heads_not_the_hidden_size():
    """Qwen3-4B-like: hidden 2560, 32 query heads of 128: the kept outputs are 4096 wide."""
    from runner.train.plan import kept_attention as rule

    narrow = memory.Shape(layers=36, hidden=2560, max_length=4096, layer_kernels=True)
    wide = memory.Shape(layers=36, hidden=2560, max_length=4096, layer_kernels=True, attention=4096)
    assert memory.kept_bytes(4096, wide) == pytest.approx(memory.kept_bytes(4096, narrow) * 4096 / 2560, rel=1e-6)
    host = memory.host_bytes(memory.OFFLOADED_LAYER, 4096, wide) + 20 * memory.kept_bytes(4096, wide)
    assert rule(memory.OFFLOADED_LAYER, attention.NAME, 4096, wide, host, float("inf")) == 20
    assert rule(memory.OFFLOADED_LAYER, attention.NAME, 4096, narrow, host, float("inf")) == 32
