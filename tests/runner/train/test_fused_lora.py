"""Fused LoRA projections (runner/train/fused_lora.py): one autograd node per projection computes what peft's modules
compute - output, input gradient and both LoRA gradients - over a real bitsandbytes 4-bit layer and a 16-bit
nn.Linear, with and without bias; on a whole tiny Llama loaded in 4 bits the loss and every LoRA gradient equal
peft's; layers it cannot run (dropout, eval) keep peft's forward; `remove` restores the layers."""
from __future__ import annotations

import pytest
import torch

from runner.train import fused_lora
from runner.train import offload


class _Net(torch.nn.Module):
    def __init__(self, base: torch.nn.Module) -> None:
        super().__init__()
        self.proj = base

    def forward(self, x):
        return self.proj(x)


def _base(kind: str, bias: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=bias)
    if kind == "nf4":
        import bitsandbytes as bnb

        q = bnb.nn.Linear4bit(64, 48, bias=bias, compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
        if bias:
            q.bias = torch.nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        return q.to("cpu")
    return lin.to(torch.bfloat16 if kind == "bf16" else torch.float32)


def _peft(kind: str, bias: bool, dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_Net(_base(kind, bias)), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"],
                                                                 lora_dropout=dropout))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # zero at init: make the B path non-trivial
            torch.nn.init.normal_(p, std=0.1)
    model.train()
    return model


def _run(model, fused: bool, dtype: torch.dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 64, generator=g).to(dtype).requires_grad_(True)
    handle = fused_lora.install(model) if fused else None
    y = model(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    if handle is not None:
        assert len(handle.layers) == 1
        handle.remove()
    return y.detach(), x.grad.clone(), grads


@pytest.mark.parametrize("kind,bias", [("nf4", False), ("nf4", True), ("fp32", True), ("bf16", False)])
def test_fused_projection_equals_peft(kind, bias):
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    y_ref, dx_ref, g_ref = _run(_peft(kind, bias), False, dtype)
    y, dx, g = _run(_peft(kind, bias), True, dtype)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    assert y.dtype == y_ref.dtype and dx.dtype == dx_ref.dtype
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(dx, dx_ref, **tol)
    assert g.keys() == g_ref.keys() and len(g) == 2
    for name in g:
        assert g[name].dtype == g_ref[name].dtype
        torch.testing.assert_close(g[name], g_ref[name], **tol)


def test_layers_it_cannot_run_keep_peft():
    with_dropout = _peft("nf4", False, dropout=0.1)
    assert not any(fused_lora.fusable(m) for m in with_dropout.modules())
    assert fused_lora.install(with_dropout).layers == []
    model = _peft("fp32", False)
    handle = fused_lora.install(model)
    assert fused_lora.install(model).layers == []  # a patched layer is not patched again
    model.eval()
    with torch.no_grad():  # outside training: peft's own forward (its result computed as peft computes it)
        x = torch.randn(3, 64)
        layer = handle.layers[0]
        assert torch.equal(model(x), type(layer).forward(layer, x))
    handle.remove()
    assert "forward" not in vars(layer)


def test_tiny_llama_in_4_bits_trains_the_same(tiny_llama):
    from runner.model import load as model_load
    from runner.train import fsdp as parallel
    from runner.api.parse import parse_job
    from runner.train.plan import make_plan
    from tests.conftest import job_doc

    spec = parse_job(job_doc(tiny_llama, tiny_llama / "x.jsonl", tiny_llama / "out")).spec
    plan = make_plan(spec, tiny_llama)
    assert spec.quantization.bits == 4 and spec.lora.dropout == 0 and plan.fused_lora  # on by default

    def loss_and_grads(fused: bool):
        torch.manual_seed(0)
        model = model_load.add_lora(parallel.load_base(spec, tiny_llama, plan), spec.lora)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
        model.train()
        handle = fused_lora.install(model) if fused else None
        if fused:
            n_layers = len(offload.decoder_layers(model))
            assert len(handle.layers) == 7 * n_layers  # q k v o gate up down, each over a 4-bit base
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_loss, ref = loss_and_grads(False)
    loss, got = loss_and_grads(True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert got.keys() == ref.keys()
    for name in got:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6)
