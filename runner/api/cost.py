"""What a job costs before any GPU is held: the model's FLOPs per token, the table of measured throughput per GPU
kind and shape (throughput.json beside this module, generated from bench/results by `python -m bench throughput`),
the GPU kind a spec names, and the estimate: tokens x FLOPs per token / the nearest row's achieved FLOP/s.

It is part of the contract because the controller, which may import only runner.api, writes the estimate a spec
alone allows into status.estimate at Pending (`from_spec`: no data read, no model config, bounded work). The runner
adds what only it can know (runner/train/estimate.py): the data's tokens after packing, the model's own config and
the memory plan on the GPU kind.

FLOPs per token processed (forward and backward through a frozen base with LoRA):

    F = (4 + 2c) * N_base + (6 + 2c) * N_lora + (3 + c) * 4 * L * d_attn * ctx

  N_base  the base's matmul parameters: every decoder projection and the LM head (embedding lookups cost none).
          4 = 2 for the forward + 2 for the backward's input gradients; the frozen base gets no weight gradient.
  N_lora  the LoRA parameters (r x (in + out) per adapted projection): 6 = forward, input and weight gradients.
  c       1 when the backward recomputes the forward (checkpointing, any mode but `none`), else 0.
  attn    per layer, QK^T and AV of 2 * d_attn * ctx FLOPs each per token forward (d_attn = heads x head_dim),
          3x that with the backward; ctx = a token's mean causal context, sum(l^2 / 2) / sum(l) over the rows'
          examples (packed examples attend only within themselves); spec only: maxLength / 2, an upper bound.

time = tokens x F / (row tokens/s x F_row), per GPU: the row's achieved FLOP/s scaled to this shape's FLOPs, so a
row measured at another size or sequence length carries over by its FLOPs; the row is chosen for the same GPU
kind, then the same bits, FSDP or not, checkpointing and offload, then the nearest parameters and tokens per
micro-batch (Distance says how far). Training steps only: loading, merging and uploading are not in it.
"""
from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from runner.api.spec import FineTuneJobSpec
from runner.api.status import Estimate

TABLE = Path(__file__).with_name("throughput.json")
DEFAULT_GPU = "h100"  # assumed when neither the spec nor --gpu names a kind
UNKNOWN = "unknown"
# Node labels that name a GPU model (GPU feature discovery, GKE, Karpenter), in the order they are trusted.
GPU_LABELS = ("nvidia.com/gpu.product", "cloud.google.com/gke-accelerator", "karpenter.k8s.aws/instance-gpu-name",
              "node.kubernetes.io/gpu")
# Model sizes (parameters against the row's) that FLOPs scale across: within NEAR_SIZE as measured, up to FAR_SIZE
# as a rough figure, beyond it not at all (a tiny model is bound by kernel launches, not FLOPs).
NEAR_SIZE, FAR_SIZE = 4.0, 20.0
_MAX_NAME = 512  # characters of a model source or a label value looked at (the spec is untrusted)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------------------------------ the model
@dataclass(frozen=True)
class ModelShape:
    """The dimensions FLOPs depend on (a Llama-style decoder: attention with grouped KV heads and a gated MLP)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, c: dict) -> ModelShape | None:
        """From a config.json's fields (a multimodal config's text_config); None where a dimension is missing."""
        c = c.get("text_config") if isinstance(c.get("text_config"), dict) else c
        try:
            heads = int(c["num_attention_heads"])
            hidden = int(c["hidden_size"])
            shape = cls(layers=int(c["num_hidden_layers"]), hidden=hidden, intermediate=int(c["intermediate_size"]),
                        heads=heads, kv_heads=int(c.get("num_key_value_heads") or heads),
                        head_dim=int(c.get("head_dim") or hidden // heads), vocab=int(c["vocab_size"]))
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            return None
        return shape if all(0 < v < 10**7 for v in vars(shape).values()) else None

    def dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each projection of one decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i),
                "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def params(self) -> int:
        """N_base: the matmul parameters (decoder projections and the LM head)."""
        return self.layers * sum(a * b for a, b in self.dims().values()) + self.hidden * self.vocab

    def lora_params(self, r: int, targets: list[str] | tuple[str, ...]) -> int:
        chosen = PROJECTIONS if "all-linear" in targets else [t for t in targets if t in PROJECTIONS]
        return self.layers * sum(r * sum(self.dims()[t]) for t in chosen)

    def flops_per_token(self, *, lora_params: int, context: float, recompute: bool) -> float:
        """F of the module docstring."""
        c = 1 if recompute else 0
        attention = (3 + c) * 4 * self.layers * self.heads * self.head_dim * context
        return (4 + 2 * c) * self.params + (6 + 2 * c) * lora_params + attention


# ------------------------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class Gpu:
    kind: str
    name: str
    memory_bytes: int
    bf16_tflops: float  # dense peak


@dataclass(frozen=True)
class Row:
    """One measured (or derived) throughput: a shape trained on a GPU kind."""

    id: str
    gpu: str
    model: str  # a key of the table's models
    bits: int
    strategy: str  # single | data | fsdp
    processes: int
    mode: str  # the memory mode (runner/train/memory.py's Mode, as printed): none, layer, "layer, host", ...
    micro_batch_tokens: int
    context: float  # mean causal context of a token
    lora_r: int
    tokens_per_second: float  # real tokens per second per GPU
    source: str  # the bench/results file and configuration it came from
    derived: str | None = None  # how a row not measured was derived from one that was


@dataclass(frozen=True)
class Table:
    gpus: dict[str, Gpu]
    models: dict[str, tuple[str, ModelShape]]  # name -> (pattern matched against model.source, shape)
    rows: tuple[Row, ...]

    def shape_of(self, row: Row) -> ModelShape:
        return self.models[row.model][1]

    def row_flops(self, row: Row) -> float:
        shape = self.shape_of(row)
        return shape.flops_per_token(lora_params=shape.lora_params(row.lora_r, ["all-linear"]),
                                     context=row.context, recompute=row.mode != "none")

    def known_model(self, source: str) -> tuple[str, ModelShape] | None:
        name = source[:_MAX_NAME].lower()
        for key, (pattern, shape) in self.models.items():
            if re.search(pattern, name):
                return key, shape
        return None


@functools.cache
def table() -> Table:
    doc = json.loads(TABLE.read_text(encoding="utf-8"))
    gpus = {k: Gpu(k, g["name"], int(g["memoryBytes"]), float(g["bf16Tflops"])) for k, g in doc["gpus"].items()}
    models = {k: (m["pattern"], ModelShape(**m["shape"])) for k, m in doc["models"].items()}
    rows = tuple(Row(**{_snake(k): v for k, v in r.items() if k != "flopsPerToken"}) for r in doc["rows"])
    return Table(gpus, models, rows)


def _snake(name: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), name)


def gpu_kinds() -> list[str]:
    return list(table().gpus)


def gpu_of(spec: FineTuneJobSpec) -> str | None:
    """The GPU kind the spec's nodeSelector names through a well-known label (GPU_LABELS), or None."""
    kinds = sorted(table().gpus, key=len, reverse=True)
    for label in GPU_LABELS:
        value = spec.node_selector.get(label)
        if value:
            words = set(re.split(r"[-_. /]+", value[:_MAX_NAME].lower()))
            found = next((k for k in kinds if k in words), None)
            if found:
                return found
    return None


# ------------------------------------------------------------------------------------------ the estimate
@dataclass(frozen=True)
class Job:
    """What the estimate needs of a job; each field as known (None: unknown)."""

    gpu: str
    gpu_source: str  # why this kind: the label, --gpu, or assumed
    gpus: int  # GPUs over every node
    model: str  # what the shape came from
    shape: ModelShape | None
    lora_params: int
    bits: int
    fsdp: bool
    mode: str | None  # None: not planned (spec only)
    micro_batch_tokens: int
    context: float
    steps: int | None
    tokens: int | None  # tokens processed over the run (padding included)
    tokens_per_epoch: int | None
    peak_bytes: int | None = None
    notes: tuple[str, ...] = ()


def nearest(job: Job) -> tuple[Row, str]:
    """The row this job's throughput is scaled from, and how far it is, in words."""
    t = table()
    rows = [r for r in t.rows if r.gpu == job.gpu]
    measured = [r for r in rows if r.derived is None]
    params = job.shape.params if job.shape else None

    def score(r: Row) -> float:
        s = 4.0 * (r.bits != job.bits) + 4.0 * ((r.strategy == "fsdp") != job.fsdp)
        if job.mode is not None:
            s += 2.0 * ((r.mode == "none") != (job.mode == "none")) + 1.0 * (("host" in r.mode) != ("host" in job.mode))
        if params:
            s += abs(math.log(params / t.shape_of(r).params))
        s += abs(math.log(job.micro_batch_tokens / r.micro_batch_tokens))
        return s + 0.25 * abs(math.log(job.gpus / r.processes))

    row = min(measured or rows, key=score)
    parts = []
    if params:
        parts.append(f"params x{_ratio(params / t.shape_of(row).params)}")
    parts.append(f"tokens per micro-batch x{_ratio(job.micro_batch_tokens / row.micro_batch_tokens)}")
    parts.append(f"context x{_ratio(job.context / row.context)}")
    if job.mode is not None and job.mode != row.mode:
        parts.append(f"mode {job.mode} vs {row.mode}")
    if row.bits != job.bits:
        parts.append(f"bits {job.bits} vs {row.bits}")
    if job.gpus != row.processes:
        parts.append(f"{job.gpus} GPUs vs {row.processes}")
    return row, ", ".join(parts)


def _ratio(x: float) -> str:
    return f"{x:.2f}" if 0.01 <= x < 1000 else f"{x:.1e}"


def estimate(job: Job) -> Estimate:
    base = dict(gpu=job.gpu, gpu_source=job.gpu_source, gpus=job.gpus, model=job.model, steps=job.steps,
                tokens=job.tokens, tokens_per_epoch=job.tokens_per_epoch, mode=job.mode,
                peak_gib=None if job.peak_bytes is None else round(job.peak_bytes / 2**30, 1), notes=list(job.notes))
    if job.shape is None:
        return Estimate(**base, summary=UNKNOWN, why=f"model shape unknown ({job.model})")
    row, distance = nearest(job)
    flops = job.shape.flops_per_token(lora_params=job.lora_params, context=job.context,
                                      recompute=job.mode not in (None, "none"))
    base.update(flops_per_token=round(flops), row=row.id, distance=distance,
                row_source=row.source + (f" (derived: {row.derived})" if row.derived else ""))
    size = job.shape.params / table().shape_of(row).params
    if not 1 / FAR_SIZE <= size <= FAR_SIZE:
        return Estimate(**base, summary=UNKNOWN, why=f"no measured row near this model's size (params "
                        f"x{_ratio(size)} of the nearest): FLOPs do not carry over that far")
    per_gpu = row.tokens_per_second * table().row_flops(row) / flops
    base.update(tokens_per_second=round(per_gpu * job.gpus, 1))
    if not 1 / NEAR_SIZE <= size <= NEAR_SIZE:
        base["notes"].append(f"a model x{_ratio(size)} the size of the measured row's: a rough figure (a smaller "
                             "model keeps the GPU less busy, so it likely takes longer)")
    if job.tokens is None:
        return Estimate(**base, summary=UNKNOWN, why="tokens unknown: the data's size is read by `runner preview` "
                        "(or set training.maxSteps)")
    seconds = job.tokens / (per_gpu * job.gpus)
    hours = seconds * job.gpus / 3600
    return Estimate(**base, seconds=round(seconds, 1), gpu_hours=round(hours, 3),
                    summary=f"{duration(seconds)}, {hours:.2g} {job.gpu}-hours")


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def spec_job(spec: FineTuneJobSpec, gpu: str | None = None, *, shape: ModelShape | None = None,
             model: str | None = None) -> Job:
    """The Job a spec alone describes (shape: the model's, where the caller read its config; else a model the
    table knows by name). Tokens: maxSteps full rows of maxLength (packing fills ~99% of them; unpacked rows are
    shorter, so an upper bound); with epochs and no maxSteps, unknown."""
    named = gpu_of(spec)
    kind = gpu or named or DEFAULT_GPU
    why = "--gpu" if gpu else ("spec.nodeSelector" if named else
                               f"assumed; name one with --gpu or the nodeSelector label {GPU_LABELS[0]}")
    if shape is None:
        known = table().known_model(spec.model.source)
        model, shape = (f"{known[0]} (by its name)", known[1]) if known else (
            f"{spec.model.source[:80]} is not a model the table knows by name", None)
    t, d, r = spec.training, spec.dataset, spec.resources
    gpus = max(r.gpus, 1) * r.nodes
    rows_per_step = t.batch_size * t.gradient_accumulation_steps * gpus
    tokens = t.max_steps * rows_per_step * d.max_length if t.max_steps else None
    notes = [] if d.packing else ["unpacked rows: tokens are an upper bound (every row assumed maxLength long)"]
    notes.append("attention context: maxLength / 2, an upper bound (the examples' lengths are not read)")
    lora = shape.lora_params(spec.lora.r, spec.lora.target_modules) if shape else 0
    return Job(gpu=kind, gpu_source=why, gpus=gpus, model=model or UNKNOWN, shape=shape, lora_params=lora,
               bits=spec.quantization.bits, fsdp=t.strategy == "fsdp",
               mode=None if t.gradient_checkpointing is None else ("layer" if t.gradient_checkpointing else "none"),
               micro_batch_tokens=t.batch_size * d.max_length, context=d.max_length / 2, steps=t.max_steps,
               tokens=tokens, tokens_per_epoch=None, notes=tuple(notes))


def from_spec(spec: FineTuneJobSpec, gpu: str | None = None) -> Estimate:
    """The estimate a spec alone allows (the controller's, at Pending)."""
    return estimate(spec_job(spec, gpu))
