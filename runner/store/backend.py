"""The one interface every store implements (local paths, S3, the Hub, ...), and the registry that picks one.

    backend_for(loc).download(loc, dest)         the Backend of a Location's scheme (registry below)

A Backend is one stateless object per scheme. It reads its credentials and endpoint from the environment at
every call (so a changed environment takes effect at once), never logs or returns a secret, and turns every
failure into a RunnerError from runner.api.errors:

    PermanentError   the user must change something (no credentials, access refused, nothing there, a name
                     that is not allowed); the message names what is wrong and what to set
    RetryableError   retrying may help (endpoint unreachable, 5xx, throttled); the message names the endpoint
    StoreTimeout     (runner/store/timeouts.py, a RetryableError) an operation ran past its deadline

with reason DOWNLOAD_FAILED for reads and UPLOAD_FAILED for writes (INVALID_SPEC when the user's place is
refused: a destination holding files the runner did not write). Every call that reaches a remote endpoint
runs inside `timeouts.operation(...)` with the connect/read limits of FINETUNE_STORE_TIMEOUTS applied to its
client and `timeouts.check()` called before every request, so a frozen endpoint ends the call, never hangs it.

Places are runner.api.uris.Location values of the backend's scheme. `rel` arguments are relative posix paths
("checkpoint-40/COMPLETE"), never absolute, never with "." or ".." parts; a backend maps them to its keys
(S3: "<prefix>/<rel>"; local: "<path>/<rel>").

`store_call` below is that wrapper, given the store's own translation of its client's errors.

Adding a store: one module with a Backend subclass (for an object store, an ObjectBackend subclass providing
its primitives and its error mapping: runner/store/objects.py), one line in _REGISTRY below, a parser entry in
runner/api/uris.py's scheme table, and its fixture param in tests/runner/store/test_contract.py.
"""
from __future__ import annotations

import contextlib
import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from runner.api.errors import INVALID_SPEC, PermanentError, RunnerError
from runner.api.uris import Location

from . import timeouts
from .checksums import Checksum


@dataclass(frozen=True)
class Revision:
    """What a source holds now, named so that equal identities mean the same files (the model cache's key)."""

    source: Location  # what to download to get exactly these files (the Hub: pinned to the commit)
    revision: str  # the commit (Hub), or a digest of the listing: names, sizes, ETags/generations (buckets)
    identity: str  # scheme, ENDPOINT, container, path and revision in one string: one job's endpoint (a fake
    #                one, say) can never fill a cache entry that a job reading another endpoint is handed
    described: str  # how a log line names it: "hf://org/m@<sha>", "s3://b/m (listing 1a2b...)"
    checksums: tuple[Checksum, ...] = ()  # what the store says each file holds (runner/store/checksums.py)
    unverified: tuple[str, ...] = ()  # files it gives no checksum for: the source is then never cached


@dataclass(frozen=True)
class Versioned:
    """A small object read with its version token (S3 ETag, GCS generation, a digest of a local file)."""

    data: bytes
    version: str


class Backend(ABC):
    """Everything the runner does with a place. Subclasses set `scheme` and `folder_word`, and implement the
    abstract methods; a store that can hold checkpoints (runner.api.uris says which) also overrides the
    checkpoint and lease primitives, which otherwise refuse."""

    scheme: ClassVar[str]  # the Location.scheme it serves: "local", "s3", "hf", "gs"
    folder_word: ClassVar[str] = "folder"  # what its places are called in messages: "folder", "prefix", "repo"

    @property
    def can_hold_checkpoints(self) -> bool:
        """Whether checkpoints (and their lease) may live here: the contract's rule, from runner.api.uris."""
        return Location.holds_checkpoints_for(self.scheme)

    # ------------------------------------------------------------------------------------- sources
    @abstractmethod
    def check_source(self, loc: Location, *, repo_type: str = "model") -> None:
        """Before downloading: the source exists and can be read with the credentials in the environment
        (DOWNLOAD_FAILED otherwise; permanent when nothing is there or access is refused). `repo_type`
        ("model" or "dataset") matters only where a store keeps the two apart (the Hub) and loc.repo_type
        is None."""

    @abstractmethod
    def list_names(self, loc: Location, *, repo_type: str = "model") -> list[str] | None:
        """Every file of a remote source, relative to it ("config.json", "tokenizer/vocab.json"): the objects
        under the prefix, the repo's files at its revision. [] when the place is a single object; None when
        the backend cannot list without downloading (local: read the folder yourself; the Hub offline)."""

    @abstractmethod
    def download(self, loc: Location, dest: Path, *, repo_type: str = "model",
                 allow_patterns: list[str] | None = None) -> Path:
        """Fetch the source into the directory `dest` (created) and return where its files are: `dest`, or
        dest/<name> for a single object. Only files whose relative path matches one of `allow_patterns`
        (fnmatch) when given. Each file lands under a temporary name and is renamed into place, so a cut
        download never leaves a half file under a real name; only the source's files stay in `dest` (no
        client bookkeeping). A local source is used in place: its own path, nothing copied."""

    @abstractmethod
    def revision(self, loc: Location, *, repo_type: str = "model") -> Revision | None:
        """What the source holds now, for the shared model cache (one or two calls to the store); None when
        it is not cached: a local source (used in place), or a store that cannot name a revision now (the Hub
        offline). Revision.identity MUST contain the endpoint the environment points at, and
        Revision.checksums what the store says each file holds (its files are cached only when every byte
        matches them; files it gives none for go in Revision.unverified)."""

    def where(self) -> str:
        """The endpoint as messages name it ("the S3 endpoint http://...", "the Hub at https://...")."""
        return f"the {self.scheme} store"

    def local_path(self, loc: Location) -> Path | None:
        """Where the place is on this machine's filesystem, when it is a local one; else None."""
        return None

    @abstractmethod
    def relation(self, place: Location, other: Location) -> str | None:
        """How `place` relates to `other`: "is", "is inside", "contains", or None when they share no file."""

    # ------------------------------------------------------------------------------------- outputs
    @abstractmethod
    def check_destination(self, loc: Location, job: dict | None = None) -> None:
        """Before training: the destination can be written with the credentials in the environment (write a
        probe and remove it, or ask the store for the permission), and what it holds now may be replaced:
        nothing, or only an earlier output of the same job (`job["name"]`) - its manifest lists every file
        there (runner/store/manifest.py `ownership_problem` states the rule and words the refusal, raised as
        PermanentError reason INVALID_SPEC). Files the runner writes besides the output (the manifest, a
        publish marker, staging) do not count against it."""

    @abstractmethod
    def publish(self, local_dir: Path, loc: Location, *, private: bool = True,
                commit_message: str = "Upload fine-tuned model", job: dict | None = None) -> str:
        """Publish the folder `local_dir` (runner/store/manifest.py `iter_files`) to `loc`, all or nothing:
        the ownership rule of check_destination is checked again first; an earlier complete output of this
        job stays complete until the new one is; the manifest (`build_manifest(files, job)`, named
        MANIFEST_NAME, at the top of the place) is written LAST, so a reader that sees it sees every file it
        lists; files only the earlier output had are removed; nothing the runner did not write is ever
        deleted or overwritten. A publish cut short must be recognised and finished by the next run of the
        same job. `private`/`commit_message` matter only where the store has them (the Hub). Returns the
        published URI (what the user opens: an https URL for the Hub, str(loc) elsewhere)."""

    @abstractmethod
    def read_manifest(self, loc: Location) -> dict | None:
        """The manifest published at `loc` (`parse_manifest` of its bytes), or None when there is none."""

    @abstractmethod
    def is_complete(self, loc: Location) -> bool:
        """A complete output is published at `loc`: its manifest exists (and, where the store can tell cheaply,
        every file it lists is there with its size)."""

    @abstractmethod
    def read_text(self, loc: Location, rel: str) -> str | None:
        """The small UTF-8 file `rel` under the place (a checkpoint location's metadata, a published report's
        metrics.json), or None when it is not there."""

    # ------------------------------------------------------------------------------------- checkpoints
    # A checkpoint location holds <name>/<files> per checkpoint, <name>/COMPLETE written last, small metadata
    # files at its top, and the LEASE. runner/store/checkpoints.py builds complete-or-absent saves from these.
    def check_writable(self, loc: Location) -> None:
        """Before training: a checkpoint location can be written (a probe written and removed); what it holds
        is the job's own checkpoints, resumed from, never refused."""
        self._refuse(loc)

    def list_files(self, loc: Location) -> list[str]:
        """The relative path of every file under the place, recursively ([] when there is none)."""
        self._refuse(loc)

    def put_files(self, loc: Location, items: list[tuple[Path, str]]) -> None:
        """Upload (local file, rel) pairs under the place, replacing what is there, concurrently where the
        store allows; large files in parts. Raises on the first failure (nothing half-written stays under a
        real name where the store can avoid it)."""
        self._refuse(loc)

    def get_files(self, loc: Location, items: list[tuple[str, Path]]) -> None:
        """Download (rel, local file) pairs; each lands under a temporary name and is renamed into place."""
        self._refuse(loc)

    def delete_files(self, loc: Location, rels: list[str]) -> None:
        """Delete these files under the place (a file already gone is no error); folders left empty go too."""
        self._refuse(loc)

    def write_text(self, loc: Location, rel: str, text: str) -> None:
        """Write the small UTF-8 file `rel` under the place, replacing it whole (a reader never sees half)."""
        self._refuse(loc)

    # ------------------------------------------------------------------------------------- the lease
    # One small object with conditional writes (runner/store/lease.py): each call is atomic in the store.
    def create_if_absent(self, loc: Location, rel: str, data: bytes) -> str | None:
        """Create `rel` holding `data` only if it does not exist; its new version, or None when it existed."""
        self._refuse(loc)

    def read_versioned(self, loc: Location, rel: str) -> Versioned | None:
        """`rel`'s bytes and version, or None when it does not exist."""
        self._refuse(loc)

    def replace_if_unchanged(self, loc: Location, rel: str, data: bytes, version: str) -> str | None:
        """Overwrite `rel` with `data` only if its version is still `version` (never absent in between); the new
        version, or None when it changed or went away meanwhile."""
        self._refuse(loc)

    def delete_if_unchanged(self, loc: Location, rel: str, version: str) -> bool:
        """Delete `rel` only if its version is still `version`; whether it was deleted."""
        self._refuse(loc)

    def _refuse(self, loc: Location):
        raise PermanentError(f"{loc} cannot hold checkpoints: set output.checkpoints to a place that can "
                             f"({Location.checkpoint_schemes()})", reason=INVALID_SPEC)


@contextlib.contextmanager
def store_call(what: str, where: str, reason: str,
               translate: Callable[[BaseException], RunnerError | None]) -> Iterator[None]:
    """One operation on a remote store (`what`: "download s3://b/p", against `where`: "the S3 endpoint ..."): it
    ends within its deadline (timeouts.py), and its client's failures become the RunnerErrors `translate` gives
    (None: not a storage failure, raised unchanged)."""
    try:
        with timeouts.operation(what, where, reason):
            yield
    except RunnerError:
        raise
    except Exception as exc:  # noqa: BLE001 - translated below or re-raised unchanged
        err = translate(exc)
        if err is None:
            raise
        raise err from exc


# ----------------------------------------------------------------------------------------- the registry
_REGISTRY: dict[str, str] = {  # scheme -> "module:Class", imported on first use (import runner.store stays cheap)
    "local": "runner.store.local:LocalBackend",
    "s3": "runner.store.s3:S3Backend",
    "hf": "runner.store.hub:HubBackend",
    "gs": "runner.store.gcs:GcsBackend",
}
_instances: dict[str, Backend] = {}


def backend_for(loc: Location | str) -> Backend:
    """The Backend of a place's scheme (a Location, or a scheme name such as "s3")."""
    scheme = loc if isinstance(loc, str) else loc.scheme
    backend = _instances.get(scheme)
    if backend is None:
        target = _REGISTRY.get(scheme)
        if target is None:
            raise PermanentError(f"no store handles {scheme}:// places in this runner", reason=INVALID_SPEC)
        module, _, name = target.partition(":")
        backend = _instances[scheme] = getattr(importlib.import_module(module), name)()
    return backend
