"""FSDP-QLoRA and the strategy choice: what runs without GPUs.

The sharded path itself runs here on real bitsandbytes 4-bit layers with FSDP2 over gloo (2 processes), and
so does the runner's own loader (runner.parallel.fsdp_load: each rank reads only its shard), with each process's peak RSS
measured; the full trainer path under FSDP needs GPUs (accelerate enables FSDP only there) and is measured by
`bash bench/gpu/fsdp-load.sh`, `bench/gpu/fsdp-job.sh`, `bench/gpu/fsdp-70b.sh` and `bench/gpu/job-70b.sh`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runner.train import plan as plan_phase
from runner.api.errors import PermanentError
from runner.api.parse import parse_job
from tests.conftest import ROOT, job_doc, run_cli

GiB = 2**30


def _spec(model, max_length: int = 32, **training):
    return parse_job(job_doc(model, "data.jsonl", "/tmp/out", training=training,
                             dataset={"maxLength": max_length})).spec


def _strategy(spec, model_dir, world: int, gpu_bytes: int | None) -> str:
    machine = plan_phase.Machine(processes=world, gpu_total=gpu_bytes, bf16=True)
    return plan_phase.make_plan(spec, model_dir, machine).strategy


def test_two_processes_shard_the_4bit_model_and_compute_what_one_process_does(tiny_llama, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(ROOT / "tests" / "runner" / "parallel" / "fsdp_worker.py"), str(tiny_llama), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # Each rank holds half of every 4-bit weight...
        assert r["baseWeightSharded"] and r["localRows"] * 2 == r["fullRows"]
        # ...and gets the loss and LoRA gradients of the unsharded model.
        assert r["loss"] == pytest.approx(r["referenceLoss"], rel=1e-5)
        assert r["maxGradDiff"] < 1e-5
        # The adapter gathered from the shards is the model's, and it survives save + load into shards.
        assert r["adapterTensors"] == 2 * 7 * 2  # lora_A and lora_B on 7 projections in 2 layers
        assert r["maxAdapterDiff"] == 0.0 and r["maxReloadDiff"] == 0.0
    saved = tmp_path / "adapter"
    assert (saved / "adapter_model.safetensors").is_file() and (saved / "adapter_config.json").is_file()


def _torchrun(*args, timeout: int = 300) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(ROOT / "tests" / "runner" / "parallel" / "fsdp_worker.py"), *map(str, args)],
        capture_output=True, text=True, env=env, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def _assert_equals_the_whole_model(r: dict) -> None:
    # Every base weight and quantization state this rank gathers is what the usual whole-model load gives...
    assert r["maxBaseWeightDiff"] == 0.0 and r["maxQuantStateDiff"] == 0.0
    assert r["quantStates"] == 2 * 7 if r["adapterTensors"] == 2 * 7 * 2 else r["quantStates"] > 0
    # ...the loss (in float32, as logged) and LoRA gradients are the unsharded model's...
    assert r["lossDtype"] == "torch.float32" and r["loss"] == pytest.approx(r["referenceLoss"], rel=1e-6)
    assert r["maxGradDiff"] < 1e-6
    # The adapters and their gradients share the compute dtype, so the fused AdamW step runs (and moves them).
    assert r["adapterDtypes"] == r["gradDtypes"] == ["torch.float32"] and r["optimizerStepChanged"]
    # ...and the adapters start as peft starts them: B zero, A kaiming-uniform within 1/sqrt(fan_in).
    assert r["initialLoraBMax"] == 0.0 and 0.5 * r["loraABound"] < r["initialLoraAMax"] <= r["loraABound"]


def test_each_rank_reads_only_its_shard_of_a_16bit_base_and_computes_what_the_whole_model_does(tiny_llama, tmp_path):
    _torchrun("sharded", tiny_llama, tmp_path)
    for r in _ranks(tmp_path):
        assert r["how"] == "sharded" and r["localParamBytes"] * 2 == r["modelParamBytes"]
        _assert_equals_the_whole_model(r)


@pytest.fixture(scope="module")
def prequantized_170mb(tmp_path_factory) -> Path:
    """A random 4-bit model big enough that its weights, not the interpreter, dominate a process's memory:
    12 layers of 1024 wide, 201M 4-bit parameters, ~172 MB as loaded."""
    from transformers import BitsAndBytesConfig, LlamaConfig

    from bench import prequantize

    config = LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=12, num_attention_heads=16,
                         num_key_value_heads=16, vocab_size=8192, tie_word_embeddings=False)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
    return prequantize.write(config, tmp_path_factory.mktemp("pq170") / "model", quant,
                             device=torch.device("cpu"), seed=1)


def test_each_fsdp_rank_holds_only_its_own_shard_in_cpu_memory(prequantized_170mb, tmp_path):
    """Peak RSS of each of the 2 processes while loading, from the kernel's high-water mark (reset just before
    the load): the runner's loader against the old way (every rank loads the whole model, then FSDP shards it)."""
    _torchrun("sharded", prequantized_170mb, tmp_path / "sharded")
    _torchrun("sharded", prequantized_170mb, tmp_path / "full", "full")
    MB = 2**20
    for new, old in zip(_ranks(tmp_path / "sharded"), _ranks(tmp_path / "full")):
        model = new["modelParamBytes"]
        assert model > 160 * MB and new["localParamBytes"] * 2 == model
        # The old way peaks above a whole copy of the model in every process, rank 1 included...
        assert old["peakGrowth"] > model
        # ...each rank now peaks well below a whole copy: its half, plus one tensor read at a time, the
        # quantization states (read whole) and the skeleton (measured: 0.72 of the model at the peak, 0.62 held).
        assert new["peakGrowth"] < 0.8 * model
        assert new["peakGrowth"] - new["localParamBytes"] < 0.3 * model
        assert new["heldGrowth"] - new["localParamBytes"] < 0.2 * model
        _assert_equals_the_whole_model(new)


def test_one_process_is_single_and_cpu_ranks_are_data_parallel(tiny_llama):
    spec = _spec(tiny_llama)
    assert _strategy(spec, tiny_llama, world=1, gpu_bytes=80 * GiB) == "single"
    assert _strategy(spec, tiny_llama, world=2, gpu_bytes=None) == "data"
    assert _strategy(_spec(tiny_llama, strategy="fsdp"), tiny_llama, world=2, gpu_bytes=80 * GiB) == "fsdp"


def test_fsdp_without_gpus_is_refused_naming_the_field(tiny_llama):
    with pytest.raises(PermanentError, match="training.strategy: fsdp .* needs them"):
        _strategy(_spec(tiny_llama, strategy="fsdp"), tiny_llama, world=2, gpu_bytes=None)


@pytest.fixture(scope="module")
def llama_70b_config(tmp_path_factory) -> Path:
    from transformers import LlamaConfig

    from bench.training import SHAPES

    d = tmp_path_factory.mktemp("llama-3-70b")
    LlamaConfig(**SHAPES["llama-3-70b"], tie_word_embeddings=False).save_pretrained(d)
    return d


def test_auto_picks_data_parallel_where_the_4bit_70b_fits_and_fsdp_where_it_does_not(llama_70b_config):
    spec = _spec(llama_70b_config, max_length=2048, batchSize=4)  # 4 packed rows of 2048 per step
    size = plan_phase.make_plan(spec, llama_70b_config, plan_phase.Machine(gpu_total=141 * GiB, bf16=True)).weight_bytes
    assert 36 * GiB < size < 40 * GiB  # 4-bit layers (~0.52 B/param) + bf16 embeddings and head
    assert _strategy(spec, llama_70b_config, world=2, gpu_bytes=141 * GiB) == "data"  # H200
    assert _strategy(spec, llama_70b_config, world=2, gpu_bytes=80 * GiB) == "data"  # H100
    assert _strategy(spec, llama_70b_config, world=4, gpu_bytes=48 * GiB) == "fsdp"  # L40S
    assert _strategy(spec, llama_70b_config, world=8, gpu_bytes=24 * GiB) == "fsdp"  # L4
    forced = _spec(llama_70b_config, max_length=2048, strategy="data")
    assert _strategy(forced, llama_70b_config, world=8, gpu_bytes=24 * GiB) == "data"


def test_storage_dtype_follows_the_strategy():
    spec = parse_job(job_doc("m", "d.jsonl", "/o")).spec
    assert plan_phase.storage_dtype(spec, "data", torch.bfloat16) == torch.uint8
    assert plan_phase.storage_dtype(spec, "fsdp", torch.bfloat16) == torch.bfloat16
    explicit = parse_job(job_doc("m", "d.jsonl", "/o", quantization={"storageDtype": "uint8"})).spec
    with pytest.raises(PermanentError, match="quantization.storageDtype: .*bfloat16.*set it to bfloat16 or auto"):
        plan_phase.storage_dtype(explicit, "fsdp", torch.bfloat16)


def test_fsdp_trainer_arguments_wrap_each_decoder_layer(tiny_llama, qa_jsonl, tmp_path, monkeypatch):
    from runner.model import load as model_load
    from runner.train.trainer import _training_args

    for var in ("ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING"):  # TrainingArguments sets these
        monkeypatch.setenv(var, os.environ.get(var, "false"))
    spec = parse_job(job_doc(tiny_llama, "data.jsonl", "/tmp/out", training={"strategy": "fsdp"},
                             quantization={"computeDtype": "float32"})).spec
    plan = plan_phase.make_plan(spec, tiny_llama, plan_phase.Machine(processes=2, gpu_total=80 * GiB, liger=True))
    model = model_load.load_base(tiny_llama, spec.model, spec.quantization, compute=torch.float32,
                                  attention="sdpa", load_on=torch.device("cpu"))
    args = _training_args(spec, tmp_path, plan, False, True, model=model)
    assert args.fsdp_config["version"] == 2
    assert args.fsdp_config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert args.fsdp_config["reshard_after_forward"] is True
    assert not args.use_liger_kernel and not plan.layer_kernels  # neither trl's nor the runner's Liger under FSDP


def test_prequantized_model_loads_without_missing_weights_and_matches_its_bf16_layers(tmp_path):
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    from bench import prequantize
    from bench.training import SHAPES

    config = LlamaConfig(**SHAPES["tiny"], tie_word_embeddings=False)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    prequantize.write(config, tmp_path / "pq", quant, device=torch.device("cpu"), seed=3)
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "pq", device_map={"": "cpu"},
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    layer = model.model.layers[1].mlp.down_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.dtype == torch.bfloat16  # FSDP-shardable

    # The same unit rebuilt in bf16 with the same seed: the 4-bit weights are its NF4 rounding.
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    names = [n for n, _ in prequantize.units(skeleton)]
    unit = skeleton.model.layers[1]
    prequantize.materialise(unit, torch.device("cpu"), config.initializer_range, 3 + names.index("model.layers.1"))
    want = unit.mlp.down_proj.weight.float()
    got = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    assert (got - want).norm() / want.norm() < 0.12  # NF4's rounding error on normal weights is ~10%
    assert torch.equal(model.model.layers[1].input_layernorm.weight, unit.input_layernorm.weight)


def test_a_job_on_a_prequantized_base_publishes_a_16bit_merged_model(qa_jsonl, tmp_path):
    from bench.training import build_model
    from runner.quickstart.tiny import build_tokenizer
    from tests.conftest import corpus

    base = build_model("tiny", tmp_path / "base", prequantize="yes")
    build_tokenizer(corpus(), base)  # words the QA data uses
    code, events, stderr, result = run_cli(tmp_path, job_doc(base, qa_jsonl, tmp_path / "out"))
    assert code == 0, stderr[-3000:]
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in out and out["dtype"] == "float16"
    from safetensors import safe_open

    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.layers.0.mlp.down_proj.weight"]
    with safe_open(str(tmp_path / "out" / shard), "pt") as f:
        w = f.get_tensor("model.layers.0.mlp.down_proj.weight")
    assert w.dtype == torch.float16 and tuple(w.shape) == (64, 128)
