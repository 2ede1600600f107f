"""Merge a LoRA adapter into its base one safetensors shard at a time, straight from the files on disk.

Each base shard is memory-mapped (safetensors.safe_open) and read a tensor at a time; every weight with LoRA
tensors gets W + scale * B @ A computed in fp32 on the GPU when there is one (else on the CPU), cast to the
merge dtype, and streamed into the merged shard of the same name and keys (runner.model.files: header first,
then tensor by tensor; a temp file renamed when complete). Peak memory is a few tensors plus the adapter
(at most one shard plus the adapter), whatever the model's size. The index (when the base is sharded),
config.json (dtype updated, quantization_config removed), generation_config.json and the tokenizer files are
written beside the shards, config.json last.

A pre-quantized base (bitsandbytes 4-bit) is dequantized layer by layer from its stored quantization state;
the outputs hold no quantization state. With `requantize`, each linear weight of a 16-bit base is first
rounded to NF4/FP4 (or LLM.int8's row-wise int8) and back, as quantized training saw it (merge.base:
dequantized). A base trained in 16 bits (or in 8) is merged from its own 16-bit files: nothing to dequantize.

Checks made on the way, without the whole model: every merged tensor is finite and within float16's range
(max |W| reported), and each merged linear layer computes, on random probe vectors in fp32, what base + adapter
computes: merged W @ x against W @ x + scale * B (A x).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from runner.model.files import FLOAT_DTYPES, BaseFiles, Reader, ShardWriter, fail, write_metadata

FP16_MAX = 65504.0
PEFT_PREFIX = "base_model.model."


# ---------------------------------------------------------------------------------------------- adapter
@dataclass
class Lora:
    a: torch.Tensor  # (r, in) for linear layers; (r, num_embeddings) for embeddings
    b: torch.Tensor  # (out, r); (dim, r) for embeddings
    scale: float
    embedding: bool = False
    fan_in_fan_out: bool = False
    param: str = ""  # the weight's name in the model (peft's), which may differ from the checkpoint key

    def delta(self, dev: torch.device) -> torch.Tensor:
        """scale * B @ A in fp32, laid out as the base weight is."""
        d = self.b.to(dev, torch.float32) @ self.a.to(dev, torch.float32)
        return (d.T if self.embedding or self.fan_in_fan_out else d).mul_(self.scale)


class Adapter:
    """A peft LoRA adapter on disk (adapter_config.json + adapter_model.safetensors), keyed by the base's
    tensor names: `base_model.model.<name>.lora_A.weight` belongs to `<name>.weight`. Other tensors it saves
    (trained biases, modules_to_save) replace the base's tensor of the same name, as peft does."""

    def __init__(self, adapter_dir: Path, base_keys: set[str]):
        adapter_dir = Path(adapter_dir)
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
        if cfg.get("peft_type", "LORA") != "LORA":
            raise fail(f"the adapter is {cfg.get('peft_type')}, not LoRA")
        for flag in ("use_dora", "lora_bias", "target_parameters", "trainable_token_indices", "layer_replication"):
            if cfg.get(flag):
                raise fail(f"adapters with {flag} are not merged shard by shard")
        self.config = cfg
        self.loras: dict[str, Lora] = {}
        self.overrides: dict[str, torch.Tensor] = {}
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
            for key in f.keys():
                name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
                m = re.fullmatch(r"(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?", name)
                if m:
                    pairs.setdefault(m.group(1), {})[m.group(2)] = f.get_tensor(key)
                elif ".lora_" in name:
                    raise fail(f"adapter tensor {key} is not plain LoRA")
                else:
                    name = name.replace(".modules_to_save", "").replace(".original_module", "")
                    self.overrides[self._resolve(name, base_keys, key)] = f.get_tensor(key)
        for module, t in pairs.items():
            emb = "lora_embedding_A" in t
            a, b = (t.get("lora_embedding_A"), t.get("lora_embedding_B")) if emb else (t.get("lora_A"), t.get("lora_B"))
            if a is None or b is None:
                raise fail(f"adapter module {module} lacks its lora_A or lora_B tensor")
            r = a.shape[0]
            alpha = self._alpha(module)
            scale = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
            key = self._resolve(f"{module}.weight", base_keys, module)
            self.loras[key] = Lora(a, b, float(scale), emb, bool(cfg.get("fan_in_fan_out")) and not emb,
                                   f"{module}.weight")

    def _alpha(self, module: str) -> float:
        for pattern, alpha in (self.config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?{pattern}$", module):
                return float(alpha)
        return float(self.config.get("lora_alpha", 8))

    @staticmethod
    def _resolve(name: str, base_keys: set[str], adapter_key: str) -> str:
        """The base tensor an adapter name refers to; a checkpoint saved without the model's base prefix
        (`transformer.h.0...` saved as `h.0...`) is matched without it."""
        if name in base_keys:
            return name
        head, _, rest = name.partition(".")
        if rest in base_keys:
            return rest
        raise fail(f"adapter tensor {adapter_key} has no base weight {name} in the checkpoint")

    def nbytes(self) -> int:
        ts = [*self.overrides.values(), *(t for lo in self.loras.values() for t in (lo.a, lo.b))]
        return sum(t.numel() * t.element_size() for t in ts)


# ------------------------------------------------------------------------------------------ the merge
@dataclass
class Requantize:
    """Round these 16-bit linear weights to `bits` and back before merging, as quantized training saw them."""
    keys: set[str]
    quant_type: str = "nf4"
    double_quant: bool = True
    dtype: torch.dtype = torch.bfloat16  # the training's compute dtype: the weights were quantized from it
    blocksize: int = 64
    bits: int = 4  # 4: NF4/FP4 blocks; 8: LLM.int8's row-wise absmax int8


@dataclass
class ShardMergeStats:
    shards: int = 0
    tensors: int = 0
    merged_layers: int = 0
    checked_layers: int = 0
    bytes_written: int = 0
    max_abs_weight: float = 0.0
    layer_relative_error: float = 0.0  # worst layer: mean |merged - (base + adapter)| / mean |base + adapter|
    layer_max_abs_error: float = 0.0
    worst_layer: str = ""
    adapter_bytes: int = 0
    base_weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


def _dequantize(packed: torch.Tensor, parts: dict[str, torch.Tensor], dev: torch.device) -> torch.Tensor:
    import bitsandbytes.functional as F

    state = F.QuantState.from_dict(parts, device=dev)
    return F.dequantize_4bit(packed.to(dev).view(torch.uint8), state).to(torch.float32)


def _requantize(w: torch.Tensor, rq: Requantize) -> torch.Tensor:
    import bitsandbytes.functional as F

    if rq.bits == 8:  # as bitsandbytes' Int8Params: the weight in float16, one absmax scale per row
        cb, scb, _ = F.int8_vectorwise_quant(w.to(rq.dtype).to(torch.float16).contiguous())
        return F.int8_vectorwise_dequant(cb, scb).to(torch.float32)
    packed, state = F.quantize_4bit(w.to(rq.dtype).contiguous(), blocksize=rq.blocksize,
                                    compress_statistics=rq.double_quant, quant_type=rq.quant_type)
    return F.dequantize_4bit(packed, state).to(torch.float32)


@torch.no_grad()
def merge_files(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    *,
    dtype: torch.dtype,
    device: torch.device | None = None,
    requantize: Requantize | None = None,
    tolerance: float | None = None,
    keep_base: bool = False,
    probes: int = 4,
    seed: int = 0,
    on_shard: Callable[[Path], None] | None = None,
) -> ShardMergeStats:
    """Merge `adapter_dir` into `base_dir`, writing `out_dir`; see the module docstring. `tolerance` fails
    the merge as soon as a layer's relative probe error exceeds it; `keep_base` keeps, on `device`, the base
    weights each adapted layer was merged into (in `dtype`, by model parameter name) for an end-to-end check;
    `on_shard` is called with each merged shard's path once written (a benchmark may delete it)."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    files = BaseFiles(base_dir)
    adapter = Adapter(adapter_dir, set(files.weight_map) - files.companions)
    stats = ShardMergeStats(adapter_bytes=adapter.nbytes())
    gen = torch.Generator(device=dev).manual_seed(seed)
    name = str(dtype).removeprefix("torch.")
    out_map: dict[str, str] = {}
    for shard in files.shards:
        with Reader(files) as r:
            layout = files.layout(shard, dtype, r.read, r.header)
            with ShardWriter(out_dir / shard, layout) as writer:
                for key, st, _ in layout:
                    out = _merged_tensor(key, st, r, files, adapter, requantize, dtype, dev, gen, probes, stats,
                                         keep_base, tolerance)
                    writer.write(key, out.to("cpu"))
                    del out
        out_map.update((key, shard) for key, _, _ in layout)
        stats.bytes_written += writer.size
        stats.tensors += len(layout)
        stats.shards += 1
        if on_shard is not None:
            on_shard(out_dir / shard)
    write_metadata(files, out_dir, out_map, stats.bytes_written, name)
    return stats


def _merged_tensor(key, st, r, files, adapter, requantize, dtype, dev, gen, probes, stats, keep_base, tolerance):
    """One output tensor: the base's (dequantized, or rounded to 4 bits and back) with the adapter merged."""
    t = adapter.overrides[key] if key in adapter.overrides else r.read(key)
    if key in files.quantized:
        w = _dequantize(t, {k[len(key) + 1:]: r.read(k) for k in files.quantized[key]}, dev)
    elif t.dtype not in FLOAT_DTYPES:
        return t  # integer buffers (and 8-bit floats), as stored
    else:  # to the device as stored, widened there (a CPU-side conversion would be slower)
        w = t.to(dev).to(torch.float32, copy=dev.type == "cpu")
        if requantize is not None and key in requantize.keys:
            w = _requantize(w, requantize)
    del t
    out = _merge_one(key, w, adapter.loras.get(key), dtype, dev, gen, probes, stats, keep_base)
    name = str(dtype).removeprefix("torch.")
    m = float(w.abs().amax()) if w.numel() else 0.0  # w: the merged weight in fp32 (NaN propagates)
    if not math.isfinite(float(torch.tensor(m).to(dtype))) or (dtype == torch.float16 and m >= FP16_MAX):
        raise fail(f"merged weight {key} overflows {name} (|W| up to {m:.0f}); try merge.dtype: bfloat16")
    stats.max_abs_weight = max(stats.max_abs_weight, m)
    if tolerance is not None and stats.layer_relative_error > tolerance:
        raise fail(f"merged layer {stats.worst_layer} disagrees with base+adapter on probe inputs (relative "
                    f"error {stats.layer_relative_error:.2e} > {tolerance:.0e}); try merge.dtype: bfloat16")
    return out


def _merge_one(key: str, w: torch.Tensor, lora: Lora | None, dtype: torch.dtype, dev: torch.device,
               gen: torch.Generator, probes: int, stats: ShardMergeStats, keep_base: bool) -> torch.Tensor:
    """W + scale * B @ A (fp32) cast to `dtype`, with the probe check of a linear layer recorded in `stats`."""
    if lora is None:
        return w.to(dtype)
    stats.merged_layers += 1
    if keep_base:
        stats.base_weights[lora.param] = w.to(dtype)
    linear = not lora.embedding and w.ndim == 2
    if linear:
        x = torch.randn(w.shape[0 if lora.fan_in_fan_out else 1], probes, generator=gen, device=dev)
        lin = (lambda m: m.T) if lora.fan_in_fan_out else (lambda m: m)
        a, b = lora.a.to(dev, torch.float32), lora.b.to(dev, torch.float32)
        ref = lin(w) @ x + lora.scale * (b @ (a @ x))
    w += lora.delta(dev)
    out = w.to(dtype)
    if linear:
        err = lin(out).float() @ x - ref
        rel = float(err.abs().mean() / ref.abs().mean().clamp_min(1e-12))
        stats.checked_layers += 1
        stats.layer_max_abs_error = max(stats.layer_max_abs_error, float(err.abs().max()))
        if rel >= stats.layer_relative_error:
            stats.layer_relative_error, stats.worst_layer = rel, key
    return out


def merged_bytes(base_dir: Path, dtype: torch.dtype) -> int:
    return BaseFiles(base_dir).merged_bytes(dtype)
