"""The job's training data, tokenized once per dataset: reused from where an earlier attempt or job kept it, else
read, tokenized in parallel into memory-mapped Arrow files in the work folder, and kept for the next one.

The key (runner/data/tokenized.py Key) is computed before any row is parsed: the data files' content hash, the
tokenizer's files, the dataset settings, the seed and what maxSteps needs. So a resumed attempt whose entry is
kept (runner/store/prepared.py: the checkpoint location, the model cache volume) reads no rows and tokenizes 0.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

from runner.api import names
from runner.api.errors import INVALID_SPEC, PermanentError
from runner.api.spec import Job
from runner.data import dataset, files, tokenized
from runner.parallel import distributed
from runner.store import backend_for, cache, prepared

_DISK_FACTOR = 3.0  # work-folder bytes per data byte: the rows as Arrow, the token ids, the trainer's packed copy


def limit_for(job: Job) -> dataset.Limit | None:
    t = job.spec.training
    if not t.max_steps:
        return None
    per_step = t.batch_size * t.gradient_accumulation_steps * max(distributed.world_size(), 1)
    return dataset.Limit(t.max_steps, per_step, job.spec.dataset.packing)


def local_problems(job: Job) -> list[str]:
    """Local data that cannot be rows (a FIFO, a device, an empty file or folder), found at Validating."""
    out = []
    for field, loc in job.places.sources()[1:]:
        path = backend_for(loc).local_path(loc)
        if path is not None and path.exists() and (problem := files.problem(field, path)):
            out.append(problem)
    return out


def check_disk(work: Path, data_path: Path) -> int:
    """The work folder must hold the data's Arrow copy and token ids; a clear error naming the sizes if not.
    Returns the bytes it expects to use."""
    need = int(sum(f.stat().st_size for f in files.data_files(data_path)) * _DISK_FACTOR)
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    if need > free:
        raise PermanentError(
            f"dataset.source: preparing this data needs about {_gib(need)} in the work folder {work} "
            f"({names.ENV_WORK_DIR}), which has {_gib(free)} free; set {names.ENV_WORK_DIR} to a larger volume "
            "(in a cluster, give the runner more ephemeral storage)", reason=INVALID_SPEC)
    return need


def disk_line(work: Path, data_path: Path) -> str:
    """The data's disk use in the work folder, said at Downloading (check_disk's error when it cannot fit)."""
    size = sum(f.stat().st_size for f in files.data_files(data_path))
    need = check_disk(work, data_path)
    return (f"{_gib(size)} of data files; preparing them uses up to {_gib(need)} more in the work folder {work} "
            f"({names.ENV_WORK_DIR}; {_gib(shutil.disk_usage(work).free)} free)")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def tokenized_data(job: Job, data_path: Path, eval_path: Path | None, model_dir: Path, tokenizer, work: Path,
                   log: Callable[[str], None]) -> dataset.TokenizedData:
    """The job's TokenizedData, memory-mapped from work/tokenized/<digest>/. The node's first process makes or
    finds it; the node's other processes open what it left."""
    spec, d = job.spec, job.spec.dataset
    limit = limit_for(job)
    ident = "sha256:" + files.content_hash(data_path) + ("" if eval_path is None else
                                                         " eval sha256:" + files.content_hash(eval_path))
    key = tokenized.make_key(d, data=ident, model_dir=model_dir, seed=spec.training.seed,
                             limit=None if limit is None else
                             f"{limit.max_steps} steps x {limit.per_step} sequences, packing {limit.packing}")
    folder = work / "tokenized" / key.digest
    cache_root = job.places.cache or cache.root()
    with distributed.node_first():
        where = None
        if distributed.is_node_main():
            where = prepared.find(key.digest, folder, checkpoints=job.places.checkpoints, cache_root=cache_root,
                                  log=log)
        entry = tokenized.open_entry(folder) if (where or not distributed.is_node_main()) else None
        if entry is not None:
            data = dataset.finish(d, entry.train, entry.eval, entry.meta["fmt"], rows_total=entry.meta["rowsTotal"])
            data.tokenized = 0
            if distributed.is_node_main():
                log(f"data: reused the tokenized data from {where}: tokenized 0 rows ({len(data.train):,} training "
                    f"rows of {data.rows_total:,}, key {key.digest})")
            return data
        data = _make(job, data_path, eval_path, tokenizer, work, folder, key, limit, log)
        prepared.keep(folder, key.digest, checkpoints=job.places.checkpoints, cache_root=cache_root,
                      to_cache=not spec.model.trust_remote_code, log=log)
        return data


def _first_rows(job: Job, data_path: Path, limit: dataset.Limit | None):
    """With maxSteps, JSON lines or Parquet shards and no evalFraction split (which draws from every row): only
    the first rows that the steps can use, read without parsing the rest; else None (every row is loaded)."""
    d = job.spec.dataset
    if limit is None or d.eval_fraction or d.subset is not None or d.split != "train":
        return None
    found = files.shards(data_path)
    if found is None:
        return None
    import datasets

    most = tokenized.rows_for_steps(limit.max_steps, limit.per_step, packing=limit.packing,
                                    max_length=d.max_length, mean_tokens=1.0)
    return datasets.Dataset.from_list(files.head(found, most))


def _make(job: Job, data_path: Path, eval_path: Path | None, tokenizer, work: Path, folder: Path, key, limit,
          log) -> dataset.TokenizedData:
    d = job.spec.dataset
    shutil.rmtree(folder, ignore_errors=True)  # an incomplete one this runner left
    folder.mkdir(parents=True)
    check_disk(work, data_path)
    rows_cache = work / "rows"
    train_rows, rows_total = _first_rows(job, data_path, limit), None
    if train_rows is not None:
        rows_total = files.count_rows(files.shards(data_path))
    else:
        train_rows = dataset.load_rows(data_path, split=d.split, subset=d.subset, cache_dir=rows_cache)
    eval_rows = None
    if eval_path:
        eval_rows = dataset.load_rows(eval_path, split="train" if eval_path.is_file() else d.split,
                                      cache_dir=rows_cache, field="dataset.evalSource")
        dataset.check_rows(d, eval_rows, where="dataset.evalSource")
    elif d.eval_split:
        eval_rows = dataset.load_rows(data_path, split=d.eval_split, subset=d.subset, cache_dir=rows_cache)
    started = time.monotonic()
    data = dataset.prepare(d, train_rows, eval_rows, tokenizer, seed=job.spec.training.seed, into=folder,
                           limit=limit, key=key, rows_total=rows_total)
    timing = tokenized.Timing()
    timing.started = started
    timing.done(data.tokenized or 0, tokenized.processes(data.tokenized or 0))
    log(timing.line() + f" into memory-mapped Arrow files ({folder})")
    if limit is not None:
        log(f"training.maxSteps {limit.max_steps}: uses {len(data.train):,} of {data.rows_total:,} training rows "
            f"({limit.per_step} sequences per step{', packed' if limit.packing else ''}); only those were tokenized")
    return data
