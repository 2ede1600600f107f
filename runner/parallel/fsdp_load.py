"""FSDP loading in which each rank holds only its own shard: host memory about one copy of the model per node.

Loading the 4-bit model on every rank and letting FSDP keep a shard costs a whole copy per rank (70B: ~40 GB
each; 405B on 8 GPUs: 8 x ~220 GB). Here each rank instead
  1. builds the architecture on the meta device (no weights), its linear layers as bitsandbytes 4-bit layers,
     and adds the LoRA adapters there;
  2. shards it with FSDP2 on the meta device, as accelerate would (one unit per decoder layer, the embeddings,
     the final norm with the output head, the root), so the Trainer finds it sharded and leaves it as it is;
  3. materialises only its own shard on its device and fills it from the safetensors files, memory-mapped,
     reading only the rows it keeps (FSDP2 shards dim 0 as torch.chunk does). A 4-bit weight's quantization
     state (absmax, code, nested statistics: ~1/30 of the weight) is read whole on every rank, since each rank
     dequantizes the weight it gathers. A 16-bit base is quantized one tensor at a time on the rank's device
     (as bitsandbytes would on load) and only the rank's rows are kept;
  4. initialises the LoRA tensors as peft does (kaiming-uniform A, zero B) from one seed, alike on every rank,
     keeping its rows.
Peak host memory per rank: its shards when the mesh is on the CPU (1/world of the model), plus one tensor at a
time; on GPUs, one tensor at a time. Packed 4-bit weights saved in another storage dtype (uint8) are
reinterpreted as the compute dtype FSDP needs (the bytes are the same).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from runner.model import load as model_load
from runner.api.errors import INVALID_SPEC, PermanentError
from runner.model.files import INDEX, BaseFiles, Reader

PEFT_PREFIX = "base_model.model."


def shard_rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """The rows rank `rank` keeps of a tensor of `rows` rows: FSDP2's Shard(0), torch.chunk's split."""
    size = -(-rows // world)
    start = min(rows, rank * size)
    return start, min(rows, start + size)


def meta_model_to_shard(model_dir: Path, spec, plan, files: BaseFiles):
    """The model on the meta device, with bitsandbytes 4-bit layers where the checkpoint has 4-bit weights (a
    pre-quantized base) or, for a 16-bit base with bits 4, at every linear layer but the output heads."""
    import bitsandbytes as bnb
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from runner.model import attention as attention_kernels

    if plan.attention == attention_kernels.NAME:
        attention_kernels.register()
    m, q = spec.model, spec.quantization
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=m.trust_remote_code)
    saved = dict(getattr(config, "quantization_config", None) or {})
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights():  # parameters on meta; buffers (rotary frequencies) real, on the CPU
        model = AutoModelForCausalLM.from_config(config, dtype=plan.compute_dtype, attn_implementation=plan.attention,
                                                 trust_remote_code=m.trust_remote_code)
    model.config.use_cache = False
    prequantized = bool(files.quantized)
    if prequantized or q.bits == 4:
        quant_type = saved.get("bnb_4bit_quant_type", q.quant_type)
        double = saved.get("bnb_4bit_use_double_quant", q.double_quant)
        for name, module in list(model.named_modules()):
            wanted = (f"{name}.weight" in files.quantized) if prequantized else model_load.is_quantized_linear(
                name, module)
            if not wanted or not isinstance(module, torch.nn.Linear):
                continue
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=plan.compute_dtype, compress_statistics=double,
                                      quant_type=quant_type, quant_storage=plan.storage_dtype, device="meta")
            rows = (module.in_features * module.out_features + 1) // (2 * plan.storage_dtype.itemsize)
            layer.weight = bnb.nn.Params4bit(  # the packed shape, as bitsandbytes stores it: FSDP shards that
                torch.empty(rows, 1, dtype=plan.storage_dtype, device="meta"), requires_grad=False,
                compress_statistics=double, quant_type=quant_type, quant_storage=plan.storage_dtype, module=layer,
                bnb_quantized=True)
            layer.support_avx512bf16_for_cpu = False  # keep the training layout on CPU (model._keep_training_layout)
            layer.quantize_with = {"blocksize": layer.weight.blocksize, "compress_statistics": double,
                                   "quant_type": quant_type}  # the weight loses these when FSDP shards it
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, layer)
        # As transformers marks a 4-bit model, so that peft adds 4-bit LoRA layers (not `is_quantized`, which
        # makes the Trainer ask for transformers' own quantizer object).
        model.is_loaded_in_4bit = True
    return model


def layer_classes(model) -> list[str]:
    """The decoder-layer classes FSDP wraps one by one (transformers names them in `_no_split_modules`)."""
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in model.modules()}
    # Already sharded (runner.parallel.fsdp_load): FSDP2 renamed each class FSDP<name>; accelerate then keeps the units.
    found = sorted(names & present) or sorted(f"FSDP{n}" for n in names if f"FSDP{n}" in present)
    if not found:
        raise PermanentError(f"training.strategy: fsdp does not know the layers of {type(model).__name__}; "
                             f"use training.strategy: data", reason=INVALID_SPEC)
    return found


def shard(model, mesh, compute: torch.dtype):
    """FSDP2 units as accelerate makes them (each decoder layer, the embeddings, the output head, the root); the
    loss stays in float32 (no cast of the outputs)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=compute, output_dtype=None)
    kw = {"mesh": mesh, "mp_policy": policy}
    layers = set(layer_classes(model))
    for module in list(model.modules()):
        if type(module).__name__ in layers:
            fully_shard(module, reshard_after_forward=True, **kw)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inp, out = base.get_input_embeddings(), base.get_output_embeddings()
    tied = out is not None and inp.weight is out.weight
    if not tied and inp is not None:
        fully_shard(inp, reshard_after_forward=True, **kw)
    # The output head alone, kept gathered from forward to backward; the final norm stays with the root. (What
    # accelerate makes of a peft model: a group of norm and head warns on GPUs that the head ran no forward.)
    tail = [mod for mod in ((inp, out) if tied else (out,)) if mod is not None]
    if tail:
        fully_shard(tail, reshard_after_forward=False, **kw)
    fully_shard(model, **kw)
    return model


def load_sharded(spec, model_dir: Path, plan, *, seed: int | None = None):
    """This rank's shard of the base with LoRA adapters, under FSDP2, read from the checkpoint's files."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    model_dir = Path(model_dir)
    if not ((model_dir / INDEX).is_file() or (model_dir / "model.safetensors").is_file()):
        raise PermanentError(f"model.source: training.strategy fsdp reads safetensors weights, and {model_dir} has "
                             f"none; convert the checkpoint or use training.strategy: data", reason=INVALID_SPEC)
    from runner.parallel import distributed

    distributed.init()  # the process group (NCCL on GPUs, gloo on CPU), if nothing joined it yet
    files = BaseFiles(model_dir)
    model = meta_model_to_shard(model_dir, spec, plan, files)
    model = model_load.add_lora(model, spec.lora)
    # The adapters in the compute dtype before FSDP records each parameter's dtype (peft makes them float32;
    # for a 4-bit model trl casts them to bfloat16 by assigning `.data`, which a sharded parameter must not
    # see: its gradients would stay float32 and the optimizer refuse the mix). So trl is told nothing.
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(plan.compute_dtype)
    model.get_base_model().__dict__.pop("is_loaded_in_4bit", None)
    dev = model_load.device()
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh(dev.type, (world,))
    buffers = {n: b.clone() for n, b in model.named_buffers() if b.device.type != "meta"}
    shard(model, mesh, plan.compute_dtype)
    model.to_empty(device=dev)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name in buffers:
                b.copy_(buffers[name].to(b.dtype))
        _fill(model, files, rank, world, dev, plan.compute_dtype)
        _init_lora(model, rank, world, spec.training.seed if seed is None else seed)
    return model


def _key(name: str) -> str:
    """A parameter's name in the checkpoint: without peft's wrappers."""
    return name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def _fill(model, files: BaseFiles, rank: int, world: int, dev: torch.device, compute: torch.dtype) -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    owners = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    missing = []
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_" in name:
            continue
        key, local = _key(name), _local(p)
        if key not in files.weight_map:
            missing.append(key)
            continue
        start, end = shard_rows(p.shape[0], world, rank)
        layer = owners.get(name)
        # Files opened per tensor and closed after it: pages of a memory-mapped file count as this process's
        # memory while it stays open, and every tensor read here is a copy (nothing keeps a file mapped).
        with Reader(files) as r:
            if layer is None:  # a plain tensor: read only this rank's rows
                _put(local, r._file(key).get_slice(key)[start:end], name)
            elif key in files.quantized:  # pre-quantized: this rank's bytes of the packed weight, the whole state
                parts = {k[len(key) + 1:]: r.read(k).clone() for k in files.quantized[key]}
                layer.quant_state = F.QuantState.from_dict(parts, device=dev)
                _put(local, _packed_rows(r, key, p.dtype, start, end), name)
            else:  # 16-bit: quantized here, as bitsandbytes does on load, one weight at a time
                w = r.read(key).to(device=dev, dtype=compute, copy=True)
                packed = bnb.nn.Params4bit(w, requires_grad=False, quant_storage=p.dtype,
                                           **layer.quantize_with)._quantize(dev)
                layer.quant_state = packed.quant_state
                _put(local, packed.data[start:end], name)
                del w, packed
    if missing:
        raise PermanentError(f"model.source: {len(missing)} weights of the model are not in its files under their "
                             f"names (e.g. {missing[0]}); set FINETUNE_FSDP_LOAD=full (every rank loads the whole "
                             f"model through transformers) or use training.strategy: data", reason=INVALID_SPEC)


def _put(local: torch.Tensor, rows: torch.Tensor, name: str) -> None:
    if tuple(local.shape) != tuple(rows.shape):
        raise PermanentError(f"model.source: {name} has shape {tuple(rows.shape)} in the files where the model "
                             f"expects {tuple(local.shape)} on this rank; use training.strategy: data",
                             reason=INVALID_SPEC)
    local.copy_(rows.to(local.dtype))


def _packed_rows(r: Reader, key: str, storage: torch.dtype, start: int, end: int) -> torch.Tensor:
    """Rows [start, end) of a packed 4-bit weight viewed in `storage` (its bytes, whatever dtype they were
    saved in)."""
    sl = r._file(key).get_slice(key)
    saved = torch.empty(0, dtype=_ST_DTYPES[sl.get_dtype()]).element_size()
    ratio = storage.itemsize // saved if storage.itemsize % saved == 0 else 0
    if ratio:  # read only this rank's bytes
        return sl[start * ratio:end * ratio].contiguous().reshape(-1).view(storage).reshape(-1, 1)
    whole = r.read(key).reshape(-1).view(storage).reshape(-1, 1)
    return whole[start:end].clone()


_ST_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "F16": torch.float16, "BF16": torch.bfloat16,
              "F32": torch.float32, "F64": torch.float64}


def _init_lora(model, rank: int, world: int, seed: int) -> None:
    """peft's default: A kaiming-uniform (a=sqrt(5)), B zero; drawn whole from one seed, alike on every rank."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        local = _local(p)
        full = torch.zeros(tuple(p.shape), dtype=torch.float32)
        if "lora_A" in name:
            torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=gen)
        elif "lora_B" not in name:
            raise PermanentError(f"training.strategy fsdp: no initial value for the trainable tensor {name}",
                                 reason=INVALID_SPEC)
        start, end = shard_rows(p.shape[0], world, rank)
        local.copy_(full[start:end].to(local.dtype))
