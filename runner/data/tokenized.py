"""The tokenized dataset on disk: token ids and loss masks in memory-mapped Arrow files, made once per dataset.

An entry is a folder, complete-or-absent: the Arrow files of the train (and eval) examples, then `tokenized.json`
(what it holds: the key, its files with their sizes, rows, statistics) written last. It is keyed by everything
that decides its bytes (Key): the data's identity (a content hash, or the store's revision of a remote source),
the tokenizer's files, the dataset settings (format, columns, templates, chat template, maxLength, EOS, packing,
split, eval) and the rows used (maxSteps). Where an entry is kept between attempts and jobs (the checkpoint
location, the model cache volume) is runner/store/prepared.py's; this module writes and opens entries in a
local folder.

Tokenizing runs in as many processes as the pod has CPUs (its cgroup quota, not the host's count), each
formatting a shard of rows and tokenizing it with the fast tokenizer's batch API; the loss mask comes from the
token offsets, vectorised. Nothing holds the corpus as Python lists: rows stream from Arrow files into Arrow files.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from runner.api.spec import DatasetSpec

MARKER = "tokenized.json"
VERSION = 1  # of the entry's layout and the tokenization: a change makes every old entry a miss
TOKENIZER_GLOBS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt", "*.model",
                   "*.tiktoken", "chat_template*")
_PARALLEL_FROM = 20_000  # rows below which one process is faster than starting several
_BATCH = 1000


def cpus() -> int:
    """CPUs this process may use: the cgroup's CPU quota (v2 cpu.max, v1 cfs quota), else its affinity mask."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:
        count = os.cpu_count() or 1
    for quota_file, period_file in (("/sys/fs/cgroup/cpu.max", None),
                                    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")):
        try:
            parts = Path(quota_file).read_text().split()
            if period_file:
                parts.append(Path(period_file).read_text().strip())
        except OSError:
            continue
        if len(parts) >= 2 and parts[0] not in ("max", "-1"):
            count = min(count, max(1, math.ceil(int(parts[0]) / int(parts[1]))))
        break
    return max(count, 1)


# ----------------------------------------------------------------------------------------------------- the key
@dataclass(frozen=True)
class Key:
    """What decides a tokenized dataset's bytes; `digest` names its entry."""

    data: str  # the data's identity: "sha256:<hex>" of the files, or the store's revision identity
    tokenizer: str  # sha256 of the tokenizer's files
    dataset: dict  # the dataset settings, as the spec holds them
    seed: int  # the evalFraction split
    limit: str | None  # what maxSteps needs ("3 steps x 8 sequences, packed"), None: every row

    @property
    def digest(self) -> str:
        text = json.dumps({"version": VERSION, **self.__dict__}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:24]


def tokenizer_hash(model_dir: Path) -> str:
    h = hashlib.sha256()
    names = sorted({p for g in TOKENIZER_GLOBS for p in Path(model_dir).glob(g) if p.is_file()})
    for p in names:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def make_key(spec: DatasetSpec, *, data: str, model_dir: Path, seed: int, limit: str | None) -> Key:
    settings = spec.model_dump(by_alias=True, exclude={"source", "eval_source"})
    return Key(data, tokenizer_hash(model_dir), settings, seed, limit)


# -------------------------------------------------------------------------------------------- tokenizing
class Tokenize:
    """One batch of rows -> input_ids, completion_mask, full_length (before truncation), trained (tokens with
    loss). Picklable: each process builds its own formatter with `make_formatter` (runner.data.dataset's
    row_formatter: spec, columns, tokenizer -> a Formatter whose render raises DataError for a bad row)."""

    def __init__(self, spec: DatasetSpec, columns: list[str], tokenizer, max_length: int,
                 make_formatter: Callable):
        self.spec, self.columns, self.tokenizer, self.max_length = spec, columns, tokenizer, max_length
        self.make_formatter = make_formatter
        self._formatter = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_formatter": None}  # templates are compiled afresh in each process

    def formatter(self):
        if self._formatter is None:
            self._formatter = self.make_formatter(self.spec, self.columns, self.tokenizer)
        return self._formatter

    def __call__(self, batch: dict):
        formatter = self.formatter()
        chat = formatter.fmt == "chat"
        eos = (self.tokenizer.eos_token or "") if self.spec.add_eos and not chat else ""
        n = len(next(iter(batch.values())))
        examples = []
        for i in range(n):
            ex = formatter.render({k: v[i] for k, v in batch.items()})
            if eos and not ex.text.endswith(eos):
                spans = ex.trainable
                if spans is not None:
                    spans = spans[:-1] + [(spans[-1][0], spans[-1][1] + len(eos))]
                ex = type(ex)(ex.text + eos, spans)
            examples.append(ex)
        ids_list, offsets_list = self._encode([e.text for e in examples], add_special_tokens=not chat)
        return self._table(examples, ids_list, offsets_list)

    def _table(self, examples: list, ids_list: list, offsets_list: list):
        """The batch as one Arrow table, built from flat numpy arrays (no per-token Python work): a token carries
        loss when it starts inside a trainable span and is not empty (a special token added around the text)."""
        import itertools

        import numpy as np
        import pyarrow as pa

        n, cap = len(examples), self.max_length
        full = np.fromiter((len(i) for i in ids_list), np.int64, n)
        kept = np.minimum(full, cap)
        bounds = np.zeros(n + 1, np.int32)
        np.cumsum(kept, out=bounds[1:])
        total = int(bounds[-1])
        ids = np.fromiter(itertools.chain.from_iterable(i[:cap] for i in ids_list), np.int32, total)
        offs = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(o[:cap] for o in offsets_list)),
                           np.int64, 2 * total).reshape(-1, 2)
        row = np.repeat(np.arange(n), kept)
        spans = max((len(e.trainable) for e in examples if e.trainable is not None), default=0)
        lo, hi = np.zeros((n, max(spans, 1)), np.int64), np.zeros((n, max(spans, 1)), np.int64)
        whole = np.zeros(n, bool)
        for r, e in enumerate(examples):
            if e.trainable is None:
                whole[r] = True
            else:
                for j, (a, b) in enumerate(e.trainable):
                    lo[r, j], hi[r, j] = a, b
        starts = offs[:, 0]
        hit = np.zeros(total, bool)
        for j in range(lo.shape[1]):
            hit |= (starts >= lo[row, j]) & (starts < hi[row, j])
        mask = np.where(whole[row], True, hit & (offs[:, 1] > starts)).astype(np.int8)
        trained = np.bincount(row, weights=mask, minlength=n).astype(np.int32)
        offsets = pa.array(bounds, pa.int32())
        return pa.table({"input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids, pa.int32())),
                         "completion_mask": pa.ListArray.from_arrays(offsets, pa.array(mask, pa.int8())),
                         "full_length": pa.array(full.astype(np.int32)), "trained": pa.array(trained)})


    def _encode(self, texts: list[str], *, add_special_tokens: bool) -> tuple[list, list]:
        """Token ids and character offsets of each text: the fast tokenizer's own batch call (Rust, no per-token
        Python objects beyond the two lists), else the tokenizer's __call__."""
        backend = getattr(self.tokenizer, "_tokenizer", None)
        if getattr(self.tokenizer, "is_fast", False) and hasattr(backend, "encode_batch"):
            if backend.truncation is not None or backend.padding is not None:
                backend.no_truncation()
                backend.no_padding()
            encs = backend.encode_batch(texts, add_special_tokens=add_special_tokens)
            return [e.ids for e in encs], [e.offsets for e in encs]
        enc = self.tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                             truncation=False)
        return enc["input_ids"], enc["offset_mapping"]


def features():
    import datasets

    return datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                              "completion_mask": datasets.Sequence(datasets.Value("int8")),
                              "full_length": datasets.Value("int32"), "trained": datasets.Value("int32")})


def processes(rows: int, procs: int | None = None) -> int:
    """Processes that tokenize `rows` rows: the pod's CPUs, one for a few rows (starting more costs more)."""
    return 1 if rows < _PARALLEL_FROM else min(procs or cpus(), max(1, rows // _BATCH))


def tokenize(rows, fn: Tokenize, *, out_file: Path | None = None, procs: int | None = None, desc: str = "train"):
    """Rows (a datasets.Dataset) -> the tokenized Dataset: memory-mapped from `out_file` (and its per-process
    siblings) when given, else in memory (small data: tests, a preview's sample)."""
    fn.formatter()  # a format problem raises here, once, not in every process
    procs = processes(len(rows), procs) if out_file is not None else 1
    kwargs: dict[str, Any] = dict(batched=True, batch_size=_BATCH, remove_columns=rows.column_names,
                                  features=features(), desc=f"tokenize {desc}")
    if out_file is not None:
        kwargs.update(cache_file_name=str(out_file), load_from_cache_file=False, writer_batch_size=_BATCH,
                      new_fingerprint=hashlib.sha256(str(out_file).encode()).hexdigest()[:16])
    else:
        kwargs.update(keep_in_memory=True)
    if procs > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the processes are the parallelism
        kwargs["num_proc"] = procs
    return rows.map(fn, **kwargs)


# ---------------------------------------------------------------------------------------------- entries
@dataclass
class Entry:
    """A complete tokenized dataset in a local folder, opened memory-mapped."""

    folder: Path
    meta: dict
    train: Any = None
    eval: Any = None

    @property
    def rows(self) -> int:
        return self.meta["rows"]


def arrow_files(folder: Path, split: str) -> list[Path]:
    return sorted(folder.glob(f"{split}*.arrow"))


def open_entry(folder: Path) -> Entry | None:
    """The entry in `folder` when it is complete (its marker lists every file, each with its size); else None."""
    import datasets

    try:
        meta = json.loads((folder / MARKER).read_text())
        for f in meta["files"]:
            if (folder / f["path"]).stat().st_size != f["size"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    parts = {}
    for split in ("train", "eval"):
        files = [folder / f["path"] for f in meta["files"] if f["path"].startswith(split)]
        parts[split] = datasets.concatenate_datasets([datasets.Dataset.from_file(str(p)) for p in files]) \
            if files else None
    return Entry(folder, meta, parts["train"], parts["eval"])


def write_marker(folder: Path, key: Key, meta: dict) -> None:
    """The marker, written last and synced: the entry counts from here on."""
    files = [{"path": p.name, "size": p.stat().st_size} for p in sorted(folder.glob("*.arrow"))]
    body = {"key": key.__dict__, "digest": key.digest, "files": files, **meta}
    tmp = folder / f".{MARKER}.tmp"
    with open(tmp, "w") as f:
        json.dump(body, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, folder / MARKER)


def rows_for_steps(max_steps: int, per_step: int, *, packing: bool, max_length: int, mean_tokens: float) -> int:
    """Training rows that `max_steps` optimizer steps of `per_step` sequences use: with packing, as many as
    fill those sequences (from the mean example length), with a margin for packing's gaps."""
    sequences = max_steps * per_step
    if not packing:
        return sequences
    per_row = max(1.0, max_length / max(mean_tokens, 1.0))
    return math.ceil(sequences * per_row * 1.15) + per_step


@dataclass
class Timing:
    rows: int = 0
    seconds: float = 0.0
    procs: int = 1
    started: float = field(default_factory=time.monotonic)

    def done(self, rows: int, procs: int) -> None:
        self.rows, self.procs, self.seconds = rows, procs, time.monotonic() - self.started

    def line(self) -> str:
        rate = self.rows / max(self.seconds, 1e-6)
        return (f"data: tokenized {self.rows:,} rows in {self.seconds:.1f}s ({rate:,.0f} rows/s on {self.procs} "
                f"process(es), {rate / self.procs:,.0f} rows/s each)")


