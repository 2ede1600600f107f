"""A job's cost estimate as the runner sees it: the spec, the model's own config, the data's tokens after packing
and the memory plan on a GPU kind (runner/train/plan.py's make_plan on a machine described, not held), through
runner/api/cost.py's FLOPs formula and measured-throughput table (whose docstring states the formula).

`runner preview` and `runner validate --json` show it for the spec's GPU kind or `--gpu`; a run computes it at
Training on its own GPU and plan (metrics.json's `estimate`), and the summary shows it beside the measured time.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from runner.api import cost
from runner.api.errors import RunnerError
from runner.api.spec import FineTuneJobSpec
from runner.api.status import Estimate
from runner.train import plan as plans

METRIC = "estimate"  # metrics.json's key: the Estimate, by alias


@dataclass(frozen=True)
class DataSize:
    """What one epoch of the data is, once read and tokenized."""

    rows: int  # rows an epoch trains on (packed rows when packing)
    tokens: int  # tokens an epoch passes through the model (unpacked: padding to each batch's longest included)
    context: float  # a token's mean causal context

    @classmethod
    def of(cls, lengths: list[int], *, examples: int, max_length: int, packing: bool, batch: int,
           packed_rows: int | None = None) -> DataSize:
        """`lengths`: token lengths before truncation, of every example or of a sample of `examples`.
        `packed_rows`: rows packing fills (runner preview counts them); else the tokens / maxLength (best-fit
        packing fills ~99.5% of each row, bench/results/*-job-events.jsonl)."""
        kept = [min(x, max_length) for x in lengths] or [0]
        scale = examples / len(kept)
        total = sum(kept)
        if packing:
            tokens = round(total * scale)
            rows = packed_rows or max(math.ceil(tokens / max_length), 1)
            return cls(rows, tokens, sum(k * k / 2 for k in kept) / max(total, 1))
        # Padded to the longest of `batch` rows drawn at random: the expected maximum of `batch` draws.
        ordered, n = sorted(kept), len(kept)
        longest = sum(x * (((i + 1) / n) ** batch - (i / n) ** batch) for i, x in enumerate(ordered))
        return cls(examples, round(examples * longest), longest / 2)


def steps(spec: FineTuneJobSpec, rows: int, processes: int) -> int:
    """Optimizer steps of the run over `rows` rows per epoch (the Trainer's count)."""
    t = spec.training
    per_epoch = max(math.ceil(rows / (t.batch_size * processes)) // t.gradient_accumulation_steps, 1)
    return t.max_steps or math.ceil(t.epochs * per_epoch)


def kind_of_device(name: str) -> str | None:
    """The table's kind for a CUDA device name (torch.cuda.get_device_name), or None."""
    for k, g in cost.table().gpus.items():
        if g.name.lower() == name.lower() or k in name.lower().replace("-", " ").split():
            return k
    return None


def _config(model_dir: Path | None) -> dict | None:
    try:
        return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")) if model_dir else None
    except (OSError, ValueError):
        return None


def for_job(spec: FineTuneJobSpec, gpu: str | None = None, *, model_dir: Path | None = None,
            data: DataSize | None = None, total_steps: int | None = None,
            plan: plans.Plan | None = None, source: str | None = None) -> Estimate:
    """The estimate for `gpu` (else the spec's nodeSelector's kind, else cost.DEFAULT_GPU). `model_dir`: a
    folder with the model's config.json (its shape and the memory plan; else a model the table knows by name).
    `data`: the data's size (else tokens only with maxSteps). `plan`: the plan this machine made (a run);
    else one is made for the GPU kind. `total_steps`: the steps as the caller counted them."""
    config = _config(model_dir)
    shape = cost.ModelShape.from_config(config) if config else None
    job = cost.spec_job(spec, gpu, shape=shape, model="the model's config.json" if shape else None)
    notes = [n for n in job.notes if not n.startswith("attention context") or data is None]
    if plan is None and config is not None:
        gpus = cost.table().gpus[job.gpu]
        machine = plans.Machine(processes=job.gpus, gpu_total=gpus.memory_bytes, bf16=True, liger=True,
                                varlen=True)
        try:
            plan = plans.make_plan(spec, model_dir, machine)
        except RunnerError as e:
            notes.append(f"no memory plan: {e.message}")
        except Exception as e:  # noqa: BLE001 - an architecture transformers cannot build from its config alone
            notes.append(f"no memory plan ({e.__class__.__name__}: {str(e)[:200]})")
    if plan is not None:
        job = replace(job, mode=str(plan.mode), micro_batch_tokens=plan.micro_batch_tokens, fsdp=plan.fsdp,
                      peak_bytes=plan.peak_bytes, gpus=max(plan.processes, 1))
    if source:
        job = replace(job, gpu_source=source)
    if data is not None:
        rows_per_step = spec.training.batch_size * spec.training.gradient_accumulation_steps * job.gpus
        n = total_steps or steps(spec, data.rows, job.gpus)
        per_row = data.tokens / max(data.rows, 1)
        tokens = n * rows_per_step * per_row if spec.training.max_steps else spec.training.epochs * data.tokens
        notes = [x for x in notes if not x.startswith("unpacked rows")]
        job = replace(job, steps=n, tokens=round(tokens), tokens_per_epoch=data.tokens, context=data.context)
    return cost.estimate(replace(job, notes=tuple(notes)))


def at_training(spec: FineTuneJobSpec, plan: plans.Plan, lengths: list[int], examples: int,
                model_dir: Path) -> Estimate | None:
    """The estimate on this machine's GPU and plan, made as training starts (None on CPU, or on a GPU kind the
    table does not know): what the summary sets beside the measured time."""
    import torch

    if plan.gpu_total_bytes is None or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    gpu = kind_of_device(name)
    if gpu is None:
        return None
    data = DataSize.of(lengths, examples=examples, max_length=spec.dataset.max_length, packing=bool(plan.packing),
                       batch=plan.micro_batch)
    return for_job(spec, gpu, model_dir=model_dir, data=data, plan=plan, source=f"this machine's {name}")


def lines(e: Estimate) -> list[str]:
    """The estimate in a few lines, for a terminal."""
    gib = f", planned peak {e.peak_gib:g} GiB" if e.peak_gib is not None else ""
    out = [f"on {e.gpus} x {e.gpu} ({e.gpu_source}): {e.summary}" + (f" ({e.why})" if e.why else "")]
    if e.tokens is not None:
        per_epoch = f"; {e.tokens_per_epoch:,} per epoch after packing" if e.tokens_per_epoch else ""
        out.append(f"{e.steps} steps, {e.tokens:,} tokens{per_epoch}")
    if e.flops_per_token:
        speed = f", about {e.tokens_per_second:,.0f} tokens/s" if e.tokens_per_second else ""
        out.append(f"{e.flops_per_token / 1e9:.3g} GFLOP per token{speed}; memory mode {e.mode or 'not planned'}{gib}")
    if e.row:
        how = "scaled by FLOPs from" if e.tokens_per_second else "nearest"
        out.append(f"{how} the measured row {e.row} ({e.distance}); {e.row_source}")
    out += [f"assumed: {n}" for n in e.notes]
    out.append(f"model shape: {e.model}; training steps only (loading, merging and uploading not included)")
    return out
