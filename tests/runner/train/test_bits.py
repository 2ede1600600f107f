"""quantization.bits: 4 (QLoRA, the default), 8 (LLM.int8) and 16 (plain LoRA on the base in the compute dtype),
from the plan's memory figures to the merged model and the model card. All of it runs on CPU (bitsandbytes'
int8 kernels run there too)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runner.report import artifacts
from runner.model import load as model_load
from runner.train import fsdp as parallel
from runner.train import plan as plan_phase
from runner.api.errors import PermanentError, SpecError
from runner.api.parse import parse_job
from runner.job import run_job
from runner.merge.shards import Requantize, _requantize
from runner.train.plan import Machine, make_plan
from runner.report.events import Reporter
from runner.train.trainer import fingerprint
from tests.conftest import ROOT, job_doc

GiB = 2**30
CPU = Machine(processes=1)


def _spec(model_dir, **sections):
    return parse_job(job_doc(model_dir, "data.jsonl", "/tmp/out", **sections)).spec


def _bnb_modules(model) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__module__.startswith("bitsandbytes")]


@pytest.mark.parametrize("bits", [16, 8])
def test_a_lora_job_on_a_16bit_or_8bit_base_trains_merges_and_equals_base_plus_adapter(bits, tiny_llama, qa_jsonl,
                                                                                      tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    job = parse_job(job_doc(tiny_llama, qa_jsonl, out, quantization={"bits": bits}, training={"maxSteps": 8},
                            evalPrompts=["Q: What is 3 plus 4 ?\nA:"]))
    buf = io.StringIO()
    run_job(job, Reporter(stdout=buf, stderr=io.StringIO(), termination_log=str(tmp_path / "t")),
            work_dir=tmp_path / "work")
    events = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [e["phase"] for e in events if e["event"] == "phase"] == [
        "Validating", "Downloading", "Training", "Merging", "Uploading"]
    progress = [e for e in events if e["event"] == "progress"]
    assert progress[-1]["step"] == 8 and progress[-1]["loss"] < progress[0]["loss"]  # it learned

    metrics = json.loads((out / "report/metrics.json").read_text())
    assert metrics["plan"]["bits"] == bits
    assert metrics["plan"]["storageDtype"] == ("int8" if bits == 8 else "float32")  # CPU: compute is float32
    assert metrics["mergeCheck"]["method"] == "logits"
    card = (out / "README.md").read_text()
    assert "QLoRA" not in card and "qlora" not in card
    assert ("LoRA on a 16-bit base" if bits == 16 else "LoRA on an 8-bit (LLM.int8) base") in card

    # The merged fp16 model computes what the 16-bit base + the adapter computes (no dequantisation involved).
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float16)
    with_adapter = PeftModel.from_pretrained(base, out / "adapter")
    ids = AutoTokenizer.from_pretrained(out)(["What is 5 plus 2 ?"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits.float(), with_adapter(input_ids=ids).logits.float()
        with with_adapter.disable_adapter():
            plain = with_adapter(input_ids=ids).logits.float()
    assert (a - b).abs().mean() / b.abs().mean() < 1e-2
    assert (plain - b).abs().max() > 1e-3  # the adapter changed the model
    lora_b = {k: v for k, v in load_file(out / "adapter/adapter_model.safetensors").items() if "lora_B" in k}
    assert lora_b and all(v.abs().max() > 0 for v in lora_b.values())  # gradients reached every layer


def test_the_16bit_base_has_no_bitsandbytes_layers_and_the_8bit_base_int8_ones(tiny_llama):
    for bits in (16, 8, 4):
        spec = _spec(tiny_llama, quantization={"bits": bits})
        plan = make_plan(spec, tiny_llama, CPU)
        model = model_load.add_lora(parallel.load_base(spec, tiny_llama, plan), spec.lora)
        bnb = _bnb_modules(model)
        base = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
        if bits == 16:
            assert bnb == [] and base.weight.dtype == torch.float32 and type(base) is torch.nn.Linear
        elif bits == 8:
            assert type(base).__name__ == "Linear8bitLt" and base.weight.dtype == torch.int8
        else:
            assert type(base).__name__ == "Linear4bit"
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable)  # the base is frozen, whatever its bits


def test_fsdp_shards_a_16bit_base_as_it_is_and_computes_what_one_process_does(tiny_llama, tmp_path):
    """FSDP2 over gloo, 2 processes (tests/runner/parallel/fsdp_worker.py): the plain base's weights sharded as they are."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(ROOT / "tests" / "runner" / "parallel" / "fsdp_worker.py"), str(tiny_llama), str(tmp_path), "16"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["bitsandbytesModules"] == 0
        assert r["baseWeightSharded"] and r["localRows"] * 2 == r["fullRows"] == 64
        assert r["loss"] == pytest.approx(r["referenceLoss"], rel=1e-5) and r["maxGradDiff"] < 1e-5
        assert r["maxAdapterDiff"] == 0.0 and r["maxReloadDiff"] == 0.0


@pytest.fixture(scope="module")
def llama_3_8b(tmp_path_factory) -> Path:
    """The Llama-3-8B shape, config only (the plan reads no weights)."""
    from transformers import LlamaConfig

    from bench.training import SHAPES

    d = tmp_path_factory.mktemp("llama-3-8b")
    LlamaConfig(**SHAPES["llama-3-8b"], tie_word_embeddings=False).save_pretrained(d)
    return d


def test_weight_bytes_per_parameter_and_the_strategy_follow_the_bits(llama_3_8b):
    linear = 32 * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336)  # the projections
    dense = 2 * 128256 * 4096 + 65 * 4096  # embeddings, LM head, norms
    h200 = Machine(processes=1, gpu_total=141 * GiB, bf16=True)
    sizes = {bits: make_plan(_spec(llama_3_8b, quantization={"bits": bits}), llama_3_8b, h200).weight_bytes
             for bits in (4, 8, 16)}
    assert sizes[16] == 2 * (linear + dense)
    assert sizes[8] == linear + 4 * (32 * (4096 * 2 + 1024 * 2 + 14336 * 2 + 4096)) + 2 * dense  # + row scales
    assert abs(sizes[4] - (linear * plan_phase.NF4_BYTES + 2 * dense)) < 64
    assert 0.51 < (sizes[4] - 2 * dense) / linear < 0.52  # NF4 + double-quantized block constants
    # Two 16 GiB GPUs: the 4-bit and 8-bit models fit one (data parallel); the 16-bit one is sharded.
    two = Machine(processes=2, gpu_total=16 * GiB, bf16=True)
    strategies = {bits: make_plan(_spec(llama_3_8b, quantization={"bits": bits}, dataset={"maxLength": 1024}),
                                  llama_3_8b, two).strategy for bits in (4, 8, 16)}
    assert strategies == {4: "data", 8: "data", 16: "fsdp"}
    fsdp16 = make_plan(_spec(llama_3_8b, quantization={"bits": 16}, training={"strategy": "fsdp"}), llama_3_8b, two)
    assert fsdp16.storage_dtype == torch.bfloat16 and fsdp16.bits == 16  # shards as it is
    assert "bits=16" in fsdp16.line() and plan_phase.Plan.from_dict(fsdp16.to_dict()) == fsdp16
    # 8 bits never lands on FSDP by itself, even where it does not fit
    tiny_gpus = Machine(processes=2, gpu_total=8 * GiB, bf16=True)
    assert make_plan(_spec(llama_3_8b, quantization={"bits": 8}), llama_3_8b, tiny_gpus).strategy == "data"


@pytest.mark.parametrize("sections, message", [
    ({"quantization": {"bits": 16, "storageDtype": "bfloat16"}},
     "spec.quantization.storageDtype: applies to 4-bit quantization only, and quantization.bits is 16; remove it "
     "or set bits: 4"),
    ({"quantization": {"bits": 8, "quantType": "fp4"}}, "spec.quantization.quantType: applies to 4-bit"),
    ({"quantization": {"bits": 8, "doubleQuant": False}}, "spec.quantization.doubleQuant: applies to 4-bit"),
    ({"quantization": {"bits": 16}, "merge": {"base": "dequantized"}},
     "spec.merge.base: dequantized means .* with quantization.bits 16 nothing was rounded: use original"),
    ({"quantization": {"bits": 8}, "training": {"strategy": "fsdp"}},
     "spec.training.strategy: fsdp cannot shard 8-bit .*; use data or auto, or quantization.bits 4 or 16"),
])
def test_settings_that_belong_to_other_bits_are_refused_by_the_contract(tiny_llama, sections, message):
    """Rules that need only the spec: `runner validate`, the admission webhook and the runner refuse them alike."""
    with pytest.raises(SpecError, match=message):
        _spec(tiny_llama, **sections)


def test_settings_that_fit_their_bits_pass(tiny_llama):
    two_gpus = Machine(processes=2, gpu_total=80 * GiB, bf16=True)
    plan_phase.check_spec(_spec(tiny_llama, quantization={"bits": 8}, merge={"base": "dequantized"}), CPU)
    plan_phase.check_spec(_spec(tiny_llama, quantization={"bits": 16}, training={"strategy": "fsdp"}), two_gpus)
    _spec(tiny_llama, quantization={"bits": 8, "quantType": "nf4"})  # a 4-bit field at its default: nothing to say
    _spec(tiny_llama, quantization={"bits": 16}, merge={"enabled": False, "base": "dequantized"})  # nothing merged


def test_a_base_saved_already_quantized_trains_only_as_4bit(tmp_path):
    four = tmp_path / "four"
    four.mkdir()
    (four / "config.json").write_text(json.dumps({"quantization_config": {"load_in_4bit": True,
                                                                          "quant_method": "bitsandbytes"}}))
    plan_phase.check_prequantized_base(four, 4)
    with pytest.raises(PermanentError, match=r"saved already quantized \(4-bit\), and quantization.bits is 16; use "
                                             "the 16-bit original of this model, or quantization.bits 4"):
        plan_phase.check_prequantized_base(four, 16)
    eight = tmp_path / "eight"
    eight.mkdir()
    (eight / "config.json").write_text(json.dumps({"quantization_config": {"load_in_8bit": True}}))
    for bits in (4, 8):
        with pytest.raises(PermanentError, match=r"\(8-bit\).*use the 16-bit original of this model$"):
            plan_phase.check_prequantized_base(eight, bits)


def test_checkpoints_of_4bit_training_keep_their_fingerprint_and_are_not_resumed_by_other_bits(tiny_llama):
    four = fingerprint(_spec(tiny_llama))
    assert "bits" not in four["spec"]["quantization"]  # as before bits existed: those checkpoints still resume
    assert fingerprint(_spec(tiny_llama, quantization={"bits": 4})) == four
    sixteen = fingerprint(_spec(tiny_llama, quantization={"bits": 16}))
    assert sixteen["sha256"] != four["sha256"] and sixteen["spec"]["quantization"]["bits"] == 16


def test_8bit_dequantized_merge_base_is_the_int8_weight_training_saw(tiny_llama):
    from safetensors.torch import load_file

    spec = _spec(tiny_llama, quantization={"bits": 8})
    model = model_load.load_base(tiny_llama, spec.model, spec.quantization, compute=torch.float32,
                                  attention="sdpa")
    layer = model.model.layers[1].mlp.down_proj
    trained = layer.weight.data.float() * layer.weight.SCB[:, None].float() / 127  # LLM.int8's weight
    original = load_file(tiny_llama / "model.safetensors")["model.layers.1.mlp.down_proj.weight"].float()
    rounded = _requantize(original, Requantize({"k"}, dtype=torch.float32, bits=8))
    assert torch.allclose(rounded, trained, atol=1e-6)
    assert (rounded - original).abs().max() > 0  # rounding happened


def test_the_model_card_says_qlora_only_for_4bit():
    for bits, method in ((4, "QLoRA (LoRA on a 4-bit NF4/FP4 base)"), (8, "LoRA on an 8-bit (LLM.int8) base"),
                         (16, "LoRA on a 16-bit base")):
        job = parse_job(job_doc("m", "d.jsonl", "/o", quantization={"bits": bits}))
        card = artifacts.model_card(job, {}, merged=True)
        assert f"fine-tuned with {method} from" in card
        assert ("qlora" in card) == (bits == 4) and ("QLoRA" in card) == (bits == 4)
        assert ("quantType" in card) == (bits == 4)  # the 4-bit settings only where they applied
