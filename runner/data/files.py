"""The data files of a dataset source on this machine: which files it is (one file, or a folder of shards), what
is wrong with them before anything parses them, how many rows they hold, a sample of rows, and their content hash.

A source is one file (.jsonl, .json, .csv, .parquet) or a folder (a downloaded Hub dataset, an S3/GCS prefix, a
local folder) whose shards are read one by one. Counting and sampling JSON lines and Parquet read only what they
need (newlines, Parquet footers, a few byte ranges), so `preview` answers in seconds on any size; other layouts
(CSV, a JSON array, a Hub folder with its own configs) are read whole.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import stat
from dataclasses import dataclass
from pathlib import Path

SHARD_SUFFIXES = (".jsonl", ".parquet")  # what a folder is read as shard by shard
DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_CHUNK = 8 << 20


@dataclass(frozen=True)
class Shards:
    """The data files of a source, in order, when they are all JSON lines or all Parquet (else None: read whole)."""

    files: list[Path]
    kind: str  # "json" or "parquet"

    @property
    def bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def data_files(path: Path) -> list[Path]:
    """The data files of a file or folder (hidden and bookkeeping files skipped), in name order."""
    if path.is_file():
        return [path]
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / n for n in sorted(filenames)
                  if not n.startswith(".") and Path(n).suffix.lower() in DATA_SUFFIXES]
    return found


def shards(path: Path) -> Shards | None:
    files = data_files(path)
    kinds = {DATA_SUFFIXES[f.suffix.lower()] for f in files}
    if not files or len(kinds) != 1 or any(f.suffix.lower() not in SHARD_SUFFIXES for f in files):
        return None
    return Shards(files, kinds.pop())


def problem(field: str, path: Path) -> str | None:
    """Why a local data source cannot be read as rows (a FIFO, a device, an empty file or folder), or None.
    Reads at most the first bytes of each file: never blocks, whatever the path is."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return f"{field}: cannot read {path} ({e.strerror or e}); fix the path or its permissions"
    if stat.S_ISDIR(mode):
        files = data_files(path)
        if not files:
            return (f"{field}: the folder {path} holds no data files (.jsonl, .json, .csv, .parquet); give the "
                    "file or the folder of shards that holds the rows")
        if all(_blank(f) for f in files):
            return (f"{field}: every data file in {path} is empty ({len(files)} file(s), 0 rows read); give data "
                    "that holds at least one row")
        return None
    if not stat.S_ISREG(mode):
        what = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a device or socket"
        return f"{field}: {path} is {what}, not a file; give a regular file (or folder) that holds the rows"
    if os.stat(path).st_size == 0:
        return f"{field}: {path} is empty (0 bytes, 0 rows read); give data that holds at least one row"
    if _blank(path):
        return f"{field}: {path} holds only blank lines (0 rows read); give data that holds at least one row"
    return None


def _blank(path: Path) -> bool:
    """Whether a JSON-lines/JSON/CSV file has nothing but whitespace (Parquet: no rows in its footer)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        return False
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows == 0
        except Exception:  # noqa: BLE001 - not Parquet at all: the parser says so later, with the file's name
            return False
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


# ------------------------------------------------------------------------------------------ counting, sampling
def count_rows(s: Shards) -> int:
    """Rows in the shards: non-blank lines of JSON lines, the footers of Parquet."""
    if s.kind == "parquet":
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(f).metadata.num_rows for f in s.files)
    total = 0
    for f in s.files:
        with open(f, "rb") as fh:
            last = b"\n"
            while chunk := fh.read(_CHUNK):
                total += chunk.count(b"\n")
                last = chunk[-1:]
            total += last != b"\n"
    return total  # blank lines counted too; rare in JSON lines, and the sample says "about"


@dataclass(frozen=True)
class Sample:
    rows: list[dict]  # the first `first` rows, then the random ones
    first: int
    random: int
    total: int  # rows in the source (JSON lines: lines)


def sample(s: Shards, k: int, *, seed: int = 0) -> Sample:
    """The first k rows and about k rows at random places (JSON lines: random byte offsets, each the line
    that starts after it; Parquet: random rows of random row groups)."""
    total = count_rows(s)
    rng = random.Random(seed)
    if s.kind == "parquet":
        first = _parquet_rows(s, k, rng, first=True)
        picked = _parquet_rows(s, k, rng, first=False) if total > k else []
    else:
        first = _head_lines(s, k)
        picked = _random_lines(s, k, rng) if total > k else []
    return Sample(first + picked, len(first), len(picked), total)


def head(s: Shards, k: int) -> list[dict]:
    """The first k rows, reading no further."""
    if s.kind == "parquet":
        return _parquet_rows(s, k, random.Random(0), first=True)
    return _head_lines(s, k)


def _head_lines(s: Shards, k: int) -> list[dict]:
    out: list[dict] = []
    for f in s.files:
        with open(f, "rb") as fh:
            for line in fh:
                if line.strip():
                    out.append(json.loads(line))
                    if len(out) == k:
                        return out
    return out


def _random_lines(s: Shards, k: int, rng: random.Random) -> list[dict]:
    sizes = [f.stat().st_size for f in s.files]
    total = sum(sizes)
    out: list[dict] = []
    for _ in range(k):
        at = rng.randrange(total)
        i = 0
        while at >= sizes[i]:
            at, i = at - sizes[i], i + 1
        with open(s.files[i], "rb") as fh:
            fh.seek(at)
            fh.readline()  # the rest of the line the offset fell into
            line = fh.readline()
        if line.strip():
            out.append(json.loads(line))
    return out


def _parquet_rows(s: Shards, k: int, rng: random.Random, *, first: bool) -> list[dict]:
    import pyarrow.parquet as pq

    out: list[dict] = []
    groups = [(f, g) for f in s.files for g in range(pq.ParquetFile(f).metadata.num_row_groups)]
    if not first:
        groups = rng.sample(groups, min(len(groups), 4))
    for f, g in groups:
        rows = pq.ParquetFile(f).read_row_group(g).to_pylist()
        out += rows[: k - len(out)] if first else rng.sample(rows, min(len(rows), -(-k // len(groups))))
        if len(out) >= k:
            break
    return out[:k]


# ------------------------------------------------------------------------------------------------ identity
def content_hash(path: Path) -> str:
    """sha256 over the data files' relative names and bytes: the data's identity where no store names it."""
    h = hashlib.sha256()
    base = path if path.is_dir() else path.parent
    for f in data_files(path):
        h.update(str(f.relative_to(base)).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()
