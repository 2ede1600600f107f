"""The safetensors files of a merge: the base's shards read tensor by tensor (memory-mapped), the merged
shards written tensor by tensor, and the files beside them (index, config, tokenizer).

A pre-quantized base (bitsandbytes 4-bit, as `save_pretrained` writes it) stores `<name>.weight` packed and,
beside it, its quantization state: `.absmax`, `.quant_map`, `.nested_absmax`, `.nested_quant_map` and
`.quant_state.bitsandbytes__nf4|fp4`, possibly in another shard than the weight. The merged files hold none of
these: each 4-bit weight becomes one 16-bit tensor of the shape its state records.
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from runner.api.errors import MERGE_FAILED, PermanentError

QUANT_STATE = ".quant_state.bitsandbytes__"
QUANT_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4",
               "quant_state.bitsandbytes__fp4")
COPIED = ("generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*",
          "merges.txt", "*.model", "chat_template*", "*.py")
INDEX = "model.safetensors.index.json"


def fail(message: str) -> PermanentError:
    return PermanentError(f"merge: {message}; set merge.enabled: false to publish the adapter alone",
                          reason=MERGE_FAILED)


class BaseFiles:
    """The base checkpoint's layout: which file holds each tensor, in shard order, and the 4-bit weights
    with their quantization-state companions (which may lie in other shards)."""

    def __init__(self, base_dir: Path):
        self.dir = Path(base_dir)
        index = self.dir / INDEX
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            self.sharded = True
        elif (self.dir / "model.safetensors").is_file():
            with safe_open(str(self.dir / "model.safetensors"), "pt") as f:
                self.weight_map = dict.fromkeys(f.keys(), "model.safetensors")
            self.sharded = False
        else:
            raise fail(f"no safetensors weights in {self.dir} (model.safetensors or {INDEX})")
        self.shards = list(dict.fromkeys(sorted(self.weight_map.values())))
        self.quantized: dict[str, list[str]] = {}  # packed weight key -> its quantization-state keys
        for key in self.weight_map:
            if QUANT_STATE in key:
                self.quantized[key.split(QUANT_STATE)[0]] = []
        for key in self.weight_map:
            for part in QUANT_PARTS:
                owner = key[: -len(part) - 1] if key.endswith("." + part) else None
                if owner in self.quantized:
                    self.quantized[owner].append(key)
                    break
        self.companions = {k for parts in self.quantized.values() for k in parts}

    def keys_of(self, shard: str) -> list[str]:
        """The output keys of one shard: its tensors without the quantization states."""
        return [k for k, s in self.weight_map.items() if s == shard and k not in self.companions]

    def layout(self, shard: str, dtype: torch.dtype, read: Callable[[str], torch.Tensor],
               header: Callable[[str], tuple[str, list[int]]]) -> list[tuple[str, str, list[int]]]:
        """(key, safetensors dtype, shape) of each tensor of the merged shard: floating-point tensors and
        4-bit weights (their shape read from the quantization state) in `dtype`, others as stored."""
        out = []
        for key in self.keys_of(shard):
            stored, shape = header(key)
            if key in self.quantized:
                state = next(k for k in self.quantized[key] if QUANT_STATE in k)
                shape = list(json.loads(bytes(read(state).numpy()).decode())["shape"])
                out.append((key, ST_NAMES[dtype], shape))
            else:
                out.append((key, ST_NAMES[dtype] if stored in _FLOATS else stored, list(shape)))
        return out

    def merged_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of the merged model in `dtype` (headers and quantization states read, no weights)."""
        total = 0
        for shard in self.shards:
            with Reader(self) as r:
                for _, st, shape in self.layout(shard, dtype, r.read, r.header):
                    total += _nbytes(st, shape)
        return total


class Reader:
    """Memory-mapped access to the base's files, each opened once while in use (a 4-bit weight's state may
    lie in another shard than the weight)."""

    def __init__(self, files: BaseFiles):
        self.files, self.opened, self.stack = files, {}, contextlib.ExitStack()

    def __enter__(self):
        self.stack.__enter__()
        return self

    def __exit__(self, *exc):
        self.opened.clear()
        return self.stack.__exit__(*exc)

    def _file(self, key: str):
        src = self.files.weight_map[key]
        if src not in self.opened:
            self.opened[src] = self.stack.enter_context(safe_open(str(self.files.dir / src), "pt"))
        return self.opened[src]

    def read(self, key: str) -> torch.Tensor:
        return self._file(key).get_tensor(key)

    def header(self, key: str) -> tuple[str, list[int]]:
        sl = self._file(key).get_slice(key)
        return sl.get_dtype(), sl.get_shape()


ST_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_FLOATS = {"F64", "F32", "F16", "BF16"}
FLOAT_DTYPES = {torch.float64, torch.float32, torch.float16, torch.bfloat16}


def _nbytes(st: str, shape: list[int]) -> int:
    n = _DTYPE_BYTES[st]
    for d in shape:
        n *= d
    return n


class ShardWriter:
    """Writes one safetensors file tensor by tensor, as the merge produces them: the header (every shape is
    known beforehand) first, then each tensor's bytes, written by a background thread while the next tensor
    is computed, so the merged shard is never whole in memory. Temp file, renamed when complete."""

    def __init__(self, path: Path, layout: list[tuple[str, str, list[int]]]):
        self.path, self.tmp = path, path.with_name(f".{path.name}.tmp")
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key, st, shape in layout:
            n = _nbytes(st, shape)
            header[key] = {"dtype": st, "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
        self.expected = [(key, st, shape) for key, st, shape in layout]
        self.size = offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.file = open(self.tmp, "wb")
        self.file.write(len(raw).to_bytes(8, "little") + raw)
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending: list = []
        self.done = 0

    def write(self, key: str, t: torch.Tensor) -> None:
        want_key, st, shape = self.expected[self.done]
        if key != want_key or ST_NAMES.get(t.dtype, st) != st or list(t.shape) != list(shape):
            raise fail(f"{key} came out as {t.dtype} {list(t.shape)}, expected {st} {shape}")
        self.done += 1
        data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.pending.append(self.pool.submit(self.file.write, data))
        while len(self.pending) > 1:  # at most one tensor waiting behind the one being written
            self.pending.pop(0).result()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        try:
            for f in self.pending:
                f.result()
        finally:
            self.pool.shutdown(wait=True)
            self.file.close()
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return False
        if self.done != len(self.expected):
            raise fail(f"{self.path.name}: {len(self.expected) - self.done} tensors were not written")
        os.replace(self.tmp, self.path)
        return False


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_metadata(files: BaseFiles, out_dir: Path, out_map: dict[str, str], total: int, dtype: str) -> None:
    """The index (for a sharded base), the copied tokenizer and generation files, then config.json."""
    if files.sharded:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(out_map.items()))}
        write_text(out_dir / INDEX, json.dumps(index, indent=2))
    for path in sorted(files.dir.iterdir()):
        if path.is_file() and path.name != "config.json" and any(fnmatch.fnmatch(path.name, p) for p in COPIED):
            _copy(path, out_dir / path.name)
    config = json.loads((files.dir / "config.json").read_text())
    config.pop("quantization_config", None)
    config["dtype"] = dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    write_text(out_dir / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")


def _copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.write_bytes(src.read_bytes())
    os.replace(tmp, dst)
