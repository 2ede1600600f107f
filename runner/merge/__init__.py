"""Merging: the adapter folded into a 16-bit copy of the base, shard by shard, and checked.

    fold    the merge phase: fold, check the merged model against base + adapter, publishable folder
    shards  one safetensors shard at a time, straight from the files on disk

Imports: runner.api, runner.model, runner.train.
"""
