"""One rank of the 2-process FSDP2 check (run by tests/runner/test_fsdp.py under torchrun, gloo on CPU).

A tiny Llama in real bitsandbytes 4-bit layers (float32 storage: the CPU compute dtype), LoRA added, sharded
with FSDP2 one decoder layer at a time exactly as accelerate does it for the runner. Compares against the same
model unsharded in this process, then gathers, saves, and reloads the adapter through runner.parallel.
Writes what it measured to <out>/rank<N>.json. An optional third argument sets quantization.bits (16: the
plain float32 base, sharded as it is).
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

    from runner import model as model_phase, parallel
    from runner.api.spec import LoraSpec, ModelSpec, QuantizationSpec

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    spec, quant = ModelSpec(source=model_dir), QuantizationSpec(bits=bits)

    def build(seed: int):
        m = model_phase.load_quantized(Path(model_dir), spec, quant, compute=torch.float32, attention="sdpa",
                                      storage=torch.float32, load_on=torch.device("cpu"))
        torch.manual_seed(seed)
        m = model_phase.add_lora(m, LoraSpec(r=4, alpha=8))
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


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 4)
