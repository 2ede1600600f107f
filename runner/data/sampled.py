"""The rows `runner preview` reads: a sample (the first K rows and K at random), stated as one, or every row
(`--full`), tokenized exactly as `run` tokenizes them (runner/data/tokenized.py).

JSON lines and Parquet shards are sampled without parsing the rest (runner/data/files.py), so a preview of a
corpus of any size answers in seconds; other layouts are loaded whole first, then sampled.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from runner.api.spec import DatasetSpec
from runner.data import dataset, files, tokenized

K = 1000  # rows from the start, and as many at random


@dataclass(frozen=True)
class Rows:
    rows: object  # datasets.Dataset: the sample, or every row
    total: int  # rows in the split
    first: int  # how many of `rows` are the first ones (the rest are random); == len(rows) for every row

    @property
    def sampled(self) -> bool:
        return len(self.rows) < self.total

    def note(self) -> str | None:
        if not self.sampled:
            return None
        return (f"estimated from a sample of {len(self.rows):,} of {self.total:,} rows (the first {self.first:,} "
                f"and {len(self.rows) - self.first:,} at random); `--full` reads every row")


def read(local: Path, spec: DatasetSpec, *, full: bool, cache_dir: Path | None, k: int = K, seed: int = 0) -> Rows:
    import datasets

    if problem := files.problem("dataset.source", local):
        raise dataset.DataError(problem)
    plain = spec.subset is None and spec.split == "train" and not (local.is_dir() and (local / "README.md").exists())
    found = files.shards(local) if plain and not full else None
    if found is not None and files.count_rows(found) > 2 * k:
        try:
            s = files.sample(found, k, seed=seed)
        except (ValueError, UnicodeDecodeError) as e:
            raise dataset.DataError(f"dataset.source: {local.name} could not be parsed ({e.__class__.__name__}: "
                                    f"{str(e)[:200]}); check the file is valid JSON lines / Parquet") from e
        if not s.rows:
            raise dataset.DataError(f"dataset.source: {spec.source} holds no rows (0 rows read, none dropped); "
                                    "give data that holds at least one row")
        return Rows(datasets.Dataset.from_list(s.rows), max(s.total, len(s.rows)), s.first)
    rows = dataset.load_rows(local, split=spec.split, subset=spec.subset, cache_dir=cache_dir)
    dataset.check_rows(spec, rows)
    if full or len(rows) <= 2 * k:
        return Rows(rows, len(rows), len(rows))
    rng = random.Random(seed)
    picked = sorted(rng.sample(range(k, len(rows)), k))
    return Rows(rows.select(list(range(k)) + picked), len(rows), k)


def tokenize(rows: Rows, spec: DatasetSpec, tokenizer, *, work: Path | None):
    """The rows tokenized (full_length, trained, input_ids, completion_mask): in memory for a sample, in
    memory-mapped files under `work` (in parallel) for every row."""
    fn = tokenized.Tokenize(spec, list(rows.rows.column_names), tokenizer, spec.max_length, dataset.row_formatter)
    out = work / "preview-tokens.arrow" if (work is not None and not rows.sampled and len(rows.rows) > 2 * K) else None
    return tokenized.tokenize(rows.rows, fn, out_file=out), fn.formatter()
