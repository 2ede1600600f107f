"""Where files live: one small value type for the three kinds of location the runner reads and writes.

    hf://org/name               a Hub model repo (hf://org/name@revision for a branch, tag or commit)
    hf://datasets/org/name      a Hub dataset repo
    s3://bucket/prefix          everything under a prefix, or a single object
    file:///abs/path, a/path    a local file or directory
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Scheme = Literal["hf", "s3", "local"]

_HUB_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_SUPPORTED = "hf://org/name[@revision], hf://datasets/org/name, s3://bucket/prefix, file:///path or a plain path"


@dataclass(frozen=True)
class Location:
    scheme: Scheme
    path: str  # hf: "org/name"; s3: key prefix without leading/trailing "/" (may be ""); local: the path
    bucket: str | None = None  # s3 only
    revision: str | None = None  # hf only
    repo_type: str | None = None  # hf only: "dataset" for hf://datasets/...; None means "as the caller says"

    @classmethod
    def parse(cls, uri: str) -> Location:
        if not isinstance(uri, str) or not uri.strip():
            raise ValueError(f"empty location: give one of {_SUPPORTED}")
        uri = uri.strip()
        m = _SCHEME.match(uri)
        if m is None:
            return cls("local", uri)
        scheme, rest = m.group(1).lower(), uri[m.end():]
        if scheme == "hf":
            return _parse_hf(uri, rest)
        if scheme == "s3":
            return _parse_s3(uri, rest)
        if scheme == "file":
            return _parse_file(uri, rest)
        raise ValueError(f"unsupported scheme '{scheme}://' in '{uri}': use one of {_SUPPORTED}")

    def __str__(self) -> str:
        if self.scheme == "hf":
            prefix = "datasets/" if self.repo_type == "dataset" else ""
            rev = f"@{self.revision}" if self.revision else ""
            return f"hf://{prefix}{self.path}{rev}"
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.path}" if self.path else f"s3://{self.bucket}"
        return self.path

    def child(self, name: str) -> Location:
        """The location of `name` inside this one (a key under the prefix, a path in the directory)."""
        if not name or name.startswith("/") or any(p in ("", ".", "..") for p in name.strip("/").split("/")):
            raise ValueError(f"invalid child name {name!r}: give a relative name without '..' or empty parts")
        name = name.strip("/")
        if self.scheme == "hf":
            raise ValueError(f"{self} is a Hub repo: a Hub repo has no child locations")
        if self.scheme == "s3":
            return Location("s3", f"{self.path}/{name}" if self.path else name, bucket=self.bucket)
        return Location("local", f"{self.path.rstrip('/')}/{name}" if self.path.rstrip("/") else f"/{name}")


def _parse_hf(uri: str, rest: str) -> Location:
    repo, revision = rest, None
    if "@" in rest:
        repo, revision = rest.split("@", 1)
        if not revision:
            raise ValueError(f"empty revision in '{uri}': write hf://org/name@<branch, tag or commit>")
    parts = repo.strip("/").split("/") if repo.strip("/") else []
    repo_type = None
    if len(parts) == 3 and parts[0] == "datasets":
        repo_type, parts = "dataset", parts[1:]
    elif len(parts) == 3 and parts[0] == "models":
        parts = parts[1:]
    if len(parts) != 2:
        raise ValueError(
            f"invalid Hub location '{uri}': write hf://org/name (or hf://datasets/org/name), "
            "with both the owner (user or organization) and the repo name"
        )
    for part in parts:
        if not _HUB_PART.match(part) or ".." in part or len(part) > 96:
            raise ValueError(
                f"invalid Hub repo name '{part}' in '{uri}': use letters, digits, '-', '_' and '.' only"
            )
    return Location("hf", "/".join(parts), revision=revision, repo_type=repo_type)


def _parse_s3(uri: str, rest: str) -> Location:
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"missing bucket in '{uri}': write s3://bucket/prefix")
    if not _BUCKET.match(bucket):
        raise ValueError(f"invalid S3 bucket name '{bucket}' in '{uri}': write s3://bucket/prefix")
    prefix = prefix.strip("/")
    if any(p in ("", ".", "..") for p in prefix.split("/")) and prefix:
        raise ValueError(f"invalid S3 prefix in '{uri}': no empty, '.' or '..' path segments")
    return Location("s3", prefix, bucket=bucket)


def _parse_file(uri: str, rest: str) -> Location:
    host, slash, path = rest.partition("/")
    if host not in ("", "localhost"):
        raise ValueError(f"invalid file URI '{uri}': write file:///absolute/path (three slashes)")
    if not slash or not path.strip("/"):
        raise ValueError(f"invalid file URI '{uri}': it names no path; write file:///absolute/path")
    return Location("local", "/" + path)
