"""Compiled decoder layers (training.compile, runner/train/compiled.py): on a tiny Llama of 4 layers loaded in 4 bits
with fused LoRA, compiled layers give the eager loss and every LoRA gradient, without and with plain checkpointing,
from graphs shared by the layers; `remove` restores the eager forward. The plan compiles where the spec asks and it
can run, the contract refuses compile under FSDP, and switching it does not stop a checkpoint from resuming."""
from __future__ import annotations

import pytest
import torch

from runner.api.parse import parse_job
from runner.train import compiled
from runner.train import fused_lora
from runner.train import memory
from runner.train import plan as plan_phase
from runner.train.offload import decoder_layers
from runner.train.plan import Machine, make_plan
from tests.conftest import corpus, job_doc, run_cli

GiB = 2**30


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    from runner.quickstart.tiny import build_tiny_model

    return build_tiny_model("llama", tmp_path_factory.mktemp("llama4"), corpus(), layers=4)


def _spec(model_dir, **training):
    return parse_job(job_doc(model_dir, "data.jsonl", "/tmp/out", training=training)).spec


def _train(model_dir, compile_layers: bool, checkpointing: bool):
    """Two steps' losses, the LoRA gradients of the second, and the graphs dynamo compiled for the layers."""
    from torch._dynamo.utils import counters

    from runner.model import load as model_load
    from runner.train import fsdp as parallel

    spec = _spec(model_dir)
    plan = make_plan(spec, model_dir)
    torch.manual_seed(0)
    model = model_load.add_lora(parallel.load_base(spec, model_dir, plan), spec.lora)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # zero at init: make the B path non-trivial
            torch.nn.init.normal_(p, std=0.05)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fused = fused_lora.install(model)
    torch._dynamo.reset()
    counters.clear()
    patch = compiled.install(model) if compile_layers else None
    losses, saved = [], {}

    def pack(t):  # what the forward pass keeps for the backward pass, by storage
        if t.device.type == "cpu" and not isinstance(t, torch.nn.Parameter):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    for step in range(2):
        model.zero_grad()
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2 + step))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    graphs = counters["stats"]["unique_graphs"]
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    if patch is not None:
        assert len(patch.layers) == 4
        patch.remove()
        assert all("forward" not in vars(layer) for layer in decoder_layers(model))  # eager again
    fused.remove()
    return losses, grads, graphs, sum(saved.values())


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-checkpointing", "plain-checkpointing"])
def test_compiled_layers_train_as_eager_ones(llama4, checkpointing):
    ref_losses, ref, _, ref_saved = _train(llama4, False, checkpointing)
    losses, got, graphs, saved = _train(llama4, True, checkpointing)
    # no more kept for the backward pass than eager keeps (the dequantised weights kept as well: 1.6x here)
    assert saved <= 1.25 * ref_saved, (saved, ref_saved)
    # one graph serves every layer: two without checkpointing (the first layer's input needs no gradient), one with
    # it (the checkpoint is inside the graph); 4 layers compiled separately would be 4, an eager fallback 0
    assert graphs == (1 if checkpointing else 2)
    for a, b in zip(losses, ref_losses):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert got.keys() == ref.keys() and len(got) == 4 * 7 * 2  # every LoRA A and B of q k v o gate up down
    for name in got:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6)


def test_the_plan_compiles_where_asked_and_where_it_runs(tiny_llama):
    cpu = Machine(processes=1)
    assert make_plan(_spec(tiny_llama), tiny_llama, cpu).compile is False  # off unless asked
    assert make_plan(_spec(tiny_llama, compile=True), tiny_llama, cpu).compile is True
    gpu = Machine(processes=1, gpu_total=80 * GiB, bf16=True, liger=True)
    plain = make_plan(_spec(tiny_llama), tiny_llama, gpu)
    asked = make_plan(_spec(tiny_llama, compile=True), tiny_llama, gpu)
    assert plain.layer_kernels is True and plain.compile is False
    assert asked.compile is True and asked.layer_kernels is False  # the compiler fuses what Liger fuses
    assert "compile=True" in asked.line()
    both = make_plan(_spec(tiny_llama, compile=True, fusedKernels=True), tiny_llama, gpu)
    assert both.compile is True and both.layer_kernels is True  # a setting in the spec wins
    # not with checkpointing offloaded to CPU memory (its units copy on a side stream inside the layer), not
    # under FSDP (chosen by strategy auto for a model that does not fit one GPU)
    spec = _spec(tiny_llama, compile=True)
    assert plan_phase.compiled(spec, "single", memory.CHECKPOINTING) is True
    for mode in (memory.OFFLOADED_LAYER, memory.OFFLOADED_SPLIT, memory.OFFLOADED_TILED):
        assert plan_phase.compiled(spec, "single", mode) is False
    assert plan_phase.compiled(spec, "fsdp", memory.NO_CHECKPOINTING) is False


def test_a_job_with_compiled_layers_trains_and_says_what_compiling_cost(tmp_path, tiny_llama, qa_jsonl):
    code, events, stderr, _ = run_cli(tmp_path, job_doc(tiny_llama, qa_jsonl, tmp_path / "out",
                                                        training={"compile": True}))
    assert code == 0, stderr[-3000:]
    assert "compile=True" in stderr  # the plan's line
    assert "compile: the first step took" in stderr
    assert events[-1]["phase"] == "Succeeded"


def test_compile_under_fsdp_is_refused_naming_the_field(tmp_path, tiny_llama, qa_jsonl):
    code, _, stderr, _ = run_cli(tmp_path, job_doc(tiny_llama, qa_jsonl, tmp_path / "out",
                                                   training={"compile": True, "strategy": "fsdp"}))
    assert code == 2
    assert "spec.training.compile: compiled layers do not run under FSDP" in stderr
    assert "Traceback" not in stderr


def test_switching_compile_keeps_a_checkpoint_resumable(tiny_llama):
    from runner.train.trainer import fingerprint

    assert fingerprint(_spec(tiny_llama))["sha256"] == fingerprint(_spec(tiny_llama, compile=True))["sha256"]
    assert fingerprint(_spec(tiny_llama))["sha256"] != fingerprint(_spec(tiny_llama, epochs=2))["sha256"]
