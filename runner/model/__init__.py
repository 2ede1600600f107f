"""The base model: loading it (4-bit, 8-bit or 16-bit) with its LoRA adapters, its files on disk, and its
attention kernels.

    load       the base as quantization.bits says, the adapters, generation, the config-only checks
    files      a model's safetensors shards read tensor by tensor, written tensor by tensor
    attention  document-masked attention for packed rows (varlen flash, cuDNN)
    kept_attention  one sequence's attention output kept for its recomputation (offloaded checkpointing)
    notices    library log lines nobody can act on, dropped
    cuda_driver  the host's NVIDIA driver against torch's CUDA build (too old: exit 2 naming the driver needed)

Imports: runner.api only.
"""
