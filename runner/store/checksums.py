"""What a store says each file of a source holds, and the check of downloaded files against it: the model cache
fills an entry other jobs read only with files whose every byte matched (runner/store/cache.py).

    Checksum(rel, size, kind, value)   one file as the store lists it, `rel` relative to the download's root
    of_s3_etag(rel, size, etag)        S3's ETag: the MD5 of a single-part object, or the MD5 of its parts' MD5s
                                       followed by "-<parts>" (verified by trying the part sizes uploaders use)
    of_hub_entry(rel, size, oid, lfs)  the Hub's tree entry: an LFS file's sha256, else its git blob id (sha1)
    verify(root, checksums)            which files under `root` are not what the store listed (missing, another
                                       size, other bytes), and which cannot be told (a multipart ETag that no
                                       part size uploaders use reproduces)

A store that gives no checksum for a file (GCS generations, an S3 ETag of an encrypted object) gives None: such
a source is downloaded for the job alone, never into the shared cache.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20
_PART_SIZES = tuple(n * MIB for n in (8, 5, 16, 15, 32, 64, 10, 50, 100, 128, 256, 512))  # aws cli / boto3 first
_CHUNK = 4 * MIB


@dataclass(frozen=True)
class Checksum:
    rel: str
    size: int
    kind: str  # "md5", "s3-multipart", "sha256", "git-sha1"
    value: str

    def token(self) -> str:
        return f"{self.rel}:{self.size}:{self.kind}:{self.value}"


def of_s3_etag(rel: str, size: int, etag: str) -> Checksum | None:
    value = etag.strip('"').lower()
    if re.fullmatch(r"[0-9a-f]{32}", value):
        return Checksum(rel, size, "md5", value)
    if re.fullmatch(r"[0-9a-f]{32}-[0-9]+", value):
        return Checksum(rel, size, "s3-multipart", value)
    return None


def of_hub_entry(rel: str, size: int, oid: str | None, lfs_sha256: str | None) -> Checksum | None:
    if lfs_sha256:
        return Checksum(rel, size, "sha256", lfs_sha256.lower())
    return Checksum(rel, size, "git-sha1", oid.lower()) if oid else None


@dataclass(frozen=True)
class Verdict:
    mismatched: list[str]  # "rel (why)": bytes that are not what the store listed
    unverified: list[str]  # rel: files whose checksum could not be reproduced either way


def _digests(path: Path, size: int, kind: str, value: str) -> bool | None:
    """Whether the file hashes to `value` (None: a multipart ETag no part size reproduces, so unknown)."""
    if kind == "s3-multipart":
        parts = int(value.rsplit("-", 1)[1])
        guess = -(-size // parts)  # the smallest part size that makes this many parts
        sizes = [s for s in dict.fromkeys(_PART_SIZES + (guess, -(-guess // MIB) * MIB))
                 if s and -(-size // s) == parts]
        return True if any(_multipart(path, s) == value for s in sizes) else None
    h = hashlib.md5() if kind == "md5" else hashlib.sha256() if kind == "sha256" else hashlib.sha1()
    if kind == "git-sha1":
        h.update(b"blob %d\0" % size)
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest() == value


def _multipart(path: Path, part_size: int) -> str:
    digests, parts = hashlib.md5(), 0
    with open(path, "rb") as f:
        while part := f.read(part_size):
            digests.update(hashlib.md5(part).digest())
            parts += 1
    return f"{digests.hexdigest()}-{parts}"


def verify(root: Path, checksums: tuple[Checksum, ...]) -> Verdict:
    """Each listed file under `root` hashed and compared with what the store listed."""
    bad, unknown = [], []
    for c in checksums:
        path = root / c.rel
        try:
            size = path.stat().st_size
        except OSError:
            bad.append(f"{c.rel} (missing)")
            continue
        if size != c.size:
            bad.append(f"{c.rel} ({size} bytes, listed as {c.size})")
            continue
        same = _digests(path, c.size, c.kind, c.value)
        if same is None:
            unknown.append(c.rel)
        elif not same:
            bad.append(f"{c.rel} (its bytes do not match its {c.kind} {c.value})")
    return Verdict(bad, unknown)
