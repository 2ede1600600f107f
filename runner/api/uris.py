"""Where files live: one small value type for every kind of place the runner reads and writes, and the table of
the schemes it knows (the one place a scheme's syntax and its contract rules are written).

    hf://org/name               a Hub model repo (hf://org/name@revision for a branch, tag or commit)
    hf://datasets/org/name      a Hub dataset repo
    s3://bucket/prefix          everything under a prefix, or a single object (S3 and S3-compatible stores)
    gs://bucket/prefix          the same on Google Cloud Storage
    file:///abs/path, a/path    a local file or directory

What a store does with a place is runner/store's (one Backend per scheme); this module only parses and names.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Callable, Literal

Scheme = Literal["hf", "s3", "gs", "local"]

_HUB_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


@dataclass(frozen=True)
class SchemeRule:
    """What the contract knows of one scheme."""

    name: str  # Location.scheme
    title: str  # how messages name the store
    noun: str  # how messages name one of its places
    example: str  # how a user writes it
    style: Literal["repo", "bucket", "path"]  # how its places are named: Hub repo, bucket + key prefix, file path
    holds_checkpoints: bool  # whether output.checkpoints (and its lease) may live there
    copy: str | None = None  # the command that copies a folder of it here ({uri} {dest}), for places
    #                          from_pretrained cannot read itself (the Hub and local paths it can)


SCHEMES: dict[str, SchemeRule] = {r.name: r for r in (
    SchemeRule("hf", "the Hub", "a Hub repo", "hf://org/name[@revision], hf://datasets/org/name", "repo",
               holds_checkpoints=False),
    SchemeRule("s3", "S3", "an S3 prefix", "s3://bucket/prefix", "bucket", holds_checkpoints=True,
               copy="aws s3 cp --recursive {uri} {dest}"),
    SchemeRule("gs", "GCS", "a GCS prefix", "gs://bucket/prefix", "bucket", holds_checkpoints=True,
               copy="gcloud storage cp --recursive {uri} {dest}"),
    SchemeRule("local", "local", "a local path", "file:///path or a plain path", "path", holds_checkpoints=True),
)}
_SUPPORTED = ", ".join(r.example for r in SCHEMES.values())


@dataclass(frozen=True)
class Location:
    scheme: Scheme
    path: str  # hf: "org/name"; s3/gs: key prefix without leading/trailing "/" (may be ""); local: the path
    bucket: str | None = None  # s3/gs only
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
        parser = _PARSERS.get(scheme)
        if parser is None:
            raise ValueError(f"unsupported scheme '{scheme}://' in '{uri}': use one of {_SUPPORTED}")
        return parser(uri, rest, scheme)

    @property
    def rule(self) -> SchemeRule:
        return SCHEMES[self.scheme]

    @property
    def holds_checkpoints(self) -> bool:
        return self.rule.holds_checkpoints

    @property
    def hub_id(self) -> str | None:
        """Its id on the Hugging Face Hub ("org/name"), for a model card's links and metadata; None elsewhere."""
        return self.path if self.rule.style == "repo" else None

    @property
    def local(self) -> bool:
        """A path on this machine (or a volume mounted here)."""
        return self.rule.style == "path"

    def copy_command(self, dest: str) -> str | None:
        """The shell command that copies the folder here to `dest`, where from_pretrained cannot read the place
        itself; None where it can (the Hub, a local path)."""
        return self.rule.copy.format(uri=self, dest=dest) if self.rule.copy else None

    @staticmethod
    def holds_checkpoints_for(scheme: str) -> bool:
        return SCHEMES[scheme].holds_checkpoints

    @staticmethod
    def checkpoint_schemes() -> str:
        """The places checkpoints may live, as a user writes them ("s3://bucket/prefix, gs://..., ...")."""
        return ", ".join(r.example for r in SCHEMES.values() if r.holds_checkpoints)

    def __str__(self) -> str:
        style = self.rule.style
        if style == "repo":
            prefix = "datasets/" if self.repo_type == "dataset" else ""
            rev = f"@{self.revision}" if self.revision else ""
            return f"hf://{prefix}{self.path}{rev}"
        if style == "bucket":
            return f"{self.scheme}://{self.bucket}/{self.path}" if self.path else f"{self.scheme}://{self.bucket}"
        return self.path

    def child(self, name: str) -> Location:
        """The location of `name` inside this one (a key under the prefix, a path in the directory)."""
        if not name or name.startswith("/") or any(p in ("", ".", "..") for p in name.strip("/").split("/")):
            raise ValueError(f"invalid child name {name!r}: give a relative name without '..' or empty parts")
        name = name.strip("/")
        style = self.rule.style
        if style == "repo":
            raise ValueError(f"{self} is a Hub repo: a Hub repo has no child locations")
        if style == "bucket":
            return replace(self, path=f"{self.path}/{name}" if self.path else name)
        return Location("local", f"{self.path.rstrip('/')}/{name}" if self.path.rstrip("/") else f"/{name}")

    def sibling(self, suffix: str) -> Location:
        """The place named like this one with `suffix` added ("/out/run" -> "/out/run.checkpoints")."""
        return Location.parse(str(self).rstrip("/") + suffix)

    def as_kind(self, repo_type: str) -> Location:
        """This place read as a `repo_type` ("model", "dataset") where the store keeps the two apart (the Hub:
        hf://org/name given as dataset.source is a dataset repo); unchanged elsewhere or when already said."""
        if self.rule.style != "repo" or self.repo_type is not None:
            return self
        return replace(self, repo_type=repo_type)


def _parse_hf(uri: str, rest: str, _scheme: str) -> Location:
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


def _parse_bucket(uri: str, rest: str, scheme: str) -> Location:
    store = SCHEMES[scheme].title
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"missing bucket in '{uri}': write {scheme}://bucket/prefix")
    if not _BUCKET.match(bucket):
        raise ValueError(f"invalid {store} bucket name '{bucket}' in '{uri}': write {scheme}://bucket/prefix")
    prefix = prefix.strip("/")
    if any(p in ("", ".", "..") for p in prefix.split("/")) and prefix:
        raise ValueError(f"invalid {store} prefix in '{uri}': no empty, '.' or '..' path segments")
    return Location(scheme, prefix, bucket=bucket)  # type: ignore[arg-type]


def _parse_file(uri: str, rest: str, _scheme: str) -> Location:
    host, slash, path = rest.partition("/")
    if host not in ("", "localhost"):
        raise ValueError(f"invalid file URI '{uri}': write file:///absolute/path (three slashes)")
    if not slash or not path.strip("/"):
        raise ValueError(f"invalid file URI '{uri}': it names no path; write file:///absolute/path")
    return Location("local", "/" + path)


_PARSERS: dict[str, Callable[[str, str, str], Location]] = {
    "hf": _parse_hf, "s3": _parse_bucket, "gs": _parse_bucket, "file": _parse_file,
}
