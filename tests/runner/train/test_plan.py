"""The Plan: every automatic choice made in one place, from the spec, the model's config and the machine.

Machines are described (GPU size, installed kernels), so the GPU rules are checked without a GPU.
"""
from __future__ import annotations

import dataclasses
import io
import json

import pytest
import torch

from runner.train import memory
from runner.train.memory import CHECKPOINTING, NO_CHECKPOINTING, OFFLOADED_LAYER, OFFLOADED_SPLIT, OFFLOADED_TILED
from runner.train import plan as plan_phase
from runner.api import errors
from runner.api.errors import PermanentError
from runner.api.parse import parse_job
from runner.train.plan import Machine, Plan, make_plan, usable_bytes
from tests.conftest import job_doc, run_cli

GiB = 2**30
CPU = Machine(processes=1)


def _spec(model_dir, attention: str | None = None, **sections):
    doc = job_doc(model_dir, "data.jsonl", "/tmp/out", **sections)
    if attention:
        doc["spec"]["model"]["attnImplementation"] = attention
    return parse_job(doc).spec


def _gpu(total_gib: float, processes: int = 1, **kw) -> Machine:
    return Machine(processes=processes, gpu_total=int(total_gib * GiB), bf16=True, **kw)


def test_the_one_memory_rule():
    assert usable_bytes(80 * GiB) == int(0.9 * 80 * GiB) - 3 * GiB
    assert usable_bytes(80 * GiB, free=40 * GiB) == 37 * GiB  # a GPU shared with something else
    assert usable_bytes(80 * GiB, free=79 * GiB) == usable_bytes(80 * GiB)


def test_cpu_single_process_plan(tiny_llama):
    spec = _spec(tiny_llama, training={"gradientCheckpointing": None})  # unset: chosen by memory
    plan = make_plan(spec, tiny_llama, Machine(processes=1, liger=True))
    assert plan.strategy == "single" and plan.processes == 1
    assert plan.mode == NO_CHECKPOINTING and plan.layer_kernels is False  # no GPU
    assert plan.fused_lora is True  # fused LoRA runs on CPU too
    assert plan.compute_dtype == torch.float32 and plan.storage_dtype == torch.uint8
    assert plan.attention == "sdpa"
    assert plan.packing is None  # spec asks for packing: settled by probing the loaded model
    assert plan.gpu_total_bytes is None and plan.gpu_usable_bytes is None
    assert plan.micro_batch == 2 and plan.micro_batch_tokens == 2 * 32
    assert 0 < plan.weight_bytes == plan.gpu_weight_bytes < 2**20  # the tiny model: well under a MiB


def test_a_tiny_model_fits_one_gpu_so_two_processes_are_data_parallel(tiny_llama):
    spec = _spec(tiny_llama, training={"gradientCheckpointing": None})
    plan = make_plan(spec, tiny_llama, _gpu(80, processes=2, liger=True, varlen=True))
    assert plan.strategy == "data" and plan.processes == 2
    assert plan.compute_dtype == torch.bfloat16 and plan.storage_dtype == torch.uint8
    assert plan.layer_kernels is True and plan.fused_lora is True and plan.attention == "varlen"
    assert plan.mode == NO_CHECKPOINTING  # its activations fit
    assert plan.gpu_usable_bytes == usable_bytes(80 * GiB)
    no_bf16 = make_plan(spec, tiny_llama, Machine(processes=1, gpu_total=16 * GiB, bf16=False, flash_attn=True))
    assert no_bf16.compute_dtype == torch.float16 and no_bf16.attention == "flash_attention_2"
    assert no_bf16.layer_kernels is False and no_bf16.fused_lora is True  # liger-kernel not installed there


def test_a_model_that_does_not_fit_one_gpu_is_sharded(tmp_path):
    from transformers import LlamaConfig

    from bench.training import SHAPES

    LlamaConfig(**SHAPES["llama-3-70b"], tie_word_embeddings=False).save_pretrained(tmp_path)
    spec = _spec(tmp_path, dataset={"maxLength": 2048}, training={"batchSize": 4, "gradientCheckpointing": None})
    plan = make_plan(spec, tmp_path, _gpu(24, processes=8, liger=True, varlen=True))
    assert plan.strategy == "fsdp"
    assert plan.weight_bytes + plan.checkpointed_bytes > plan.gpu_usable_bytes
    assert plan.storage_dtype == torch.bfloat16  # FSDP shards only floating-point storage
    assert plan.layer_kernels is False and plan.fused_lora is False  # neither by default under FSDP
    assert plan.gpu_weight_bytes < plan.weight_bytes / 4  # one eighth, plus two gathered layers
    assert plan.packing is True  # varlen keeps packed examples apart; no probe of the CPU-resident base
    assert plan.mode == CHECKPOINTING  # 80 layers of 4x2048 activations never fit 24 GB


def test_checkpointing_is_on_only_when_the_activations_do_not_fit(tiny_llama):
    spec = _spec(tiny_llama, dataset={"maxLength": 4096}, training={"batchSize": 64, "gradientCheckpointing": None})
    small = make_plan(spec, tiny_llama, _gpu(4))  # 4 GiB: 0.6 GiB usable
    big = make_plan(spec, tiny_llama, _gpu(80))
    # 64 rows' activations do not fit 0.6 GiB: the plan trains the same 64 rows per step in smaller micro-batches
    assert small.gpu_weight_bytes + 64 * 4096 * 2 * 64 * memory.ALL_LAYERS_BYTES[False] > small.gpu_usable_bytes
    assert small.micro_batch < 64 and small.micro_batch * small.accumulation == 64
    assert small.gpu_weight_bytes + small.activation_bytes <= small.gpu_usable_bytes or small.mode.checkpointed
    assert small.peak_bytes <= small.gpu_usable_bytes
    assert big.gpu_weight_bytes + big.activation_bytes <= big.gpu_usable_bytes
    assert big.mode == NO_CHECKPOINTING and (big.micro_batch, big.accumulation) == (64, 1)
    forced = _spec(tiny_llama, dataset={"maxLength": 4096}, training={"batchSize": 64, "gradientCheckpointing": True})
    on = make_plan(forced, tiny_llama, _gpu(4))
    assert on.mode.checkpointed and on.micro_batch * on.accumulation == 64  # the spec wins
    forced = _spec(tiny_llama, dataset={"maxLength": 4096}, training={"batchSize": 64, "gradientCheckpointing": False})
    assert make_plan(forced, tiny_llama, _gpu(4)).mode == NO_CHECKPOINTING  # the spec wins
    # Fused kernels keep fewer activations, and the plan counts with the kernels it chose.
    fused = make_plan(spec, tiny_llama, _gpu(80, liger=True))
    assert fused.layer_kernels and fused.activation_bytes < big.activation_bytes


@pytest.fixture(scope="module")
def llama_8b(tmp_path_factory):
    from transformers import LlamaConfig

    from bench.training import SHAPES

    d = tmp_path_factory.mktemp("llama-3-8b")
    LlamaConfig(**SHAPES["llama-3-8b"], tie_word_embeddings=False).save_pretrained(d)
    return d


H200 = _gpu(139.8, liger=True, varlen=True)


def _choice(plan: Plan) -> tuple:
    return plan.mode, plan.micro_batch, plan.accumulation


@pytest.mark.parametrize("budget, expected", [
    (None, (NO_CHECKPOINTING, 4, 1)),  # memory to spare: no checkpointing, 4x2048 in one micro-batch
    (24, (CHECKPOINTING, 4, 1)),  # checkpointing on the GPU beats no checkpointing at 1x2048
    (10, (OFFLOADED_LAYER, 4, 1)),  # the layer inputs go to CPU memory
    (8, (OFFLOADED_LAYER, 2, 2)),  # ... and 2x2048 twice
])
def test_a_memory_budget_chooses_the_fastest_mode_that_fits(llama_8b, budget, expected):
    spec = _spec(llama_8b, dataset={"maxLength": 2048}, training={"batchSize": 4, "memoryBudget": budget, "gradientCheckpointing": None},
                 lora={"r": 32, "alpha": 64})
    plan = make_plan(spec, llama_8b, H200)
    assert _choice(plan) == expected
    assert plan.memory_budget_bytes == (int(budget * GiB) if budget else None)
    lora = memory.lora_bytes(plan_phase.model_load.meta_model(llama_8b, spec.model), spec)
    assert 1.2 * GiB < lora < 1.3 * GiB  # r=32 on the 7 projections of 32 layers: 84M parameters
    if budget:
        assert plan.peak_bytes + lora + memory.BUDGET_MARGIN <= budget * GiB
    mode = expected[0]
    assert f"checkpointing={mode.checkpointing.value} offload={mode.offload.value}" in plan.line()
    assert "estimated peak" in plan.line() and "not applied" not in plan.line()
    if mode in (NO_CHECKPOINTING, CHECKPOINTING):  # the plan's figures and the fit come from one formula
        assert plan.peak_bytes == plan.gpu_weight_bytes + (plan.checkpointed_bytes if mode.checkpointed
                                                           else plan.activation_bytes)
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_one_long_sequence_under_a_budget_is_split_and_offloaded(llama_8b):
    doc = dict(dataset={"maxLength": 131072}, training={"batchSize": 1, "gradientCheckpointing": None}, lora={"r": 32, "alpha": 64})
    free = make_plan(_spec(llama_8b, **doc), llama_8b, H200)
    assert _choice(free) == (CHECKPOINTING, 1, 1)  # 128k tokens: checkpointing, the inputs fit on the GPU
    tight = make_plan(_spec(llama_8b, **{**doc, "training": {"batchSize": 1, "memoryBudget": 29,
                                                                  "gradientCheckpointing": None}}), llama_8b, H200)
    assert _choice(tight) == (OFFLOADED_SPLIT, 1, 1) and tight.peak_bytes < free.peak_bytes / 2
    hopeless = make_plan(_spec(llama_8b, **{**doc, "training": {"batchSize": 1, "memoryBudget": 6,
                                                                      "gradientCheckpointing": None}}), llama_8b, H200)
    assert _choice(hopeless) == (OFFLOADED_TILED, 1, 1) and hopeless.peak_bytes > 6 * GiB  # fails on memory, said why
    assert free.longest_tokens is None and tight.longest_tokens is None  # they fit: nothing to say
    assert hopeless.longest_tokens == 0 and "no mode fits, at any row length" in hopeless.line()  # the base alone
    def short(length: int) -> Plan:  # a 12 GiB budget
        training = {"batchSize": 1, "memoryBudget": 12, "gradientCheckpointing": None}
        return make_plan(_spec(llama_8b, **{**doc, "dataset": {"maxLength": length}, "training": training}),
                         llama_8b, H200)

    longest = short(131072).longest_tokens  # the length to lower dataset.maxLength to, and the plan line says it
    assert 0 < longest < 131072 and f"no mode fits: the longest row this GPU and host fit is {longest} tokens" in (
        short(131072).line())
    for length, fits in ((longest, True), (longest + memory.LENGTH_STEP, False)):
        plan = short(length)
        assert (plan.longest_tokens is None) == fits and (plan.peak_bytes <= plan.gpu_usable_bytes) == fits
    no_ckpt = _spec(llama_8b, dataset={"maxLength": 2048}, lora={"r": 32, "alpha": 64},
                    training={"batchSize": 4, "memoryBudget": 24, "gradientCheckpointing": False})
    assert _choice(make_plan(no_ckpt, llama_8b, H200)) == (NO_CHECKPOINTING, 1, 4)  # the spec wins: smaller micro-batches


@pytest.mark.parametrize("host_gib, expected", [
    (None, OFFLOADED_SPLIT),  # host memory unknown: not a limit
    (100, OFFLOADED_SPLIT),  # 64 GiB of pinned inputs (two per layer) fit in 70% of 100
    (60, OFFLOADED_TILED),  # they do not; one per layer (32 GiB) does: tiled, as little GPU memory, half the CPU memory
    (40, OFFLOADED_TILED),  # 32 GiB > 70% of 40: nothing offloaded fits; the plan still says so (fails on memory)
])
def test_the_offloaded_inputs_must_fit_in_host_memory(llama_8b, host_gib, expected):
    """One 128k-token sequence under a 29 GiB budget: the GPU has room for split offloading, which pins two inputs
    per layer (128k x 4096 x 2 bytes each, 64 in all: 64 GiB); the host may not."""
    machine = dataclasses.replace(H200, host_available=host_gib and host_gib * GiB)
    spec = _spec(llama_8b, dataset={"maxLength": 131072}, lora={"r": 32, "alpha": 64},
                 training={"batchSize": 1, "memoryBudget": 29, "gradientCheckpointing": None})
    plan = make_plan(spec, llama_8b, machine)
    assert _choice(plan) == (expected, 1, 1)
    pinned = memory.host_bytes(expected, 131072, memory.Shape(32, 4096, 131072, layer_kernels=True))
    assert pinned == (64 if expected == OFFLOADED_SPLIT else 32) * GiB
    if host_gib:
        assert (pinned <= memory.HOST_FRACTION * host_gib * GiB) == (host_gib != 40)


def test_where_neither_memory_holds_the_inputs_alone_the_last_layers_stay_on_the_gpu(llama_8b):
    """One 128k-token sequence under a 40 GiB budget, 40 GiB of host memory: every layer's input (32 GiB) neither
    fits beside the GPU's working set nor in 70% of the host; offloaded, with the inputs of as few of the last
    layers as the host needs kept on the GPU, it fits both."""
    shape = memory.Shape(32, 4096, 131072, layer_kernels=True)
    doc = dict(dataset={"maxLength": 131072}, lora={"r": 32, "alpha": 64})
    roomy = make_plan(_spec(llama_8b, training={"batchSize": 1, "memoryBudget": 40, "gradientCheckpointing": None},
                            **doc), llama_8b, dataclasses.replace(H200, host_available=None))
    assert roomy.mode.offloaded and roomy.gpu_layers == 0  # unlimited host: everything offloaded
    machine = dataclasses.replace(H200, host_available=40 * GiB)
    plan = make_plan(_spec(llama_8b, training={"batchSize": 1, "memoryBudget": 40, "gradientCheckpointing": None},
                           **doc), llama_8b, machine)
    host = int(memory.HOST_FRACTION * 40 * GiB)
    assert memory.host_bytes(plan.mode, 131072, shape) > host  # all offloaded: too much for the host
    assert memory.host_bytes(memory.CHECKPOINTING, 131072, shape) == 0  # and all on the GPU: too much for it
    assert plan.gpu_weight_bytes + memory.activation_bytes(CHECKPOINTING, 131072, shape) > plan.gpu_usable_bytes
    assert plan.mode.offloaded and 0 < plan.gpu_layers < 32
    k = plan.gpu_layers  # the fewest: one layer fewer on the GPU and the host is over
    assert memory.host_bytes(plan.mode, 131072, shape, gpu_layers=k) <= host
    assert memory.host_bytes(plan.mode, 131072, shape, gpu_layers=k - 1) > host
    assert plan.peak_bytes == plan.gpu_weight_bytes + memory.activation_bytes(plan.mode, 131072, shape, k)
    assert plan.peak_bytes <= plan.gpu_usable_bytes
    assert f"gpu_layers={k}" in plan.line()
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    # a host that cannot hold what the GPU leaves it: nothing fits; the last mode, its inputs over the host's memory
    starved = make_plan(_spec(llama_8b, training={"batchSize": 1, "memoryBudget": 40, "gradientCheckpointing": None},
                              **doc), llama_8b, dataclasses.replace(H200, host_available=GiB))
    assert starved.mode == OFFLOADED_TILED and starved.gpu_layers == 0 and starved.longest_tokens < 131072
    assert memory.host_bytes(starved.mode, 131072, shape) > GiB


def test_every_mode_costs_what_the_one_formula_says():
    """One 128k-token sequence of a Llama-3-8B shape, fused kernels: the GPU bytes of each mode, fastest first,
    written out from the measured and estimated constants."""
    shape = memory.Shape(layers=32, hidden=4096, max_length=131072, layer_kernels=True)
    per_token = 131072 * 4096
    chunk = 8192 * 4096 * 30
    assert {str(m): memory.activation_bytes(m, 131072, shape) for m in memory.MODES} == {
        "none": per_token * 32 * 40,
        "layer": per_token * (2 * 32 + 48),  # every layer's input kept, one layer live
        "layer, host": per_token * (2 * 3 + 48),  # a few inputs in flight
        "split, host": per_token * (2 * 4 + 30) + chunk,  # two units per layer: half a layer live, one MLP chunk
        "tiled, host": per_token * (2 * 3 + 30) + chunk,
    }
    # offloaded with the last 4 layers' inputs on the GPU: theirs besides (split: two per layer), 4 fewer on the host
    assert memory.activation_bytes(OFFLOADED_LAYER, 131072, shape, 4) == per_token * (2 * 7 + 48)
    assert memory.activation_bytes(OFFLOADED_SPLIT, 131072, shape, 4) == per_token * (2 * 12 + 30) + chunk
    assert memory.host_bytes(OFFLOADED_SPLIT, 131072, shape, gpu_layers=4) == per_token * 2 * 2 * 28
    assert memory.OFFLOADED == (OFFLOADED_LAYER, OFFLOADED_SPLIT, OFFLOADED_TILED)
    assert [memory.SPEED[m] for m in memory.MODES] == sorted(memory.SPEED.values(), reverse=True)
    assert memory.Mode.from_dict(OFFLOADED_TILED.to_dict()) == OFFLOADED_TILED
    with pytest.raises(ValueError, match="no inputs to offload"):
        memory.Mode(memory.Checkpointing.NONE, memory.Placement.HOST)


@pytest.mark.parametrize("training, quantization, lora, machine, expected", [
    ({}, {}, {}, "gpu", (True, True)),  # both on by default
    ({"fusedKernels": False}, {}, {}, "gpu", (False, False)),  # false: both off
    ({}, {}, {}, "cpu", (False, True)),  # Liger needs a GPU; fused LoRA runs on CPU too
    ({}, {}, {}, "no-liger", (False, True)),  # liger-kernel not installed
    ({}, {"bits": 8}, {}, "gpu", (True, False)),  # no fused int8 LoRA
    ({}, {}, {"dropout": 0.1}, "gpu", (True, False)),  # peft's dropout module stays
    ({"strategy": "fsdp"}, {}, {}, "gpus", (False, False)),  # FSDP: Liger only when asked, fused LoRA never
    ({"strategy": "fsdp", "fusedKernels": True}, {}, {}, "gpus", (True, False)),
])
def test_fused_kernels_turns_on_two_features_each_by_its_own_rule(tiny_llama, training, quantization, lora, machine,
                                                                  expected):
    machines = {"gpu": _gpu(80, liger=True), "cpu": Machine(processes=1, liger=True), "no-liger": _gpu(80),
                "gpus": _gpu(80, processes=2, liger=True)}
    spec = _spec(tiny_llama, training=training, quantization=quantization, lora=lora)
    plan = make_plan(spec, tiny_llama, machines[machine])
    assert (plan.layer_kernels, plan.fused_lora) == expected
    assert f"layer_kernels={expected[0]} fused_lora={expected[1]}" in plan.line()


def test_the_plan_line_says_when_the_memory_budget_is_not_applied(tiny_llama):
    spec = _spec(tiny_llama, training={"memoryBudget": 10})
    on_gpu = make_plan(spec, tiny_llama, _gpu(80))
    assert "budget 10.0," in on_gpu.line() and on_gpu.gpu_usable_bytes < 10 * GiB  # fitted under it
    fsdp = make_plan(_spec(tiny_llama, training={"memoryBudget": 10, "strategy": "fsdp"}), tiny_llama,
                     _gpu(80, processes=2))
    assert fsdp.strategy == "fsdp" and "budget 10.0 not applied (FSDP)" in fsdp.line()
    assert "budget 10.0 not applied (no GPU)" in make_plan(spec, tiny_llama, CPU).line()


def test_spec_settings_win_over_automatic_choices(tiny_llama):
    spec = _spec(tiny_llama, attention="eager",
                 dataset={"packing": False}, training={"fusedKernels": False, "strategy": "data"},
                 quantization={"computeDtype": "float16", "storageDtype": "bfloat16"})
    plan = make_plan(spec, tiny_llama, _gpu(24, processes=8, liger=True, varlen=True))
    assert (plan.strategy, plan.attention, plan.packing, plan.layer_kernels, plan.fused_lora) == (
        "data", "eager", False, False, False)
    assert plan.compute_dtype == torch.float16 and plan.storage_dtype == torch.bfloat16


def test_packing_is_completed_by_probing_the_loaded_model(tiny_models):
    from runner.model import load as model_load
    from runner.api.spec import ModelSpec, QuantizationSpec

    found = {}
    for arch in ("llama", "opt"):
        spec = _spec(tiny_models[arch])
        plan = make_plan(spec, tiny_models[arch], CPU)
        model = model_load.load_base(tiny_models[arch], ModelSpec(source=str(tiny_models[arch])),
                                      QuantizationSpec(), compute=plan.compute_dtype, attention=plan.attention)
        found[arch] = plan.with_packing(model).packing
    assert found == {"llama": True, "opt": False}  # OPT's masks ignore restarting position ids


def test_plan_round_trips_through_json_and_logs_as_one_line(tiny_llama):
    plan = make_plan(_spec(tiny_llama), tiny_llama, _gpu(80, processes=2, varlen=True))
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["strategy"] == "data" and d["computeDtype"] == "bfloat16" and d["storageDtype"] == "uint8"
    assert d["mode"] == {"checkpointing": "none", "offload": "gpu"} and d["gpuTotalBytes"] == 80 * GiB
    assert Plan.from_dict(d) == plan
    line = plan.line()
    assert "\n" not in line and line.startswith("plan: strategy=data processes=2 compute=bfloat16 storage=uint8")
    assert "attention=varlen" in line and "usable 69.0 of 80.0 per GPU" in line


def test_settings_this_machine_cannot_run_are_refused(tiny_llama):
    with pytest.raises(PermanentError, match="training.strategy: fsdp .* needs them"):
        plan_phase.check_spec(_spec(tiny_llama, training={"strategy": "fsdp"}), Machine(processes=2))
    plan_phase.check_spec(_spec(tiny_llama, training={"strategy": "fsdp"}), Machine(processes=1))  # one process
    uint8 = _spec(tiny_llama, training={"strategy": "fsdp"}, quantization={"storageDtype": "uint8"})
    with pytest.raises(PermanentError, match="quantization.storageDtype: .*bfloat16.*set it to bfloat16 or auto"):
        plan_phase.check_spec(uint8, _gpu(80, processes=2))
    with pytest.raises(PermanentError, match="training.fusedKernels: liger-kernel is not installed"):
        plan_phase.check_spec(_spec(tiny_llama, training={"fusedKernels": True}), _gpu(80, liger=False))
    plan_phase.check_spec(_spec(tiny_llama, training={"fusedKernels": True}), _gpu(80, liger=True))


def test_auto_strategy_that_lands_on_fsdp_still_checks_the_storage_dtype(tmp_path):
    from transformers import LlamaConfig

    from bench.training import SHAPES

    LlamaConfig(**SHAPES["llama-3-70b"], tie_word_embeddings=False).save_pretrained(tmp_path)
    spec = _spec(tmp_path, quantization={"storageDtype": "uint8"})
    with pytest.raises(PermanentError, match="quantization.storageDtype: FSDP needs"):
        make_plan(spec, tmp_path, _gpu(24, processes=8))


def test_fsdp_without_gpus_fails_in_validating_before_any_download(tiny_llama, qa_jsonl, tmp_path, monkeypatch):
    from runner.parallel import distributed
    from runner.job import run_job
    from runner.report.events import Reporter

    monkeypatch.setenv("WORLD_SIZE", "2")  # rank 0 of two CPU processes (no process group needed to fail)
    monkeypatch.setattr(distributed, "init", lambda: None)
    job = parse_job(job_doc(tiny_llama, qa_jsonl, tmp_path / "out", training={"strategy": "fsdp"}))
    out = io.StringIO()
    reporter = Reporter(stdout=out, stderr=io.StringIO(), termination_log=str(tmp_path / "term.log"))
    with pytest.raises(PermanentError) as e:
        run_job(job, reporter, work_dir=tmp_path / "w")
    assert e.value.reason == "InvalidSpec" and e.value.message.startswith("training.strategy: fsdp")
    phases = [json.loads(line).get("phase") for line in out.getvalue().splitlines()]
    assert reporter.phase_name == "Validating" and "Downloading" not in phases
    assert not (tmp_path / "w" / "model").exists()


def test_fused_kernels_without_liger_fail_in_validating(tiny_llama, qa_jsonl, tmp_path):
    if plan_phase._importable("liger_kernel"):
        pytest.skip("liger-kernel is installed here")
    doc = job_doc(tiny_llama, qa_jsonl, tmp_path / "out", training={"fusedKernels": True})
    code, events, stderr, result = run_cli(tmp_path, doc)
    assert code == errors.EXIT_PERMANENT, stderr[-3000:]
    assert result["failedPhase"] == "Validating" and result["reason"] == "InvalidSpec"
    assert result["message"].startswith("spec.training.fusedKernels: liger-kernel is not installed")
    assert [e["phase"] for e in events if e["event"] == "phase"] == ["Validating"]


def test_trainer_overrides_that_sftconfig_lacks_are_refused_by_name(tiny_llama, tmp_path):
    import dataclasses

    from runner.train.trainer import _training_args

    spec = _spec(tiny_llama)
    plan = make_plan(spec, tiny_llama, CPU)
    with pytest.raises(ValueError, match="plan.with_packing"):  # packing not settled yet
        _training_args(spec, tmp_path, plan, False, True)
    plan = dataclasses.replace(plan, packing=True)
    args = _training_args(spec, tmp_path, plan, False, True, max_steps=3, pad_to_multiple_of=8)
    assert args.max_steps == 3 and args.pad_to_multiple_of == 8 and args.packing is True
    with pytest.raises(TypeError, match="SFTConfig does not have: no_such_knob, pad_to_multiple_off$"):
        _training_args(spec, tmp_path, plan, False, True, pad_to_multiple_off=512, no_such_knob=1)


def test_a_job_logs_its_plan_as_one_line_and_writes_it_into_metrics(tiny_llama, qa_jsonl, tmp_path):
    from runner.job import run_job
    from runner.report.events import Reporter

    out = tmp_path / "out"
    job = parse_job(job_doc(tiny_llama, qa_jsonl, out, training={"maxSteps": 2}, merge={"enabled": False}))
    err = io.StringIO()
    reporter = Reporter(stdout=io.StringIO(), stderr=err, termination_log=str(tmp_path / "term.log"))
    run_job(job, reporter, work_dir=tmp_path / "w")
    lines = [line for line in err.getvalue().splitlines() if "plan:" in line]
    assert len(lines) == 1 and lines[0].startswith("[runner] plan: strategy=single processes=1 compute=float32")
    assert "packing=True" in lines[0]  # probed on the loaded Llama: packed examples stay apart
    plan = json.loads((out / "report" / "metrics.json").read_text())["plan"]
    assert plan["strategy"] == "single" and plan["packing"] is True and plan["mode"]["checkpointing"] == "none"
    assert plan["computeDtype"] == "float32" and plan["storageDtype"] == "uint8" and plan["attention"] == "sdpa"
    assert plan["weightBytes"] > 0 and plan["gpuTotalBytes"] is None


def test_host_memory_is_what_the_kernel_and_the_cgroup_leave():
    got = memory.host_available()
    meminfo = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in open("/proc/meminfo")}
    assert 0 < got <= meminfo["MemAvailable"] * 1.1  # read a moment apart
    assert got <= meminfo["MemTotal"]
