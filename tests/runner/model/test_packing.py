"""Packed examples never attend to each other, on every architecture, through trl's real collator."""
from __future__ import annotations

import pytest
import torch

from runner.model import load as model_load
from runner.api.spec import ModelSpec, QuantizationSpec

from tests.conftest import ARCHS


def _collate(examples, tokenizer):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    return collator([{"input_ids": ids, "labels": ids} for ids in examples])


ISOLATED = ("llama", "gpt_neox")  # transformers masks packed examples apart for these


@pytest.mark.parametrize("arch", ISOLATED)
def test_packed_logits_equal_separate_logits(arch, tiny_models):
    path = tiny_models[arch]
    spec = ModelSpec(source=str(path))
    tok = model_load.load_tokenizer(path, spec)
    model = model_load.load_base(path, spec, QuantizationSpec(), compute=torch.float32, attention="sdpa")
    texts = ["What is 3 plus 4 ? 7", "hello there", "The following is a note by Eevee the Dog : blue sky"]
    examples = [tok(t)["input_ids"] for t in texts]

    batch = _collate(examples, tok)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # one flat row, no padding
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        start = 0
        for ids in examples:
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(packed[start:start + len(ids)], alone, atol=1e-4, rtol=1e-4)
            start += len(ids)

    # The first token of each packed example is never a target (it would be predicted from the previous one).
    labels = batch["labels"][0]
    starts = [0, len(examples[0]), len(examples[0]) + len(examples[1])]
    assert all(labels[s] == -100 for s in starts)


def test_without_position_ids_examples_would_leak(tiny_llama):
    """Guard for the test above: the same flat row *without* restarting positions does mix examples."""
    spec = ModelSpec(source=str(tiny_llama))
    tok = model_load.load_tokenizer(tiny_llama, spec)
    model = model_load.load_base(tiny_llama, spec, QuantizationSpec(), compute=torch.float32,
                                  attention="sdpa")
    a, b = tok("hello there")["input_ids"], tok("What is 3 plus 4 ? 7")["input_ids"]
    with torch.no_grad():
        flat = model(input_ids=torch.tensor([a + b])).logits[0, len(a):]
        alone = model(input_ids=torch.tensor([b])).logits[0]
    assert (flat - alone).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_runner_probe_uses_packing_only_where_examples_stay_apart(arch, tiny_models):
    """OPT's masks ignore restarting position ids, so the runner must detect it and train unpacked."""
    path = tiny_models[arch]
    spec = ModelSpec(source=str(path))
    model = model_load.load_base(path, spec, QuantizationSpec(), compute=torch.float32, attention="sdpa")
    assert model_load.packing_is_isolated(model) is (arch in ISOLATED)
