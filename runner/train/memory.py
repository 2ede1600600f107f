"""The memory side of the Plan: the Mode (what the backward pass recomputes, and where the saved inputs are kept),
what one micro-batch's activations take under each mode, the fastest (mode, micro-batch) that fits the memory
a job may use (the host's: `host_available`), and the longest row any mode fits. runner/train/plan.py applies it;
the trainer runs the modes whose inputs stay on the GPU, and runner/train/offload.py those whose inputs go to host
memory.

Modes, fastest first (MODES; adding one is one entry there, and its bytes in `activation_bytes`):

  none            no checkpointing: every layer's activations kept
  layer           checkpointing: every decoder layer's input kept on the GPU, one layer recomputed at a time
  layer, host     as layer, with the layer inputs in pinned host memory (offloaded asynchronously)
  split, host     the attention and MLP halves checkpointed apart (the MLP a chunk of tokens at a time), their
                  inputs in host memory: fewer live activations, twice the host memory
  tiled, host     whole layers, the MLP inside each recomputed a chunk of tokens at a time, the inputs in host
                  memory: split's live activations with layer's host memory, for one more MLP forward per layer
                  (the longest sequences)

The offloaded modes keep every layer's input in pinned host memory (split: two per layer). Where the host cannot
hold them all, the last layers' inputs stay on the GPU instead (`Fit.gpu_layers`, as few as the host needs), so the
longest sequence is bounded by GPU and host memory together; such a mode is chosen only where both fit.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from pathlib import Path

from runner.model import load as model_load

GiB = 2**30


class Checkpointing(enum.Enum):
    """What the backward pass recomputes."""

    NONE = "none"  # nothing: every layer's activations kept
    LAYER = "layer"  # each decoder layer, from its saved input
    SPLIT = "split"  # each layer's attention half and MLP half apart, from two saved inputs
    TILED = "tiled"  # each decoder layer, its MLP a chunk of tokens at a time


class Placement(enum.Enum):
    """Where the checkpointed inputs are kept."""

    GPU = "gpu"
    HOST = "host"  # pinned host memory, copied on a side stream (runner/train/offload.py)


@dataclass(frozen=True)
class Mode:
    """How a job trades compute and host memory for GPU memory."""

    checkpointing: Checkpointing
    offload: Placement = Placement.GPU

    def __post_init__(self) -> None:
        if self.checkpointing is Checkpointing.NONE and self.offload is Placement.HOST:
            raise ValueError("a mode without checkpointing saves no inputs to offload")

    @property
    def checkpointed(self) -> bool:
        return self.checkpointing is not Checkpointing.NONE

    @property
    def offloaded(self) -> bool:
        return self.offload is Placement.HOST

    def __str__(self) -> str:
        return self.checkpointing.value + (", host" if self.offloaded else "")

    def to_dict(self) -> dict:
        return {"checkpointing": self.checkpointing.value, "offload": self.offload.value}

    @classmethod
    def from_dict(cls, d: dict) -> Mode:
        return cls(Checkpointing(d["checkpointing"]), Placement(d["offload"]))


NO_CHECKPOINTING = Mode(Checkpointing.NONE)
CHECKPOINTING = Mode(Checkpointing.LAYER)  # the Trainer's own gradient checkpointing
OFFLOADED_LAYER = Mode(Checkpointing.LAYER, Placement.HOST)
OFFLOADED_SPLIT = Mode(Checkpointing.SPLIT, Placement.HOST)
OFFLOADED_TILED = Mode(Checkpointing.TILED, Placement.HOST)
# Every mode, fastest first, with its relative speed: recomputing the forward pass costs about a third of a step;
# offloading adds transfers that overlap it; tiled's extra MLP forward is an estimate.
SPEED = {NO_CHECKPOINTING: 1.0, CHECKPOINTING: 0.75, OFFLOADED_LAYER: 0.74, OFFLOADED_SPLIT: 0.72,
         OFFLOADED_TILED: 0.62}
MODES = tuple(SPEED)
OFFLOADED = tuple(m for m in MODES if m.offloaded)

# ---------------------------------------------------------------------------------------- the bytes
# Every constant of the one formula, in bytes per token per hidden unit, keyed by Liger's layer kernels on/off.
#
# No checkpointing, per layer (bf16, trl's chunked LM head). Measured on an H100, Llama-3-8B shape, 4x2048 tokens
# (bench/results/h100-llama-3-8b.json): peak allocated 43.4 GiB with the kernels, 54.6 GiB without; less ~6.3 GiB
# of 4-bit weights and LoRA state, that is ~37 and ~48 bytes. The values add ~8% margin.
ALL_LAYERS_BYTES = {True: 40, False: 52}
# Checkpointing: the one layer being recomputed, its backward's transients included. Measured with the kernels:
# 128k tokens, Llama-3-8B shape, H200: 66.1 GB peak less 5.6 GB of weights, 0.9 GB of LoRA state and 32 GiB of
# layer inputs is ~47 bytes. Without the kernels: an estimate (the measured one plus the difference above).
ONE_LAYER_BYTES = {True: 48, False: 60}
# The larger half of a layer when the two are checkpointed apart (split), or when the MLP runs in chunks inside a
# recomputed layer (tiled), plus as much again per token of one chunk of the MLP (CHUNK_TOKENS). An estimate: the
# MLP half's before its MLP ran in chunks, kept as an upper bound for the attention half, now the larger.
HALF_LAYER_BYTES = {True: 30, False: 38}
CHUNK_TOKENS = 8192  # the MLP's chunk (runner/train/offload.py)
INPUT_BYTES = 2  # one saved layer input (bf16)
UNITS = {Checkpointing.NONE: 0, Checkpointing.LAYER: 1, Checkpointing.SPLIT: 2, Checkpointing.TILED: 1}  # per layer
# A kept attention output is one more input's worth (bf16, per query head width per token); its log-sum-exp (4 bytes
# per token per head: 1/64 of that for 128-wide heads, 1/32 for 64-wide) is the rest.
KEPT_ATTENTION = 1.04
# Kept attention's replay on the GPU, besides the mode's own: the key/value heads expanded to the query heads for
# cuDNN's kernel. Measured on an H100, Llama-3-8B shape, offloaded layers (bench/results/h100-llama-3-8b-frontier-kept
# .json against h100-llama-3-8b-frontier-long.json): 0.31 GiB more at 16k tokens, 1.25 GiB at 64k: 5 bytes.
KEPT_LIVE_BYTES = 5
IN_FLIGHT = 2  # offloaded: saved inputs on the GPU besides the units of the layer being computed (copies in flight)
# Checked on an H200, Llama-3-8B shape, offloaded layers (bench/results/h200-llama-3-8b-frontier*.json): estimated
# peak + LoRA state against the measured peak allocated: 4x2048 8.2 vs 8.2 GiB, one sequence of 16k 10.0 vs 10.0
# (9.7 on cuDNN attention), 32k 13.4 vs 13.7 (13.1), 64k 20.1 vs 21.1 (19.9).

# A micro-batch's efficiency: rows of few tokens launch small kernels and leave the GPU waiting on the host
# (EFFICIENT_TOKENS: half efficiency).
EFFICIENT_TOKENS = 2048
# Bytes per trainable LoRA parameter: fp32 weight, gradient and two AdamW moments.
LORA_STATE_BYTES = 16
# Under a memory budget (a peak of allocated memory): the allocator's slack and the loss's transients.
BUDGET_MARGIN = GiB // 2
# Of the host memory a container can still use, what offloaded inputs may pin (the rest: the data loader, the
# checkpoint writer, the allocator's pinned-memory cache rounding up to powers of two).
HOST_FRACTION = 0.7


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def host_available() -> int | None:
    """Host memory this container can still use: the kernel's MemAvailable, capped by the cgroup's limit less its
    usage (a pod's memory limit; cgroup v2, else v1)."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 2**60:
            room = max(limit - usage, 0)
            available = room if available is None else min(available, room)
            break
    return available


@dataclass(frozen=True)
class Shape:
    """What a micro-batch's activations depend on besides its rows."""

    layers: int
    hidden: int
    max_length: int  # tokens per row
    layer_kernels: bool  # Liger's fused layer kernels (fewer activations)
    attention: int = 0  # query heads x head width, where it differs from the hidden size (Qwen3, Gemma)

    @property
    def attention_width(self) -> int:
        return self.attention or self.hidden


def activation_bytes(mode: Mode, tokens: int, shape: Shape, gpu_layers: int = 0) -> int:
    """GPU bytes of one micro-batch's activations, of `tokens` tokens, under `mode`: the saved inputs it keeps on
    the GPU (offloaded: those of `gpu_layers` layers, and the copies in flight) plus what is live while one unit is
    computed."""
    per_token = tokens * shape.hidden
    fused = shape.layer_kernels
    if not mode.checkpointed:
        return per_token * shape.layers * ALL_LAYERS_BYTES[fused]
    units = UNITS[mode.checkpointing]
    saved = units * (gpu_layers + 1) + IN_FLIGHT if mode.offloaded else units * shape.layers
    if mode.checkpointing is Checkpointing.LAYER:
        live = per_token * ONE_LAYER_BYTES[fused]
    else:  # a half of a layer, and one chunk of the MLP
        live = (per_token + min(tokens, CHUNK_TOKENS) * shape.hidden) * HALF_LAYER_BYTES[fused]
    return per_token * INPUT_BYTES * saved + live


def host_bytes(mode: Mode, tokens: int, shape: Shape, kept_layers: int = 0, gpu_layers: int = 0) -> int:
    """Pinned host bytes of one micro-batch's offloaded inputs: one per unit of every layer but the `gpu_layers`
    whose inputs stay on the GPU, and the attention outputs of `kept_layers` layers besides
    (runner/model/kept_attention.py)."""
    if not mode.offloaded:
        return 0
    return _layer_host_bytes(mode, tokens, shape) * (shape.layers - gpu_layers) + kept_layers * kept_bytes(
        tokens, shape)


def _layer_host_bytes(mode: Mode, tokens: int, shape: Shape) -> int:
    return tokens * shape.hidden * INPUT_BYTES * UNITS[mode.checkpointing]


def gpu_layers_needed(mode: Mode, tokens: int, shape: Shape, host_usable: int | None) -> int | None:
    """The fewest layers whose offloaded inputs must stay on the GPU for the rest to fit `host_usable` bytes of host
    memory (0: all fit; None: the host cannot hold even one layer's beside the others on the GPU, or no mode that
    offloads anything would remain: plain checkpointing is that, and faster)."""
    if not mode.offloaded or host_usable is None:
        return 0
    per_layer = _layer_host_bytes(mode, tokens, shape)
    over = host_bytes(mode, tokens, shape) - host_usable
    needed = max(0, -(-over // per_layer))
    return needed if needed < shape.layers else None


def kept_layers(mode: Mode, tokens: int, shape: Shape, host_usable: int | None, room: float,
                gpu_layers: int = 0) -> int:
    """Layers whose offloaded units keep one sequence's attention output for the recomputation
    (runner/model/kept_attention.py): none without `room` on the GPU for the replay (KEPT_LIVE_BYTES); else as
    many as host memory holds beside the inputs."""
    if not mode.offloaded or room < kept_live_bytes(tokens, shape):
        return 0
    if host_usable is None:
        return shape.layers
    spare = host_usable - host_bytes(mode, tokens, shape, gpu_layers=gpu_layers)
    return max(0, min(shape.layers, spare // kept_bytes(tokens, shape)))


def kept_live_bytes(tokens: int, shape: Shape) -> int:
    """GPU bytes kept attention's replay needs besides the mode's own (KEPT_LIVE_BYTES)."""
    return tokens * shape.attention_width * KEPT_LIVE_BYTES


def kept_bytes(tokens: int, shape: Shape) -> int:
    """Pinned host bytes of one layer's kept attention output and log-sum-exp."""
    return int(tokens * shape.attention_width * INPUT_BYTES * KEPT_ATTENTION)


@dataclass(frozen=True)
class Fit:
    """A mode and the micro-batches one optimizer step is split into."""

    mode: Mode
    micro_batch: int  # rows per device per micro-batch
    accumulation: int  # micro-batches per optimizer step
    peak: int | None = None  # estimated GPU bytes: weights and activations (None: not estimated)
    gpu_layers: int = 0  # offloaded modes: the last layers whose inputs stay on the GPU (host memory too small)
    fits: bool = True  # False: nothing fits, and this is choose_mode's last resort


def requested(checkpointing: bool | None, micro_batch: int, accumulation: int) -> Fit:
    """What the spec asks for, where no GPU memory is fitted (CPU, FSDP): checkpointing only if set true."""
    return Fit(CHECKPOINTING if checkpointing else NO_CHECKPOINTING, micro_batch, accumulation)


def _modes(checkpointing: bool | None) -> list[Mode]:
    return [m for m in MODES if checkpointing is None or m.checkpointed == checkpointing]


def _fit(mode: Mode, micro: int, rows: int, shape: Shape, weights: int, usable: int,
         host_usable: int | None) -> Fit | None:
    """`mode` at `micro` rows per micro-batch, if it fits both memories (None: it does not)."""
    tokens = micro * shape.max_length
    on_gpu = gpu_layers_needed(mode, tokens, shape, host_usable)
    if on_gpu is None:
        return None
    peak = weights + activation_bytes(mode, tokens, shape, on_gpu)
    return None if peak > usable else Fit(mode, micro, rows // micro, peak, on_gpu)


def choose_mode(shape: Shape, *, rows: int, weights: int, usable: int, host_usable: int | None = None,
                checkpointing: bool | None = None) -> Fit:
    """The fastest (mode, micro-batch) that fits `usable` GPU bytes beside `weights`, for one optimizer step of
    `rows` rows (split into equal micro-batches). `checkpointing` (the spec's gradientCheckpointing) wins: false
    allows only no checkpointing, true only the checkpointing modes. `host_usable`: the host bytes offloaded inputs
    may pin (None: not limited); where they do not all fit, the last layers' stay on the GPU. Nothing fits: the
    smallest micro-batch in the last such mode (the job then fails on memory, with a plan that says why)."""
    modes = _modes(checkpointing)
    best: tuple[float, Fit] | None = None
    for micro in (d for d in range(rows, 0, -1) if rows % d == 0):
        tokens = micro * shape.max_length
        for mode in modes:
            fit = _fit(mode, micro, rows, shape, weights, usable, host_usable)
            if fit is None:
                continue
            score = SPEED[mode] * tokens / (tokens + EFFICIENT_TOKENS)
            if best is None or score > best[0]:
                best = (score, fit)
    if best is None:
        return Fit(modes[-1], 1, rows, weights + activation_bytes(modes[-1], shape.max_length, shape), fits=False)
    return best[1]


LENGTH_STEP = 1024  # longest_sequence's resolution, in tokens
MAX_LENGTH = 2**24  # and the longest it looks for


def longest_sequence(shape: Shape, *, weights: int, usable: int, host_usable: int | None = None,
                     checkpointing: bool | None = None) -> int:
    """The most tokens (a multiple of LENGTH_STEP) one row may have for some mode to fit both memories, as
    choose_mode fits them: the bound this GPU and host put on dataset.maxLength (0: not even LENGTH_STEP)."""
    def fits(tokens: int) -> bool:
        one_row = replace(shape, max_length=tokens)
        return any(_fit(m, 1, 1, one_row, weights, usable, host_usable) for m in _modes(checkpointing))

    low, high = 0, MAX_LENGTH // LENGTH_STEP  # fits(low * step), in steps; the answer is in [low, high]
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid * LENGTH_STEP):
            low = mid
        else:
            high = mid - 1
    return low * LENGTH_STEP


def lora_bytes(model, spec) -> int:
    """GPU bytes of the LoRA parameters and their optimizer state (LORA_STATE_BYTES each)."""
    targets = set(spec.lora.target_modules)
    params = 0
    for name, module in model.named_modules():
        if model_load.is_quantized_linear(name, module) and (
                targets == {"all-linear"} or name.rsplit(".", 1)[-1] in targets):
            params += spec.lora.r * (module.in_features + module.out_features)
    return params * LORA_STATE_BYTES
