"""Offloaded checkpointing (runner/train/offload.py) on a tiny random Llama with LoRA: the loss and every LoRA gradient
equal plain checkpointing's and no checkpointing's, for whole-layer and split (attention / MLP) units, packed rows
included; outside training the model computes as before."""
from __future__ import annotations

import pytest
import torch

from runner.api.errors import PermanentError
from runner.train import memory
from runner.train import offload
from runner.train import patches


def _model(seed: int = 0, attn: str = "sdpa"):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=64, use_cache=False,
                      attn_implementation=attn)
    base = LlamaForCausalLM(cfg).float()
    for p in base.parameters():
        p.requires_grad_(False)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    for name, p in model.named_parameters():  # LoRA B starts at zero: make every gradient path non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    model.train()
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (1, 24), generator=g)
    position_ids = torch.cat([torch.arange(10), torch.arange(14)])[None]  # two packed examples
    return {"input_ids": ids, "labels": ids, "position_ids": position_ids}


def _grads(model, mode: memory.Mode):
    handle = None
    if mode == memory.CHECKPOINTING:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif mode.offloaded:
        handle = offload.install(model, mode)
        real_save, saved = handle.store.save, []
        handle.store.save = lambda x, *a: saved.append(x.shape) or real_save(x, *a)
    loss = model(**_batch()).loss
    loss.backward()
    if handle is not None:  # one saved input per unit: a layer, or its attention and MLP halves
        assert len(saved) == len(offload.decoder_layers(model)) * memory.UNITS[mode.checkpointing]
        assert handle.store.saved == []  # the backward pass took every saved input back
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    if handle is not None:
        handle.remove()
    return loss.detach(), grads


@pytest.mark.parametrize("chunk", [None, 5], ids=["whole", "chunked"])
@pytest.mark.parametrize("mode", memory.OFFLOADED, ids=str)
def test_offloaded_gradients_equal_plain_checkpointing(mode, chunk, monkeypatch):
    """`chunked`: the MLP units (split, tiled) run and are recomputed 5 tokens at a time (5 chunks of the 24)."""
    if chunk:
        monkeypatch.setattr(offload, "CHUNK_TOKENS", chunk)
    ref_loss, ref = _grads(_model(), memory.NO_CHECKPOINTING)
    plain_loss, plain = _grads(_model(), memory.CHECKPOINTING)
    loss, got = _grads(_model(), mode)
    assert len(got) == len(ref) > 0
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(loss, plain_loss)
    for name, g in ref.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(got[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("gpu_layers", [1, 3], ids=["last layer", "every layer"])
@pytest.mark.parametrize("mode", memory.OFFLOADED, ids=str)
def test_inputs_kept_on_the_gpu_are_the_last_layers_and_give_the_same_gradients(mode, gpu_layers):
    """With `gpu_layers`, the last layers' units keep their input where it is (the very tensor, no copy); the
    others' go to host memory; gradients equal plain checkpointing's, and the backward pass takes all back."""
    plain_loss, plain = _grads(_model(), memory.CHECKPOINTING)
    model = _model()
    handle = offload.install(model, mode, gpu_layers=gpu_layers)
    entries, real_save = [], handle.store.save

    def save(x, resident=False):
        slot = real_save(x, resident)
        entries.append((x, handle.store.saved[slot]))
        return slot

    handle.store.save = save
    loss = model(**_batch()).loss
    units = memory.UNITS[mode.checkpointing]
    layers = len(offload.decoder_layers(model))
    assert [e.cpu is None for _, e in entries] == [False] * units * (layers - gpu_layers) + [True] * units * gpu_layers
    assert all(e.gpu is not None and e.gpu.data_ptr() == x.data_ptr() for x, e in entries if e.cpu is None)
    assert all(e.cpu.data_ptr() != x.data_ptr() for x, e in entries if e.cpu is not None)
    loss.backward()
    assert handle.store.saved == []
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    handle.remove()
    torch.testing.assert_close(loss.detach(), plain_loss)
    for name, g in plain.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_an_input_kept_on_the_gpu_and_changed_in_place_afterwards_is_an_error_not_a_wrong_gradient():
    model = _model()
    handle = offload.install(model, memory.OFFLOADED_LAYER, gpu_layers=1)
    loss = model(**_batch()).loss
    (resident,) = [e for e in handle.store.saved if e.cpu is None]  # the last layer's input, the very tensor
    resident.gpu.mul_(2)  # as a layer that scaled its input in place after using it would
    with pytest.raises(PermanentError, match="changed in place.*training.memoryBudget"):
        loss.backward()
    handle.remove()


def test_split_units_are_used_and_removed():
    model = _model()
    layers = offload.decoder_layers(model)
    handle = offload.install(model)
    assert handle.mode == memory.OFFLOADED_SPLIT and len(handle.patched) == 2 * len(layers)
    saved = []
    real_save = handle.store.save
    handle.store.save = lambda x, *a: saved.append(x.shape) or real_save(x, *a)
    model(**_batch()).loss.backward()
    assert len(saved) == 2 * len(layers)  # one saved input per unit
    assert handle.store.saved == []  # the backward pass took every saved input back
    handle.remove()
    assert all(layer.input_layernorm.forward.__self__ is layer.input_layernorm for layer in layers)


def test_outside_training_the_model_is_unchanged():
    model = _model()
    batch = _batch()
    with torch.no_grad():
        before = model(**batch).logits
    handle = offload.install(model)
    with torch.no_grad():
        during = model(**batch).logits
    model.eval()
    eval_logits = model(**batch).logits.detach()
    handle.remove()
    torch.testing.assert_close(during, before)
    torch.testing.assert_close(eval_logits, before)
    assert handle.store.saved == []


def test_a_gradient_accumulation_pass_after_another():
    model = _model()
    handle = offload.install(model)
    for _ in range(2):
        model(**_batch()).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    handle.remove()
    ref_model = _model()
    for _ in range(2):
        ref_model(**_batch()).loss.backward()
    for n, p in ref_model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-6)


def test_the_trainer_trains_through_offloaded_units_when_the_plan_says_so(tiny_llama, tmp_path):
    """make_trainer with an offloaded plan.mode: the units are installed when training begins (after any Liger
    patches) and removed when it ends; the losses equal those of training without checkpointing."""
    import dataclasses

    from bench.training import synthetic_data
    from runner.model import load as model_load
    from runner.train.plan import Machine, make_plan
    from runner.train.trainer import make_trainer
    from tests.runner.train.test_plan import _spec

    losses = {}
    for mode in (memory.NO_CHECKPOINTING, memory.OFFLOADED_SPLIT):
        spec = _spec(tiny_llama, dataset={"maxLength": 64}, training={"batchSize": 2, "gradientCheckpointing": None})
        plan = dataclasses.replace(make_plan(spec, tiny_llama, Machine(processes=1)), packing=True, mode=mode)
        torch.manual_seed(0)
        base = model_load.load_base(tiny_llama, spec.model, spec.quantization, compute=torch.float32,
                                     attention="sdpa")
        model = model_load.add_lora(base, spec.lora)
        tok = model_load.load_tokenizer(tiny_llama, spec.model)
        data = synthetic_data(model.config.vocab_size, 24, 64)
        seen = []
        real_install = offload.install

        def spy(m, mode=memory.OFFLOADED_SPLIT, kept_layers=0, gpu_layers=0):
            handle = real_install(m, mode, kept_layers, gpu_layers)
            seen.append((handle, handle.mode))
            return handle

        offload.install = spy
        try:
            trainer = make_trainer(spec, model, tok, data, tmp_path / str(mode), plan, max_steps=3, save_strategy="no",
                                   logging_steps=1, shuffle_dataset=False, dataloader_num_workers=0)
            trainer.train()
        finally:
            offload.install = real_install
        losses[mode] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert len(seen) == (1 if mode.offloaded else 0)
        if mode.offloaded:
            assert seen[0][1] == mode and seen[0][0].patched == []  # removed when training ended
    assert len(losses[memory.NO_CHECKPOINTING]) == 3
    assert losses[memory.OFFLOADED_SPLIT] == pytest.approx(losses[memory.NO_CHECKPOINTING], rel=1e-4)


def test_patches_are_removed_in_reverse_order_also_when_the_block_fails():
    """runner/train/patches.py: the plan's patches (fused LoRA over offloaded units here) go on in order and come off
    in reverse, leaving every forward as it was, even when what ran between raised."""
    from runner.train import fused_lora

    model = _model()
    forwards = {n: m.forward for n, m in model.named_modules()}
    order = []

    def traced(name, install):
        def wrapped(m):
            handle = install(m)
            order.append(f"+{name}")
            real = handle.remove
            handle.remove = lambda: (order.append(f"-{name}"), real())
            return handle
        return wrapped

    with pytest.raises(RuntimeError, match="step failed"):
        with patches.applied(model, [traced("offload", offload.install), traced("lora", fused_lora.install)]) as done:
            assert len(done) == 2 and done[0].patched and done[1].layers
            raise RuntimeError("step failed")
    assert order == ["+offload", "+lora", "-lora", "-offload"]
    assert {n: m.forward for n, m in model.named_modules()} == forwards
    assert not [n for n, m in model.named_modules() if "forward" in vars(m)]  # every module's class forward again


def test_what_a_patch_that_cannot_undo_itself_changed_is_undone():
    """runner/train/layer_kernels.Recorded undoes Liger's in-place patching. liger-kernel needs a GPU build of triton,
    so here a stand-in does what Liger's instance patching does (runner image test: tests/e2e/test_docker.py): binds a
    forward and a name on every norm and MLP, sets attributes, rebinds the RoPE function and the norm class in the
    model's modeling module and torch's cross-entropy."""
    import types

    import torch.nn.functional as F
    from transformers.models.llama import modeling_llama

    from runner.train import layer_kernels

    model = _model()
    names = {k: getattr(modeling_llama, k) for k in ("apply_rotary_pos_emb", "LlamaRMSNorm")}
    cross_entropy = F.cross_entropy
    with torch.no_grad():
        before = model(**_batch()).logits

    def like_liger():
        for m in model.modules():
            if type(m).__name__ in ("LlamaRMSNorm", "LlamaMLP"):
                m.forward = types.MethodType(lambda self, x: x * 0, m)
                m._get_name = types.MethodType(lambda self: "Patched", m)
                m.offset = 0.0
        modeling_llama.apply_rotary_pos_emb = lambda *a, **k: None
        modeling_llama.LlamaRMSNorm = torch.nn.Identity
        F.cross_entropy = lambda *a, **k: None

    with patches.applied(model, [lambda m: layer_kernels.Recorded(m, like_liger)]):
        assert modeling_llama.LlamaRMSNorm is torch.nn.Identity and F.cross_entropy is not cross_entropy
        assert "forward" in vars(model.get_base_model().model.norm)
    assert {k: getattr(modeling_llama, k) for k in names} == names and F.cross_entropy is cross_entropy
    assert not [n for n, m in model.named_modules() if {"forward", "_get_name", "offset"} & set(vars(m))]
    with torch.no_grad():
        torch.testing.assert_close(model(**_batch()).logits, before)
