"""Training: the Plan (every automatic choice, made once before training), the memory modes and the kernels
that make a step fast, and the trainer loop with its durable checkpoints.

    plan          bits, precision, attention, strategy, micro-batch and memory mode, decided once
    memory        the Mode (checkpointing, offloading), what each costs, and the fastest that fits
    estimate      a job's cost with the data's tokens, the model's config and the plan on a GPU kind
    patches       the one way to patch a model for a training and undo it; the plan's patches:
    offload         checkpointing with saved layer inputs in pinned host memory
    fused_lora      LoRA projections as one autograd node each
    layer_kernels   Liger's RMSNorm, RoPE and SwiGLU kernels patched in
    fsdp          what FSDP-QLoRA needs from the loader and the trainer
    best          the best checkpoint and early stopping
    trainer       trl's SFTTrainer over the tokenized data: checkpoints, resume, progress
    tokens        the job's data tokenized once per dataset: found where an attempt or job kept it, else made
                  (runner.data) and kept in the checkpoint location and the model cache (runner.store.prepared)

Imports: runner.api, runner.data, runner.store, runner.model, runner.parallel, runner.report.
"""
