"""The memory side of the Plan: what one micro-batch's activations take under each checkpointing mode, and the
fastest (mode, micro-batch) that fits the memory a job may use (runner/train/plan.py applies it; runner/train/offload.py
implements the offloaded modes).

  none    no checkpointing: every layer's activations kept
  gpu     checkpointing: every layer's input kept on the GPU, one layer recomputed at a time
  layer   checkpointing with the layer inputs in CPU memory (offloaded asynchronously)
  split   as layer, with the attention and MLP halves checkpointed apart (the MLP a chunk of tokens at a time):
          fewer live activations, twice the CPU memory
  tiled   as layer, the MLP inside each recomputed layer run and recomputed a chunk of tokens at a time: split's
          live activations with layer's CPU memory, for one more MLP forward per layer (the longest sequences)

The offloaded modes keep every layer's input in pinned CPU memory (split: two per layer), so a mode is only chosen
when that fits the memory the process may use on its host.
"""
from __future__ import annotations

from runner.model import load as model_phase

GiB = 2**30

# Activation bytes per token, per layer, per hidden unit of one micro-batch without checkpointing (bf16,
# trl's chunked LM head), keyed by fused kernels on/off. Measured on an H100, Llama-3-8B shape, 4x2048
# tokens (bench/results/h100-llama-3-8b.json): peak allocated 43.4 GiB with fused kernels, 54.6 GiB
# without; less ~6.3 GiB of 4-bit weights and LoRA state, that is ~37 and ~48 bytes. The values used here
# add ~8% margin.
ACT_BYTES = {True: 40, False: 52}

# With checkpointing, the activations of the one layer being recomputed, its backward's transients included
# (128k tokens, Llama-3-8B shape, H200: 66.1 GB peak less 5.6 GB of weights, 0.9 GB of LoRA state and 32 GiB of
# layer inputs is ~47 bytes); and of the larger half of a layer (the MLP) when offloading checkpoints each half.
ONE_LAYER_BYTES = {True: 48, False: 60}
# The larger half of a layer when the two are checkpointed apart (split), or when the MLP runs in chunks inside a
# recomputed layer (tiled). An estimate, not a measurement: the MLP half's before its MLP ran in chunks, kept as an
# upper bound for the attention half, which is now the larger; plus one chunk of the MLP half (CHUNK_TOKENS).
HALF_LAYER_BYTES = {True: 30, False: 38}
CHUNK_TOKENS = 8192  # runner/train/offload.py's
# Checkpointing modes, fastest first, with their relative speed (recomputing the forward pass costs about a
# third of a step; offloading adds transfers that overlap it), and a micro-batch's efficiency: rows of few
# tokens launch small kernels and leave the GPU waiting on the host (EFFICIENT_TOKENS: half efficiency).
MODES = {"none": 1.0, "gpu": 0.75, "layer": 0.74, "split": 0.72, "tiled": 0.62}  # tiled: estimated (+1 MLP forward)
EFFICIENT_TOKENS = 2048
# Bytes per trainable LoRA parameter: fp32 weight, gradient and two AdamW moments.
LORA_STATE_BYTES = 16
# Under a memory budget (a peak of allocated memory): the allocator's slack and the loss's transients.
BUDGET_MARGIN = GiB // 2
# Of the host memory a container can still use, what offloaded inputs may pin (the rest: the data loader, the
# checkpoint writer, the allocator's pinned-memory cache rounding up to powers of two).
HOST_FRACTION = 0.7
# Checked on an H200, Llama-3-8B shape, offloaded "layer" mode (bench/results/h200-llama-3-8b-frontier*.json):
# estimated peak + LoRA state against the measured peak allocated: 4x2048 8.2 vs 8.2 GiB, one sequence of 16k
# 10.0 vs 10.0 (9.7 on cuDNN attention), 32k 13.4 vs 13.7 (13.1), 64k 20.1 vs 21.1 (19.9).


def mode_bytes(mode: str, tokens: int, layers: int, hidden: int, fused: bool) -> int:
    """Activation bytes of one micro-batch of `tokens` under a checkpointing mode (none, gpu, layer, split)."""
    if mode == "none":
        return tokens * layers * hidden * ACT_BYTES[fused]
    if mode == "gpu":  # every layer's input kept on the GPU (bf16), one layer recomputed at a time
        return tokens * hidden * (2 * layers + ONE_LAYER_BYTES[fused])
    if mode == "layer":  # inputs in CPU memory: a few in flight
        return tokens * hidden * (2 * 3 + ONE_LAYER_BYTES[fused])
    chunk = min(tokens, CHUNK_TOKENS) * hidden * HALF_LAYER_BYTES[fused]  # one chunk of the MLP half
    in_flight = 4 if mode == "split" else 3
    return tokens * hidden * (2 * in_flight + HALF_LAYER_BYTES[fused]) + chunk


def host_bytes(mode: str, tokens: int, layers: int, hidden: int) -> int:
    """Pinned CPU bytes of one micro-batch's offloaded inputs (bf16): one per layer, two under split."""
    per_layer = {"layer": 1, "tiled": 1, "split": 2}.get(mode, 0)
    return tokens * hidden * 2 * layers * per_layer


def choose_mode(t, max_length: int, layers: int, hidden: int, weights: int, usable: int, fused: bool,
                host_usable: int | None = None) -> dict:
    """The fastest (checkpointing mode, micro-batch) that fits `usable` bytes beside the weights, for one
    optimizer step of the spec's rows (batchSize x gradientAccumulationSteps, split into equal micro-batches).
    A spec's gradientCheckpointing wins: false allows only no checkpointing, true only the checkpointing modes.
    `host_usable`: the CPU bytes the offloaded inputs may take (None: not limited). Nothing fits: the smallest
    micro-batch with tiled offloading (the job then fails on memory, with a plan that says why)."""
    rows = t.batch_size * t.gradient_accumulation_steps
    modes = [m for m in MODES if t.gradient_checkpointing is None or (m != "none") == t.gradient_checkpointing]
    best = None
    for micro in (d for d in range(rows, 0, -1) if rows % d == 0):
        tokens = micro * max_length
        for mode in modes:
            peak = weights + mode_bytes(mode, tokens, layers, hidden, fused)
            if peak > usable or (host_usable is not None and host_bytes(mode, tokens, layers, hidden) > host_usable):
                continue
            score = MODES[mode] * tokens / (tokens + EFFICIENT_TOKENS)
            if best is None or score > best[0]:
                best = (score, dict(mode=mode, micro_batch=micro, accumulation=rows // micro, peak=peak))
    if best is None:
        mode = modes[-1]
        return dict(mode=mode, micro_batch=1, accumulation=rows,
                    peak=weights + mode_bytes(mode, max_length, layers, hidden, fused))
    return best[1]


def lora_bytes(skeleton, spec) -> int:
    """GPU bytes of the LoRA parameters and their optimizer state (LORA_STATE_BYTES each)."""
    targets = set(spec.lora.target_modules)
    params = 0
    for name, module in skeleton.named_modules():
        if model_phase.is_quantized_linear(name, module) and (
                targets == {"all-linear"} or name.rsplit(".", 1)[-1] in targets):
            params += spec.lora.r * (module.in_features + module.out_features)
    return params * LORA_STATE_BYTES

