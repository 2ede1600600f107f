"""The manifest that marks a published output as complete, and the file walk every backend shares."""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

MANIFEST_NAME = "finetune-manifest.json"
MANIFEST_FORMAT = "finetune-manifest/v1"


def iter_files(root: Path) -> list[tuple[str, Path]]:
    """Every regular file under `root` as (posix relative path, path), sorted; the manifest itself excluded."""
    root = Path(root)
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        rel_dir = Path(dirpath).relative_to(root).parts
        # Never published: git metadata and huggingface_hub's per-folder download cache.
        dirnames[:] = sorted(
            d for d in dirnames if d != ".git" and not (d == "huggingface" and rel_dir[-1:] == (".cache",))
        )
        for name in filenames:
            rel = "/".join((*rel_dir, name))
            if rel != MANIFEST_NAME:
                out.append((rel, Path(dirpath) / name))
    return sorted(out)


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def build_manifest(files: list[tuple[str, Path]], job: dict | None = None) -> dict:
    """File list with sizes and sha256 (hashed in parallel: hashlib releases the GIL on large blocks), and
    the job that wrote it (`{"name", "spec"}`: its name and spec fingerprint), so that a later run can tell
    its own earlier output from anything else in the destination."""
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(files)))) as pool:
        digests = list(pool.map(lambda f: sha256_file(f[1]), files))
    entries = [
        {"path": rel, "size": path.stat().st_size, "sha256": digest}
        for (rel, path), digest in zip(files, digests, strict=True)
    ]
    manifest = {
        "format": MANIFEST_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": entries,
        "totalBytes": sum(e["size"] for e in entries),
    }
    if job:
        manifest["job"] = dict(job)
    return manifest


def parse_manifest(data: bytes | str | None) -> dict | None:
    """A manifest read back (None when absent or not one of ours): its `files` entries are checked."""
    if data is None:
        return None
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT or not isinstance(doc.get("files"), list):
        return None
    if not all(isinstance(f, dict) and isinstance(f.get("path"), str) for f in doc["files"]):
        return None
    if not isinstance(doc.get("job"), (dict, type(None))):
        return None
    return doc


def job_of(manifest: dict | None) -> dict:
    """The `job` a manifest records ({} for one written before manifests named their job)."""
    job = (manifest or {}).get("job")
    return job if isinstance(job, dict) else {}


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def listed(*manifests: dict | None) -> set[str]:
    """Every file path the given manifests (or publish markers) list."""
    return {f["path"] for m in manifests if m for f in m.get("files", [])}


def ownership_problem(where: str, present: list[str], manifests: list[dict | None], job: dict | None, fix: str,
                      ours=lambda rel: False) -> str | None:
    """Why the runner may not replace the files `present` at a remote destination (S3 keys or Hub paths,
    relative), or None - the rule local destinations follow (runner/store/local.py): nothing there, or a
    previous output of the same job (`job["name"]`; a manifest from before manifests named their job counts as
    the runner's own) and nothing its manifests do not list. `ours(rel)`: files the runner writes besides
    (manifests, markers, staging)."""
    present = [p for p in present if not ours(p)]
    found = [m for m in manifests if m]
    if not present and not found:
        return None
    if not found:
        shown = ", ".join(sorted(present)[:4])
        return (f"{where} already holds files the runner did not write ({shown}, ...); it never deletes or "
                f"overwrites them: {fix}")
    owners = {job_of(m).get("name") for m in found} - {None}
    if owners and owners != {(job or {}).get("name")}:
        return (f"{where} holds the output of another job ({', '.join(repr(o) for o in sorted(owners))}); the "
                f"runner replaces only this job's own earlier output: {fix}")
    extra = sorted(set(present) - listed(*found))[:4]
    if extra:
        return (f"{where} holds files its earlier output did not ({', '.join(extra)}); the runner never deletes "
                f"them when it replaces that output: {fix}")
    return None
