"""More than one GPU: what FSDP-QLoRA needs from the loader and the trainer (runner.train.plan chooses the strategy).

  single  one process (resources.gpus <= 1)
  data    data parallel: every rank holds the whole base model on its GPU and trains on its own batches
  fsdp    FSDP2: each rank reads only its own shard of every weight from the checkpoint's files, straight to
          its GPU (runner.parallel.fsdp_load: host memory about one tensor per rank, not the whole model), and
          all-gathers a decoder layer at a time for compute. Packed 4-bit weights are stored as the compute
          dtype (bfloat16), since FSDP shards and casts only floating-point tensors; a 16-bit base is
          sharded as it is. (LLM.int8 weights cannot be sharded: 8 bits is data parallel only.)
          FINETUNE_FSDP_LOAD=full loads the whole model on every rank instead, for FSDP to shard.

Under FSDP the adapter is gathered from its shards (only the LoRA tensors, never the frozen base) for
checkpoints and the result, so checkpoints have the same format as on one GPU and resume the same way.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from runner.parallel import distributed
from runner.model import load as model_load
from runner.parallel.fsdp_load import layer_classes
from runner.api.errors import INVALID_SPEC, PermanentError
from runner.api.spec import FineTuneJobSpec
from runner.train import host_syncs
from runner.train.plan import Plan


FULL_LOAD_ENV = "FINETUNE_FSDP_LOAD"  # "full": every rank loads the whole base into CPU memory (the old way)


def loads_sharded(plan: Plan) -> bool:
    """FSDP with each rank reading only its own shard (the default under FSDP)."""
    return plan.fsdp and os.environ.get(FULL_LOAD_ENV, "sharded") != "full"


def load_base(spec: FineTuneJobSpec, model_dir: Path, plan: Plan):
    """The base where the plan wants it: on this rank's GPU; under FSDP this rank's shard with its LoRA
    adapters (runner.parallel.fsdp_load), or (FINETUNE_FSDP_LOAD=full) the whole base in CPU memory for FSDP to shard."""
    if loads_sharded(plan):
        from runner.parallel import fsdp_load

        return fsdp_load.load_sharded(spec, model_dir, plan)
    model = model_load.load_base(
        model_dir, spec.model, spec.quantization, compute=plan.compute_dtype, attention=plan.attention,
        storage=plan.storage_dtype, load_on=torch.device("cpu") if plan.fsdp else None,
    )
    if spec.quantization.bits == 4:
        check_prequantized(model, plan.strategy, plan.compute_dtype)
    return model


def check_prequantized(model, strategy: str, compute: torch.dtype) -> None:
    """A base saved already in 4-bit keeps its own storage dtype; FSDP cannot shard uint8 storage."""
    if strategy != "fsdp":
        return
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            if module.weight.dtype != compute:
                raise PermanentError(
                    f"model.source: this base is saved already quantized, with its 4-bit weights stored as "
                    f"{str(module.weight.dtype).removeprefix('torch.')}; FSDP needs "
                    f"{str(compute).removeprefix('torch.')}. Use the 16-bit base, or training.strategy: data",
                    reason=INVALID_SPEC)
            return


def trainer_args(model) -> dict:
    """TrainingArguments for FSDP2 through accelerate: full sharding, one unit per decoder layer."""
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": layer_classes(model),
            "reshard_after_forward": True,  # full sharding: a layer is gathered only while it computes
            "cpu_ram_efficient_loading": False,  # runner.parallel.fsdp_load loads and shards it (or every rank loads it)
            "state_dict_type": "FULL_STATE_DICT",
        },
    }


def add_lora(model, lora):
    """LoRA adapters, unless the sharded loader added them already (before sharding, as FSDP needs)."""
    if hasattr(model, "peft_config"):
        return model
    return model_load.add_lora(model, lora)


# ----------------------------------------------------------------------------------- adapter tensors
def _trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def gather_adapter(model) -> dict[str, torch.Tensor]:
    """The LoRA tensors in full, on every rank (a collective: all ranks call it, in the same order)."""
    out = {}
    for name, p in _trainable(model):
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = full.detach().to("cpu").contiguous()
    return out


def save_adapter(trainer, out_dir: Path) -> None:
    """Write the adapter in peft's format. Under FSDP every rank must call this; rank 0 writes."""
    out_dir = Path(out_dir)
    if not trainer.is_fsdp_enabled:
        if distributed.is_main():
            trainer.accelerator.unwrap_model(trainer.model).save_pretrained(out_dir)
        return
    state = gather_adapter(trainer.model)
    if distributed.is_main():
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(out_dir, state_dict=state)


def load_adapter(model, checkpoint: Path, adapter_name: str = "default") -> None:
    """Copy a saved adapter into the (sharded) LoRA tensors: each rank keeps its own shard."""
    from safetensors.torch import load_file

    saved = load_file(str(Path(checkpoint) / "adapter_model.safetensors"))
    missing = []
    with torch.no_grad():
        for name, p in _trainable(model):
            key = name.replace(f".{adapter_name}.", ".")
            if key not in saved:
                missing.append(key)
                continue
            full = saved[key].to(device=p.device, dtype=p.dtype)
            if hasattr(p, "device_mesh"):  # a DTensor shard: take this rank's part of the full tensor
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full, p.device_mesh, p.placements)
            p.copy_(full)
    if missing:
        raise PermanentError(f"output.checkpoints: checkpoint {checkpoint} lacks {len(missing)} adapter tensors "
                             f"(e.g. {missing[0]}); delete it to start over", reason=INVALID_SPEC)


def float32_outputs(plugin) -> None:
    """accelerate's FSDP2 mixed precision casts the model's outputs to bfloat16, the loss included (logged as
    12.5625 or 12.625); keep them as computed (the loss in float32). Only where accelerate shards the model
    (FINETUNE_FSDP_LOAD=full); runner.parallel.fsdp_load sets its own policy."""
    import dataclasses

    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = getattr(plugin, "mixed_precision_policy", None)
    if isinstance(policy, MixedPrecisionPolicy) and policy.output_dtype is not None:
        plugin.mixed_precision_policy = dataclasses.replace(policy, output_dtype=None)


def sft_trainer_class():
    """trl's SFTTrainer, saving and resuming only the adapter under FSDP (the base is frozen and large), its
    training step free of host synchronisations (runner/train/host_syncs.py)."""
    from trl import SFTTrainer

    class QLoRATrainer(host_syncs.NoHostSyncs, SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.is_fsdp_enabled:
                float32_outputs(self.accelerator.state.fsdp_plugin)

        def save_model(self, output_dir=None, _internal_call=False):
            if not self.is_fsdp_enabled:
                return super().save_model(output_dir, _internal_call)
            output_dir = Path(output_dir or self.args.output_dir)
            save_adapter(self, output_dir)
            if distributed.is_main() and self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            if not self.is_fsdp_enabled:
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            load_adapter(model if model is not None else self.model, Path(resume_from_checkpoint))

    return QLoRATrainer
