"""Small helpers shared by the storage tests."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

MIB = 1 << 20


def make_output(root: Path, big_mib: int = 0) -> Path:
    """A model-like folder: nested files, an empty file, and optionally one large (multipart) file."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}\n')
    (root / "tokenizer").mkdir(exist_ok=True)
    (root / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0"}\n')
    (root / "empty.txt").write_bytes(b"")
    (root / "model.safetensors").write_bytes(os.urandom(big_mib * MIB + 12345 if big_mib else 4096))
    return root


def digests(root: Path, skip: tuple[str, ...] = (".cache/",)) -> dict[str, str]:
    """sha256 of every file under root, by posix relative path."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not rel.startswith(skip):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def bytes_digests(files: dict[str, bytes]) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}
