"""A random-initialised model of a real shape, written already quantized to 4 bits, one layer at a time.

The 70B benchmark model must never exist as 140 GB of bf16 weights, in memory or on disk. Each unit (the
embeddings, one decoder layer, the final norm, the LM head) is materialised alone on the device, initialised,
its linear layers quantized with bitsandbytes, and written to its own safetensors shard in the format
`save_pretrained` uses for a 4-bit model (`<name>.weight` packed in the storage dtype, plus the quantization
state from `QuantState.as_dict(packed=True)`), so `from_pretrained` loads it like any pre-quantized model.
Peak memory is one unit in bf16; the result is ~0.56 bytes per parameter (70B: about 40 GB).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from runner.model.load import is_quantized_linear


def units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Each element of every nn.ModuleList (the decoder layers), and every other module holding
    parameters of its own (embeddings, final norm, LM head)."""
    out, inside = [], set()
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and id(module) not in inside:
            for i, layer in enumerate(module):
                out.append((f"{name}.{i}", layer))
                inside.update(id(m) for m in layer.modules())
            inside.add(id(module))
    for name, module in model.named_modules():
        if id(module) not in inside and any(True for _ in module.parameters(recurse=False)):
            out.append((name, module))
    return out


def materialise(unit: nn.Module, device: torch.device, std: float, seed: int) -> None:
    """Real tensors for one unit, initialised as transformers would (normal weights, unit norms, zero bias)."""
    unit.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for module in unit.modules():
            for pname, p in module.named_parameters(recurse=False):
                if isinstance(module, (nn.Linear, nn.Embedding)) and pname == "weight":
                    p.normal_(0.0, std, generator=gen)
                elif p.ndim == 1 and pname == "weight":
                    p.fill_(1.0)
                else:
                    p.zero_()


def quantized_tensors(unit_name: str, unit: nn.Module, quant) -> dict[str, torch.Tensor]:
    """The unit's state dict with every linear weight (not output heads) replaced by its 4-bit form."""
    import bitsandbytes.functional as F

    out = {}
    for name, module in unit.named_modules():
        prefix = f"{unit_name}.{name}" if name else unit_name
        for pname, p in module.named_parameters(recurse=False):
            key = f"{prefix}.{pname}"
            if pname == "weight" and is_quantized_linear(prefix, module):
                packed, state = F.quantize_4bit(
                    p.data, blocksize=64, compress_statistics=quant.bnb_4bit_use_double_quant,
                    quant_type=quant.bnb_4bit_quant_type, quant_storage=quant.bnb_4bit_quant_storage,
                )
                out[key] = packed
                for k, v in state.as_dict(packed=True).items():
                    out[f"{key}.{k}"] = v
            else:
                out[key] = p.data
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def write(config, out_dir: Path, quant, *, device: torch.device | None = None, seed: int = 0) -> Path:
    """Write a random 4-bit model of `config` (a transformers config) to `out_dir`; `quant` is a
    BitsAndBytesConfig. Returns out_dir. Idempotent: a finished directory is left as it is."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = quant.bnb_4bit_compute_dtype
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    std = getattr(config, "initializer_range", 0.02)
    weight_map, total = {}, 0
    parts = units(skeleton)
    for i, (name, unit) in enumerate(parts):
        materialise(unit, device, std, seed + i)
        tensors = quantized_tensors(name, unit, quant)
        shard = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        save_file(tensors, str(out_dir / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        unit.to("meta")  # free this unit before the next
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.quantization_config = quant.to_dict()
    config.dtype = dtype
    config.save_pretrained(out_dir)  # last: its presence marks the directory complete
    return out_dir
