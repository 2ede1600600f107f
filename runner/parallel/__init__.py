"""More than one process: the launcher and the rank-aware helpers, and FSDP loading where each rank reads only
its own shard.

    distributed  torchrun relaunch, ranks, node-first file access, broadcasting the plan
    fsdp_load    loading a 4-bit base straight into each rank's FSDP shard

Imports: runner.api, runner.model.
"""
