"""One rank of the 2-process FSDP2 check (run by tests/runner/parallel/test_fsdp.py under torchrun, gloo on CPU).

A tiny Llama in real bitsandbytes 4-bit layers (float32 storage: the CPU compute dtype), LoRA added, sharded
with FSDP2 one decoder layer at a time exactly as accelerate does it for the runner. Compares against the same
model unsharded in this process, then gathers, saves, and reloads the adapter through runner.train.fsdp.
Writes what it measured to <out>/rank<N>.json. An optional third argument sets quantization.bits (16: the
plain float32 base, sharded as it is).

`fsdp_worker.py sharded MODEL OUT [full]`: the runner's own FSDP loader (runner.parallel.fsdp_load), each rank reading only
its shard; peak RSS per process measured around the load (the kernel's high-water mark reset first), then the
loaded weights, quantization states, loss and gradients compared with the whole model loaded the usual way.
With `full`, the old way instead (every rank loads the whole model, then shards it), for the memory contrast.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main(model_dir: str, out: str, bits: int = 4) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from runner.model import load as model_load
    from runner.train import fsdp as parallel
    from runner.api.spec import LoraSpec, ModelSpec, QuantizationSpec

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    spec, quant = ModelSpec(source=model_dir), QuantizationSpec(bits=bits)

    def build(seed: int):
        m = model_load.load_base(Path(model_dir), spec, quant, compute=torch.float32, attention="sdpa",
                                 storage=torch.float32, load_on=torch.device("cpu"))
        torch.manual_seed(seed)
        m = model_load.add_lora(m, LoraSpec(r=4, alpha=8))
        with torch.no_grad():  # lora_B starts at zero; make the adapter matter
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        return m

    def shard(m):
        mesh = init_device_mesh("cpu", (world,))
        for layer in m.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
        return m

    ids = torch.randint(5, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = build(0)
    ref_loss = ref(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    ref_params = dict(ref.named_parameters())

    sharded = shard(build(0))
    base_weight = next(p for n, p in sharded.named_parameters() if n.endswith("q_proj.base_layer.weight"))
    loss = sharded(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in sharded.named_parameters() if p.requires_grad}
    adapter = parallel.gather_adapter(sharded)

    saved = Path(out) / "adapter"
    if rank == 0:
        sharded.save_pretrained(saved, state_dict=adapter)
    dist.barrier()
    fresh = shard(build(7))  # other LoRA values, then the saved ones loaded over them
    parallel.load_adapter(fresh, saved)
    reloaded = parallel.gather_adapter(fresh)

    result = {
        "baseWeightSharded": type(base_weight).__name__ == "DTensor",
        "localRows": base_weight.to_local().shape[0],
        "fullRows": base_weight.shape[0],
        "loss": loss.item(),
        "referenceLoss": ref_loss.item(),
        "maxGradDiff": max((grads[n] - ref_params[n].grad).abs().max().item() for n in grads),
        "maxAdapterDiff": max((adapter[n] - ref_params[n].detach()).abs().max().item() for n in adapter),
        "maxReloadDiff": max((reloaded[n] - adapter[n]).abs().max().item() for n in adapter),
        "adapterTensors": len(adapter),
        "bitsandbytesModules": sum(type(m).__module__.startswith("bitsandbytes") for m in sharded.modules()),
    }
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def sharded(model_dir: str, out: str, how: str = "sharded") -> None:
    """The runner's sharded loader: memory per rank, then equality with the unsharded model."""
    from types import SimpleNamespace

    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401 - imported before the baseline, as is everything the load uses
    import transformers.models.llama.modeling_llama  # noqa: F401
    from safetensors import safe_open  # noqa: F401
    from torch.distributed.device_mesh import init_device_mesh  # noqa: F401
    from torch.distributed.fsdp import fully_shard  # noqa: F401

    from runner.parallel import fsdp_load
    from runner.model import load as model_load
    from runner.api.spec import LoraSpec, ModelSpec, QuantizationSpec

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    Path(out).mkdir(parents=True, exist_ok=True)
    lora = LoraSpec(r=4, alpha=8)
    spec = SimpleNamespace(model=ModelSpec(source=model_dir), quantization=QuantizationSpec(bits=4), lora=lora,
                           training=SimpleNamespace(seed=5))
    plan = SimpleNamespace(compute_dtype=torch.float32, storage_dtype=torch.float32, attention="sdpa", fsdp=True)
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the present RSS
    before = _rss("VmRSS")
    if how == "full":
        model = model_load.load_base(Path(model_dir), spec.model, spec.quantization, compute=torch.float32,
                                      attention="sdpa", storage=torch.float32, load_on=torch.device("cpu"))
        model = model_load.add_lora(model, lora)
        fsdp_load.shard(model, init_device_mesh("cpu", (world,)), torch.float32)
    else:
        model = fsdp_load.load_sharded(spec, Path(model_dir), plan)
    import gc

    gc.collect()
    peak, after = _rss("VmHWM"), _rss("VmRSS")
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    result = {"rssBefore": before, "peakGrowth": peak - before, "heldGrowth": after - before, "localParamBytes": local,
              "modelParamBytes": full, "how": how}
    if how == "sharded":
        result.update(_compare(model, model_dir, spec, out, rank))
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _compare(model, model_dir: str, spec, out: str, rank: int) -> dict:
    """The sharded model against the whole model loaded as on one GPU, with the same adapter."""
    import bitsandbytes as bnb

    from runner.model import load as model_load
    from runner.train import fsdp as parallel

    adapter0 = parallel.gather_adapter(model)  # the loader's own LoRA init, gathered
    ref = model_load.load_base(Path(model_dir), spec.model, spec.quantization, compute=torch.float32,
                                attention="sdpa", storage=torch.float32, load_on=torch.device("cpu"))
    torch.manual_seed(0)
    ref = model_load.add_lora(ref, spec.lora)
    ref_params = dict(ref.named_parameters())
    weight_diff, state_diff, states = 0.0, 0.0, 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            weight_diff = max(weight_diff, (p.full_tensor() - ref_params[name].detach()).abs().max().item())
    ref_mods = dict(ref.named_modules())
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            mine, theirs = m.quant_state, ref_mods[name].weight.quant_state
            for a, b in ((mine.absmax, theirs.absmax), (mine.code, theirs.code)):
                state_diff = max(state_diff, (a.float() - b.float()).abs().max().item())
            if mine.nested:
                state_diff = max(state_diff, (mine.state2.absmax - theirs.state2.absmax).abs().max().item(),
                                 abs(float(mine.offset) - float(theirs.offset)))
            assert tuple(mine.shape) == tuple(theirs.shape) and mine.quant_type == theirs.quant_type
            states += 1
    a_bound = max(1 / v.shape[1] ** 0.5 for k, v in adapter0.items() if "lora_A" in k)
    with torch.no_grad():  # the same adapter in both, lora_B non-zero so that it matters
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    saved = Path(out) / "adapter"
    if rank == 0:
        ref.save_pretrained(saved)
    dist.barrier()
    parallel.load_adapter(model, saved)
    if getattr(model, "is_loaded_in_4bit", False):  # what trl's SFTTrainer does to the adapter of a 4-bit model
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    from transformers import trainer_utils

    trainer_utils.validate_quantization_for_training(model)  # what the Trainer checks of a quantized model
    ids = torch.randint(5, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    ref_loss = ref(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = trainable[0].full_tensor().clone()
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, fused=True)  # the runner's default optimizer
    optimizer.step()
    return {
        "adapterDtypes": sorted({str(p.dtype) for p in trainable}),
        "gradDtypes": sorted({str(p.grad.dtype) for p in trainable}),
        "optimizerStepChanged": bool((trainable[0].full_tensor() != before).any()),
        "maxBaseWeightDiff": weight_diff, "maxQuantStateDiff": state_diff, "quantStates": states,
        "loss": loss.item(), "lossDtype": str(loss.dtype), "referenceLoss": ref_loss.item(),
        "maxGradDiff": max((grads[n] - ref_params[n].grad).abs().max().item() for n in grads),
        "initialLoraBMax": max(v.abs().max().item() for k, v in adapter0.items() if "lora_B" in k),
        "initialLoraAMax": max(v.abs().max().item() for k, v in adapter0.items() if "lora_A" in k),
        "loraABound": a_bound, "adapterTensors": len(adapter0),
    }


if __name__ == "__main__":
    if sys.argv[1] == "sharded":
        sharded(sys.argv[2], sys.argv[3], *sys.argv[4:])
    else:
        main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 4)
