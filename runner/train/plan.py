"""Every automatic choice of a job, made once, in one place, before training: the Plan.

  bits            the base as 4-bit QLoRA (the default), LLM.int8, or 16-bit plain LoRA (quantization.bits)
  strategy        single (one process) | data (every GPU holds the whole base model and trains on its own
                  batches) | fsdp (FSDP2: the base's weights are sharded across the GPUs; 4 or 16 bits)
  dtypes          the compute dtype, and what the base's weights are stored as: packed 4-bit weights as uint8,
                  or as the compute dtype under FSDP (which shards and casts only floating-point tensors); int8
                  with 8 bits; the compute dtype itself with 16
  memory mode     the Mode (runner/train/memory.py: checkpointing, and where its saved inputs are kept) and the
                  micro-batch: the fastest that fit one GPU, under training.memoryBudget if set; under FSDP,
                  checkpointing when the activations do not fit; on CPU, what the spec asks for
  layer kernels   Liger's fused RMSNorm/RoPE/SwiGLU (runner/train/layer_kernels.py)
  fused LoRA      each LoRA projection one autograd node (runner/train/fused_lora.py)
  compile         each decoder layer compiled, one graph for all (runner/train/compiled.py), when the spec asks
  attention       flash-attention 2, PyTorch's varlen flash kernel (packed rows), or SDPA
  packing         only where packed examples cannot attend to each other

A setting in the spec always wins over the automatic choice. `usable_bytes` is what one GPU may hold; the
strategy compares it with the weights and a checkpointed micro-batch, the memory mode fits under it. The rules
that need only the spec are the contract's (runner/api/parse.py); `check_spec` refuses the settings that cannot
work on this machine; it runs in the Validating phase, before anything is downloaded. `make_plan` needs the
model's config (after the download); packing, outside FSDP, is settled by a probe of the loaded model
(`Plan.with_packing`).
"""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import torch

from runner.model import attention as attention_kernels
from runner.parallel import distributed
from runner.model import load as model_load
from runner.train import memory
from runner.train.memory import Mode
from runner.api.errors import INVALID_SPEC, PermanentError
from runner.api.spec import FineTuneJobSpec

GiB = 2**30
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8,
          "int8": torch.int8}

# ------------------------------------------------------------------------------------------ memory
# What one GPU may hold: 90% of it (the allocator's fragmentation takes the rest), or what is free on it if that
# is less, minus what the plan does not count: the CUDA context, the LoRA tensors and their optimizer state.
USABLE_FRACTION = 0.9
RESERVED = 3 * GiB

# Bytes per parameter of a 4-bit layer: 0.5 for the weight, plus NF4 block constants (double quantized:
# one byte per 64 weights, fp32 per 256 blocks).
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# Bytes per parameter of a linear layer by quantization.bits (LLM.int8 adds one fp32 scale per output row;
# 16 bits: the compute dtype's size).
LINEAR_BYTES = {4: NF4_BYTES, 8: 1}

# Attention kernels that take sequence boundaries from restarting position ids (cu_seqlens): packed
# examples cannot attend to each other, whatever the architecture.
ISOLATING_ATTENTION = ("varlen", "flash_attention_2")


def usable_bytes(total: int, free: int | None = None) -> int:
    """What a job may plan to use on one GPU of `total` bytes (`free` of them free before loading)."""
    budget = USABLE_FRACTION * total if free is None else min(USABLE_FRACTION * total, free)
    return int(budget) - RESERVED


def _weight_bytes(model, bits: int = 4, dense: int = 2) -> int:
    """The base's bytes in memory: its linear layers at `bits`, every other weight at `dense` bytes (the
    compute dtype's size)."""
    total, seen = 0.0, set()
    if getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        seen.add(id(model.get_output_embeddings().weight))  # the LM head is the embeddings: held once
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if bits != 16 and model_load.is_quantized_linear(name, module) and p.ndim == 2:
                total += p.numel() * LINEAR_BYTES[bits] + (4 * p.shape[0] if bits == 8 else 0)
            else:
                total += p.numel() * dense
    return int(total)


# ----------------------------------------------------------------------------------------- machine
def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class Machine:
    """What the choices depend on besides the spec. `Machine.here()` measures this process's machine;
    tests describe one (a GPU of a given size) without having it."""

    processes: int = 1
    gpu_total: int | None = None  # bytes of one GPU; None: no GPU
    gpu_free: int | None = None  # bytes free on it before the model is loaded
    bf16: bool = False  # the GPU computes in bfloat16
    liger: bool = False  # liger-kernel is installed
    flash_attn: bool = False  # flash-attn is installed
    varlen: bool = False  # PyTorch's varlen flash-attention kernel is available
    host_available: int | None = None  # bytes of host memory this machine (container) can still give; None: unknown

    @property
    def gpu(self) -> bool:
        return self.gpu_total is not None

    @classmethod
    def here(cls) -> Machine:
        processes, liger = distributed.world_size(), _importable("liger_kernel")
        if not torch.cuda.is_available():
            return cls(processes=processes, liger=liger)
        free, total = torch.cuda.mem_get_info(model_load.device())
        return cls(processes=processes, gpu_total=total, gpu_free=free, bf16=torch.cuda.is_bf16_supported(),
                   liger=liger, flash_attn=_importable("flash_attn"), varlen=attention_kernels.available(),
                   host_available=memory.host_available())


# ----------------------------------------------------------------------------------- single choices
def compute_dtype(spec: FineTuneJobSpec, machine: Machine) -> torch.dtype:
    """`auto`: bf16 where the GPU supports it, else fp16 (Machine.bf16); fp32 on CPU, where 16-bit
    matmuls are emulated and several times slower."""
    chosen = spec.quantization.compute_dtype
    if chosen != "auto":
        return DTYPES[chosen]
    if machine.gpu:
        return torch.bfloat16 if machine.bf16 else torch.float16
    return torch.float32


def storage_dtype(spec: FineTuneJobSpec, strategy: str, compute: torch.dtype) -> torch.dtype:
    """What the packed 4-bit weights are stored as: the spec's choice (`auto`: uint8), or the compute
    dtype under FSDP. With 8 bits: int8; with 16: the compute dtype."""
    bits = spec.quantization.bits
    if bits != 4:
        return torch.int8 if bits == 8 else compute
    chosen = spec.quantization.storage_dtype
    if strategy != "fsdp":
        return torch.uint8 if chosen == "auto" else DTYPES[chosen]
    if chosen != "auto" and DTYPES[chosen] != compute:
        name = _name(compute)
        raise PermanentError(
            f"quantization.storageDtype: FSDP needs the 4-bit weights stored as the compute dtype ({name}), "
            f"not {chosen}; set it to {name} or auto", reason=INVALID_SPEC)
    return compute


def layer_kernels(spec: FineTuneJobSpec, strategy: str, machine: Machine) -> bool:
    """Liger's fused RMSNorm/RoPE/SwiGLU, one of training.fusedKernels' two features: on a GPU where liger-kernel
    is installed (the runner image has it), unless fusedKernels is false; under FSDP only when it is true. Measured
    on an H100 at 4x2048, Llama-3-8B shape, each in its own process: 12,394 real tokens/s and 43 GB with them,
    10,250 and 55 GB without (bench/results/h100-llama-3-8b.json). Off by default under FSDP: the fused loss reads
    the LM head's weight outside the head's forward, where FSDP holds only a shard of it."""
    wanted = spec.training.fused_kernels
    if wanted is False or (wanted is None and (strategy == "fsdp" or spec.training.compile)):
        return False  # compiled layers: the compiler fuses the same operations, unless fusedKernels is true
    return machine.liger and machine.gpu


def fused_lora(spec: FineTuneJobSpec, strategy: str) -> bool:
    """Each LoRA projection as one autograd node, the other of training.fusedKernels' features: on unless
    fusedKernels is false (peft's own modules: the reference path), on GPU and CPU alike, where it applies: not
    under FSDP (it reads the base weight whole, which FSDP shards), not with bits 8 (no int8 path), not with
    lora.dropout > 0 (peft's dropout module stays)."""
    return (spec.training.fused_kernels is not False and strategy != "fsdp" and spec.quantization.bits != 8
            and spec.lora.dropout == 0)


def compiled(spec: FineTuneJobSpec, strategy: str, mode: Mode) -> bool:
    """Decoder layers compiled (training.compile): where the spec asks, except under FSDP (it shards the layers'
    weights) and with checkpointing offloaded to CPU memory (its units copy on a side stream inside the layer)."""
    return spec.training.compile and strategy != "fsdp" and not mode.offloaded


def kept_attention(mode: Mode, attn: str, tokens: int, shape: memory.Shape, host: int | None, room: float,
                   gpu_layers: int = 0) -> int:
    """Layers keeping attention outputs: on the varlen path (the kernel kept_attention.py replays), memory's rule."""
    return memory.kept_layers(mode, tokens, shape, host, room, gpu_layers) if attn == attention_kernels.NAME else 0


def attention(spec: FineTuneJobSpec, machine: Machine) -> str:
    """`auto`: flash-attention 2 where installed, else PyTorch's varlen kernel, on a GPU; SDPA elsewhere
    (with position ids that restart per example transformers builds a block-diagonal mask)."""
    chosen = spec.model.attn_implementation
    if chosen != "auto":
        return chosen
    if machine.gpu:
        if machine.flash_attn:
            return "flash_attention_2"
        if machine.varlen:
            return attention_kernels.NAME
    return "sdpa"


def strategy(spec: FineTuneJobSpec, machine: Machine, weights: int, checkpointed: int, usable: int | None) -> str:
    """`auto` takes data parallel when the base's weights plus a checkpointed micro-batch fit one GPU (it is
    faster: no all-gathers), FSDP when they do not. FSDP cannot shard LLM.int8 weights: 8 bits is always data
    parallel."""
    if machine.processes <= 1:
        return "single"
    wanted = spec.training.strategy
    if wanted != "auto":
        return wanted
    if usable is None or spec.quantization.bits == 8:
        return "data"  # CPU ranks
    return "data" if weights + checkpointed <= usable else "fsdp"


def check_spec(spec: FineTuneJobSpec, machine: Machine) -> None:
    """The spec's settings that cannot work on this machine, refused before anything is downloaded (those that
    cannot work anywhere are the contract's: runner/api/parse.py)."""
    t = spec.training
    if t.fused_kernels and not machine.liger:
        raise PermanentError("training.fusedKernels: liger-kernel is not installed in this image; "
                             "install it (pip install 'qlora-operator[gpu]') or unset the field",
                             reason=INVALID_SPEC)
    if machine.processes > 1 and t.strategy == "fsdp":
        if not machine.gpu:
            raise PermanentError("training.strategy: fsdp shards the model across GPUs and needs them; on CPU "
                                 "use data (or auto)", reason=INVALID_SPEC)
        storage_dtype(spec, "fsdp", compute_dtype(spec, machine))


# -------------------------------------------------------------------------------------------- plan
@dataclasses.dataclass(frozen=True)
class Plan:
    strategy: str  # single | data | fsdp
    processes: int
    compute_dtype: torch.dtype
    storage_dtype: torch.dtype  # of the base's linear weights (packed 4-bit, int8, or the compute dtype)
    mode: Mode  # checkpointing, and where its saved inputs are kept (runner/train/memory.py)
    layer_kernels: bool  # Liger's fused RMSNorm/RoPE/SwiGLU (runner/train/layer_kernels.py)
    attention: str  # transformers' attn_implementation
    packing: bool | None  # None: to be probed on the loaded model (with_packing)
    micro_batch: int  # rows per device per step
    micro_batch_tokens: int
    # The memory figures the plan was based on, in bytes (GPU figures None without a GPU).
    weight_bytes: int  # the base model as loaded (4-bit, 8-bit or 16-bit linear layers)
    gpu_weight_bytes: int  # what of it one GPU holds (under FSDP: a shard plus two gathered layers)
    activation_bytes: int  # one micro-batch without checkpointing
    checkpointed_bytes: int  # one micro-batch with checkpointing (its inputs on the GPU)
    gpu_total_bytes: int | None
    gpu_usable_bytes: int | None
    bits: int = 4  # quantization.bits: 4 (QLoRA), 8 (LLM.int8) or 16 (plain LoRA)
    accumulation: int = 1  # micro-batches per optimizer step (micro_batch x accumulation = the spec's rows)
    memory_budget_bytes: int | None = None  # training.memoryBudget
    peak_bytes: int | None = None  # the chosen mode's estimated peak (GPU only)
    fused_lora: bool = False  # each LoRA projection one autograd node (runner/train/fused_lora.py)
    compile: bool = False  # decoder layers compiled, one graph for all (runner/train/compiled.py)
    kept_attention: int = 0  # layers whose offloaded units keep attention outputs to replay (kept_attention.py)
    gpu_layers: int = 0  # offloaded modes: the last layers whose inputs stay on the GPU (runner/train/memory.py)
    longest_tokens: int | None = None  # where no mode fits: the longest row one would on this GPU and host

    @property
    def fsdp(self) -> bool:
        return self.strategy == "fsdp"

    @property
    def budget_applied(self) -> bool:
        """training.memoryBudget is fitted on a GPU outside FSDP; under FSDP and on CPU it is not used."""
        return self.gpu_total_bytes is not None and not self.fsdp

    def with_packing(self, model) -> Plan:
        """The plan completed on the loaded model: packing only if a probe shows packed examples stay apart
        (transformers masks them apart for most architectures, not all: OPT ignores restarting positions)."""
        if self.packing is not None:
            return self
        return dataclasses.replace(self, packing=model_load.packing_is_isolated(model))

    def to_dict(self) -> dict:
        """JSON-ready, camelCase (as in metrics.json); dtypes as names, the mode as its two fields."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[_camel(f.name)] = _name(v) if isinstance(v, torch.dtype) else v.to_dict() if isinstance(v, Mode) else v
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        kw = {f.name: d[_camel(f.name)] for f in dataclasses.fields(cls) if _camel(f.name) in d}  # older: defaults
        kw["compute_dtype"], kw["storage_dtype"] = DTYPES[kw["compute_dtype"]], DTYPES[kw["storage_dtype"]]
        kw["mode"] = Mode.from_dict(kw["mode"])
        return cls(**kw)

    def line(self) -> str:
        """The plan as one log line."""
        gib = lambda n: f"{n / GiB:.1f}"  # noqa: E731
        gpu = "no GPU" if self.gpu_total_bytes is None else (
            f"usable {gib(self.gpu_usable_bytes)} of {gib(self.gpu_total_bytes)} per GPU")
        budget = ""
        if self.memory_budget_bytes:
            unused = "" if self.budget_applied else " not applied (" + ("FSDP" if self.fsdp else "no GPU") + ")"
            budget = f", budget {gib(self.memory_budget_bytes)}{unused}"
        packing = "probe" if self.packing is None else self.packing
        return (f"plan: strategy={self.strategy} processes={self.processes} compute={_name(self.compute_dtype)} "
                f"storage={_name(self.storage_dtype)} bits={self.bits} "
                f"checkpointing={self.mode.checkpointing.value} offload={self.mode.offload.value} "
                f"layer_kernels={self.layer_kernels} fused_lora={self.fused_lora} compile={self.compile} "
                f"attention={self.attention} "
                f"packing={packing} micro_batch={self.micro_batch}x{self.micro_batch_tokens // self.micro_batch} "
                f"accumulation={self.accumulation} kept_attention={self.kept_attention} gpu_layers={self.gpu_layers} "
                f"| memory GiB: "
                f"weights {gib(self.weight_bytes)} ({gib(self.gpu_weight_bytes)} per GPU), activations "
                f"{gib(self.activation_bytes)} (checkpointed {gib(self.checkpointed_bytes)}), {gpu}{budget}"
                + (f", estimated peak {gib(self.peak_bytes)}" if self.peak_bytes else "")
                + ("" if self.longest_tokens is None else "; no mode fits" + (
                    f": the longest row this GPU and host fit is {self.longest_tokens} tokens" if self.longest_tokens
                    else ", at any row length")))


def make_plan(spec: FineTuneJobSpec, model_dir: Path, machine: Machine | None = None) -> Plan:
    """Every choice for this job on this machine, from the spec and the model's config (no weights read)."""
    machine = machine or Machine.here()
    check_spec(spec, machine)
    t, bits = spec.training, spec.quantization.bits
    check_prequantized_base(model_dir, bits)
    meta = model_load.meta_model(model_dir, spec.model)
    cfg = meta.config.get_text_config()
    compute = compute_dtype(spec, machine)
    weights = _weight_bytes(meta, bits, compute.itemsize)
    usable = usable_bytes(machine.gpu_total, machine.gpu_free) if machine.gpu else None
    host = longest = None
    unfused = memory.Shape(cfg.num_hidden_layers, cfg.hidden_size, spec.dataset.max_length, layer_kernels=False,
                           attention=getattr(cfg, "num_attention_heads", 0) * (getattr(cfg, "head_dim", None) or 0))
    tokens = t.batch_size * spec.dataset.max_length
    chosen = strategy(spec, machine, weights, memory.activation_bytes(memory.CHECKPOINTING, tokens, unfused), usable)
    shape = dataclasses.replace(unfused, layer_kernels=layer_kernels(spec, chosen, machine))
    on_gpu = weights
    if chosen == "fsdp":
        on_gpu = weights // machine.processes + 2 * weights // shape.layers
    budget = int(t.memory_budget * GiB) if t.memory_budget else None
    fit = memory.requested(t.gradient_checkpointing, t.batch_size, t.gradient_accumulation_steps)
    if usable is not None and chosen != "fsdp":
        if budget is not None:
            usable = min(usable, budget - memory.lora_bytes(meta, spec) - memory.BUDGET_MARGIN)
        if machine.host_available is not None:
            host = int(memory.HOST_FRACTION * machine.host_available) // machine.processes
        fit = memory.choose_mode(shape, rows=t.batch_size * t.gradient_accumulation_steps, weights=on_gpu,
                                 usable=usable, host_usable=host, checkpointing=t.gradient_checkpointing)
        if not fit.fits:
            longest = memory.longest_sequence(shape, weights=on_gpu, usable=usable, host_usable=host,
                                              checkpointing=t.gradient_checkpointing)
    elif usable is not None and t.gradient_checkpointing is None:  # FSDP: on when the activations do not fit
        if on_gpu + memory.activation_bytes(memory.NO_CHECKPOINTING, tokens, shape) > usable:
            fit = dataclasses.replace(fit, mode=memory.CHECKPOINTING)
    tokens = fit.micro_batch * spec.dataset.max_length
    attn = attention(spec, machine)
    if not spec.dataset.packing:
        packing = False
    elif chosen == "fsdp":  # the base sits unsharded in CPU memory, where a probe would be slow
        packing = attn in ISOLATING_ATTENTION
    else:
        packing = None
    return Plan(
        strategy=chosen, processes=machine.processes, compute_dtype=compute,
        storage_dtype=storage_dtype(spec, chosen, compute), mode=fit.mode, layer_kernels=shape.layer_kernels,
        attention=attn, packing=packing, micro_batch=fit.micro_batch, micro_batch_tokens=tokens,
        weight_bytes=weights, gpu_weight_bytes=on_gpu,
        activation_bytes=memory.activation_bytes(memory.NO_CHECKPOINTING, tokens, shape),
        checkpointed_bytes=memory.activation_bytes(memory.CHECKPOINTING, tokens, shape),
        gpu_total_bytes=machine.gpu_total, gpu_usable_bytes=usable, bits=bits, accumulation=fit.accumulation,
        memory_budget_bytes=budget, peak_bytes=fit.peak, fused_lora=fused_lora(spec, chosen),
        compile=compiled(spec, chosen, fit.mode), gpu_layers=fit.gpu_layers, longest_tokens=longest,
        kept_attention=kept_attention(fit.mode, attn, tokens, shape, host,
                                      usable - fit.peak if fit.peak else float("inf"), fit.gpu_layers))


def check_prequantized_base(model_dir: Path, bits: int) -> None:
    """A base saved already quantized trains only with bits 4, as it was saved (its dequantized weights are all
    there is); one saved in 8 bits not at all (its 16-bit original is needed)."""
    import json

    config = json.loads((Path(model_dir) / "config.json").read_text())
    saved = config.get("quantization_config") or {}
    if not saved:
        return
    saved_bits = 4 if saved.get("load_in_4bit") else 8 if saved.get("load_in_8bit") else None
    if bits == 4 and saved_bits != 8:
        return
    what = f"{saved_bits}-bit" if saved_bits else f"with {saved.get('quant_method', 'another method')}"
    hint = "use the 16-bit original of this model" + (", or quantization.bits 4" if saved_bits == 4 else "")
    raise PermanentError(f"model.source: this base is saved already quantized ({what}), and quantization.bits "
                         f"is {bits}; {hint}", reason=INVALID_SPEC)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.capitalize() for w in rest)
