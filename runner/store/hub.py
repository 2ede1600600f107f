"""The Hugging Face Hub through huggingface_hub (1.33 or 2.x): the Backend of hf:// places (sources and
published outputs; the Hub holds no checkpoints).

huggingface_hub reads HF_ENDPOINT once, at import. This module reads HF_ENDPOINT and HF_TOKEN from the
environment at every call and passes them explicitly (endpoint=..., token=...), and builds a new HfApi per
call, so a changed environment always takes effect. Every request runs under the limits of FINETUNE_STORE_TIMEOUTS
(runner/store/timeouts.py): huggingface_hub's shared HTTP client is built with them (`_configure`).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from runner.api.errors import DOWNLOAD_FAILED, INVALID_SPEC, UPLOAD_FAILED, PermanentError, RetryableError, RunnerError

from . import checksums, timeouts
from .backend import Backend, Revision, store_call
from .manifest import MANIFEST_NAME, build_manifest, iter_files, listed, manifest_bytes, ownership_problem, parse_manifest
from runner.api.uris import Location

TOKEN_HINT = "set HF_TOKEN to a Hugging Face access token (e.g. from a Kubernetes Secret)"
_TRANSPORT_ERRORS = {"TransportError", "TimeoutException", "NetworkError", "ConnectError", "ProtocolError",
                     "RemoteProtocolError", "ReadError", "WriteError", "ProxyError"}


def endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or None


def token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


def _base_url() -> str:
    if endpoint():
        return endpoint()
    from huggingface_hub import constants

    return constants.ENDPOINT


def where() -> str:
    """The endpoint as messages and the store limits name it."""
    return f"the Hub at {_base_url()}"


_configured: list = [None]
_configure_lock = threading.Lock()


def _configure() -> None:
    """huggingface_hub's shared client with the connect/read limits, and a deadline check before every request
    (its default client has no timeout at all: a frozen endpoint would hang a call for ever)."""
    limits = timeouts.limits()
    with _configure_lock:
        if _configured[0] == limits:
            return
        import httpx2
        from huggingface_hub import constants
        from huggingface_hub.utils import _http

        def limit(request) -> None:
            """Before each request: the deadline, and the limits wherever the caller left a timeout unset (HfApi
            passes timeout=None explicitly, which overrides a client's default)."""
            timeouts.sending(where())
            given = dict(request.extensions.get("timeout") or {})
            for key, value in (("connect", limits.connect), ("read", limits.read), ("write", limits.read),
                               ("pool", limits.connect)):
                if given.get(key) is None:
                    given[key] = value
            request.extensions["timeout"] = given

        def factory():
            return httpx2.Client(event_hooks={"request": [_http.hf_request_event_hook, limit],
                                              "response": [lambda _response: timeouts.answered(where())]},
                                 follow_redirects=True, timeout=httpx2.Timeout(limits.read, connect=limits.connect))

        _http.set_client_factory(factory)
        # Downloads and metadata requests pass their own timeout (these constants): the same limits.
        constants.HF_HUB_DOWNLOAD_TIMEOUT = limits.read
        constants.HF_HUB_ETAG_TIMEOUT = limits.read
        from huggingface_hub import file_download

        if hasattr(file_download, "_ETAG_RETRY_TIMEOUT"):  # its second try of a file's metadata: 60 s, fixed
            file_download._ETAG_RETRY_TIMEOUT = limits.read
        _configured[0] = limits


def _api():
    from huggingface_hub import HfApi

    _configure()
    return HfApi(endpoint=endpoint(), token=token())


def _repo_type(loc: Location, default: str) -> str:
    return loc.repo_type or default or "model"


def repo_url(loc: Location, repo_type: str = "model") -> str:
    prefix = {"dataset": "datasets/", "space": "spaces/"}.get(_repo_type(loc, repo_type), "")
    tree = f"/tree/{loc.revision}" if loc.revision and loc.revision != "main" else ""
    return f"{_base_url()}/{prefix}{loc.path}{tree}"


# ---------------------------------------------------------------------------------------------- errors
def translate(exc: BaseException, *, action: str, uri: str, reason: str) -> RunnerError | None:
    """The RunnerError for a huggingface_hub / HTTP failure, or None when it is none of those."""
    from huggingface_hub import errors as he

    gated = getattr(he, "GatedRepoError", ())
    disabled = getattr(he, "DisabledRepoError", ())
    repo_missing = getattr(he, "RepositoryNotFoundError", ())
    rev_missing = getattr(he, "RevisionNotFoundError", ())
    entry_missing = getattr(he, "RemoteEntryNotFoundError", None) or getattr(he, "EntryNotFoundError", ())
    offline = getattr(he, "OfflineModeIsEnabled", ())
    no_token = getattr(he, "LocalTokenNotFoundError", ())
    http_error = getattr(he, "HfHubHTTPError", ())
    invalid_id = getattr(he, "HFValidationError", ())
    what = f"cannot {action} {uri}"
    known = (  # (the error, what the user must do), the first match wins
        (gated, ("the repo is gated; accept its conditions on the Hub with the account whose token is in "
                 "HF_TOKEN (or request access), then run again")),
        (disabled, "the repo is disabled on the Hub; use another repo"),
        (rev_missing, "revision not found; fix the @revision (a branch, tag or commit)"),
        (repo_missing, ("repo not found, or private and not readable with the token given; check the repo "
                        f"name, and for a private repo {TOKEN_HINT} with read access to it")),
        (entry_missing, "file not found in the repo"),
        (offline, "HF_HUB_OFFLINE is set and the files are not cached; unset HF_HUB_OFFLINE"),
        (no_token, f"no Hub token; {TOKEN_HINT}"),
    )
    seen: set[int] = set()
    e: BaseException | None = exc
    # snapshot_download hides the HTTP error behind a LocalEntryNotFoundError: walk the chain to find it.
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, RunnerError):
            return e
        fix = next((fix for kind, fix in known if isinstance(e, kind)), None)
        if fix is not None:
            return PermanentError(f"{what}: {fix}", reason=reason)
        if isinstance(e, http_error) and getattr(e, "response", None) is not None:
            status = e.response.status_code
            if status in (401, 403):
                access = "write" if reason == UPLOAD_FAILED else "read"
                return PermanentError(
                    f"{what}: the Hub refused the request ({status}); the token in HF_TOKEN is missing, invalid or "
                    f"lacks permission for this repo: {TOKEN_HINT} with {access} access",
                    reason=reason,
                )
            if status == 429 or status >= 500:
                return RetryableError(f"{what}: the Hub answered {status} (transient); retrying may help",
                                      reason=reason)
            return PermanentError(f"{what}: the Hub answered {status}: {_short(e)}", reason=reason)
        if isinstance(e, invalid_id):
            return PermanentError(f"{what}: invalid repo id or revision: {_short(e)}", reason=reason)
        if _is_transport_error(e):
            return RetryableError(
                f"{what}: could not reach the Hub at {_base_url()} ({type(e).__name__}; "
                f"{timeouts.ENV}={timeouts.limits().describe()}); retrying may help; if it persists check "
                "HF_ENDPOINT and the network",
                reason=reason,
            )
        e = e.__cause__ or e.__context__
    # snapshot_download's "check your internet connection" without a recognisable cause: a connection problem.
    local_missing = getattr(he, "LocalEntryNotFoundError", ())
    if isinstance(exc, local_missing):
        return RetryableError(f"{what}: the Hub at {_base_url()} could not be reached: {_short(exc)}", reason=reason)
    return None


def _is_transport_error(e: BaseException) -> bool:
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    return any(c.__name__ in _TRANSPORT_ERRORS and c.__module__.split(".")[0].startswith("httpx")
               for c in type(e).__mro__)


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")


@contextlib.contextmanager
def errors(action: str, uri: str, reason: str) -> Iterator[None]:
    """One Hub operation: its failures become RunnerErrors, and it ends within the deadline (timeouts.py)."""
    _configure()
    with store_call(f"{action} {uri}", where(), reason,
                    lambda exc: translate(exc, action=action, uri=uri, reason=reason)):
        yield


# ---------------------------------------------------------------------------------------------- public
def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def check_source(loc: Location, repo_type: str = "model") -> None:
    if offline():  # files come from the local cache; download() says so if they are not there
        return
    with errors("read", str(loc), DOWNLOAD_FAILED):
        _api().repo_info(loc.path, repo_type=_repo_type(loc, repo_type), revision=loc.revision)


FIX = ("set output.destination to a new repo (or one holding only this job's earlier output), or move those "
       "files out of the repo yourself: the runner never deletes them")


def _remote_state(api, loc: Location, rtype: str) -> tuple[list[str], dict | None]:
    """(the files at the destination's revision, .gitattributes aside; its manifest) - nothing for a repo or
    branch that does not exist yet."""
    from huggingface_hub import errors as he

    try:
        files = [f for f in api.list_repo_files(loc.path, repo_type=rtype, revision=loc.revision)
                 if f != ".gitattributes"]
    except (he.RepositoryNotFoundError, he.RevisionNotFoundError):
        return [], None
    if MANIFEST_NAME not in files:
        return files, None
    with tempfile.TemporaryDirectory(prefix="finetune-manifest-") as tmp:
        path = api.hf_hub_download(loc.path, MANIFEST_NAME, repo_type=rtype, revision=loc.revision, local_dir=tmp)
        return files, parse_manifest(Path(path).read_bytes())


def _owned(api, loc: Location, rtype: str, job: dict | None) -> tuple[list[str], dict | None]:
    files, manifest = _remote_state(api, loc, rtype)
    problem = ownership_problem(f"output.destination: {loc}", files, [manifest], job, FIX,
                                ours=lambda rel: rel == MANIFEST_NAME)
    if problem:
        raise PermanentError(problem, reason=INVALID_SPEC)
    return files, manifest


def check_destination(loc: Location, job: dict | None = None) -> None:
    """Before training: a token with write access, and what the repo holds may be replaced by this job."""
    uri = str(loc)
    if not token():
        raise PermanentError(f"cannot publish to {uri}: no Hub token; {TOKEN_HINT} with write access",
                             reason=UPLOAD_FAILED)
    with errors("publish to", uri, UPLOAD_FAILED):
        api = _api()
        info = api.whoami()
        role = ((info.get("auth") or {}).get("accessToken") or {}).get("role")
        if role == "read":
            raise PermanentError(
                f"cannot publish to {uri}: the token in HF_TOKEN is read-only; {TOKEN_HINT} with write access",
                reason=UPLOAD_FAILED,
            )
        _owned(api, loc, _repo_type(loc, "model"), job)


def list_names(loc: Location, repo_type: str = "model") -> list[str] | None:
    """The files of a source repo at its revision (None when offline: the cache decides)."""
    if offline():
        return None
    with errors("read", str(loc), DOWNLOAD_FAILED):
        return list(_api().list_repo_files(loc.path, repo_type=_repo_type(loc, repo_type), revision=loc.revision))


def read_manifest(loc: Location) -> dict | None:
    with errors("read", str(loc), DOWNLOAD_FAILED):
        return _remote_state(_api(), loc, _repo_type(loc, "model"))[1]


def download(loc: Location, dest: Path, repo_type: str = "model", allow_patterns: list[str] | None = None) -> Path:
    from huggingface_hub import snapshot_download

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with errors("download", str(loc), DOWNLOAD_FAILED):
        path = snapshot_download(
            loc.path,
            repo_type=_repo_type(loc, repo_type),
            revision=loc.revision,
            local_dir=str(dest),
            token=token(),
            endpoint=endpoint(),
            allow_patterns=allow_patterns,
            max_workers=8,
        )
    # huggingface_hub's bookkeeping for local_dir downloads: not the source's files
    shutil.rmtree(dest / ".cache" / "huggingface", ignore_errors=True)
    with contextlib.suppress(OSError):
        (dest / ".cache").rmdir()
    return Path(path)


def publish(local_dir: Path, loc: Location, *, private: bool, commit_message: str, job: dict | None = None) -> str:
    """Create the repo if needed, then ONE commit with every file and the manifest (the earlier output is
    replaced only by that commit, once the new one is complete); files the earlier output's manifest listed and
    this output does not have are deleted in the same commit. A repo holding anything else is refused."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    uri = str(loc)
    rtype = _repo_type(loc, "model")
    if not token():
        raise PermanentError(f"cannot publish to {uri}: no Hub token; {TOKEN_HINT} with write access",
                             reason=UPLOAD_FAILED)
    files = iter_files(Path(local_dir))
    manifest = build_manifest(files, job)
    with errors("publish to", uri, UPLOAD_FAILED):
        api = _api()
        api.create_repo(loc.path, repo_type=rtype, private=private, exist_ok=True)
        info = api.repo_info(loc.path, repo_type=rtype)
        if private and info.private is False:
            raise PermanentError(
                f"cannot publish to {uri}: the repo already exists and is public, but the output is meant to be "
                "private; make the repo private on the Hub, publish elsewhere, or set output.private: false",
                reason=UPLOAD_FAILED,
            )
        if loc.revision and loc.revision != "main":
            api.create_branch(loc.path, branch=loc.revision, repo_type=rtype, exist_ok=True)
        remote, old = _owned(api, loc, rtype, job)  # nothing there but this job's earlier output
        new = {rel for rel, _ in files} | {MANIFEST_NAME}
        operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)) for rel, path in files]
        operations.append(CommitOperationAdd(path_in_repo=MANIFEST_NAME, path_or_fileobj=manifest_bytes(manifest)))
        operations += [CommitOperationDelete(path_in_repo=p) for p in remote if p not in new and p in listed(old)]
        api.create_commit(loc.path, operations=operations, commit_message=commit_message, repo_type=rtype,
                          revision=loc.revision)
    return repo_url(loc, rtype)


def is_complete(loc: Location) -> bool:
    with errors("read", str(loc), DOWNLOAD_FAILED):
        return bool(_api().file_exists(loc.path, MANIFEST_NAME, repo_type=_repo_type(loc, "model"),
                                       revision=loc.revision))


def revision(loc: Location, repo_type: str = "model") -> Revision | None:
    """The commit a branch or tag points at now (None offline: nothing to resolve it with)."""
    if offline():
        return None
    rtype = _repo_type(loc, repo_type)
    with errors("read", str(loc), DOWNLOAD_FAILED):
        sha = _api().repo_info(loc.path, repo_type=rtype, revision=loc.revision).sha
        entries = [e for e in _api().list_repo_tree(loc.path, repo_type=rtype, revision=sha, recursive=True)
                   if getattr(e, "size", None) is not None]  # files (folders have no size)
    sums = [(e.path, checksums.of_hub_entry(e.path, e.size, getattr(e, "blob_id", None),
                                            getattr(getattr(e, "lfs", None), "sha256", None))) for e in entries]
    files = hashlib.sha256("\n".join(sorted(c.token() for _, c in sums if c)).encode()).hexdigest()[:16]
    pinned = Location("hf", loc.path, revision=sha, repo_type=loc.repo_type)
    # the files' hashes in the key too: a server answering with this commit but other files is another entry
    return Revision(pinned, sha, f"hf|{_base_url()}|{rtype}|{loc.path}|{sha}|{files}", str(pinned),
                    tuple(c for _, c in sums if c), tuple(p for p, c in sums if c is None))


def read_text(loc: Location, rel: str) -> str | None:
    from huggingface_hub import errors as he

    rtype = _repo_type(loc, "model")
    with errors("read", str(loc), DOWNLOAD_FAILED), tempfile.TemporaryDirectory(prefix="finetune-read-") as tmp:
        api = _api()
        if not api.file_exists(loc.path, rel, repo_type=rtype, revision=loc.revision):
            return None
        try:
            path = api.hf_hub_download(loc.path, rel, repo_type=rtype, revision=loc.revision, local_dir=tmp)
        except (he.RepositoryNotFoundError, he.RevisionNotFoundError):
            return None
        return Path(path).read_text(encoding="utf-8")


class HubBackend(Backend):
    scheme = "hf"
    folder_word = "repo"

    def check_source(self, loc: Location, *, repo_type: str = "model") -> None:
        check_source(loc, repo_type)

    def list_names(self, loc: Location, *, repo_type: str = "model") -> list[str] | None:
        return list_names(loc, repo_type)

    def download(self, loc: Location, dest: Path, *, repo_type: str = "model",
                 allow_patterns: list[str] | None = None) -> Path:
        return download(loc, dest, repo_type, allow_patterns)

    def revision(self, loc: Location, *, repo_type: str = "model") -> Revision | None:
        return revision(loc, repo_type)

    def where(self) -> str:
        return where()

    def relation(self, place: Location, other: Location) -> str | None:
        same = (other.scheme == place.scheme and other.path == place.path
                and (other.repo_type or "model") == (place.repo_type or "model"))
        return "is" if same else None

    def check_destination(self, loc: Location, job: dict | None = None) -> None:
        check_destination(loc, job)

    def publish(self, local_dir: Path, loc: Location, *, private: bool = True,
                commit_message: str = "Upload fine-tuned model", job: dict | None = None) -> str:
        return publish(Path(local_dir), loc, private=private, commit_message=commit_message, job=job)

    def read_manifest(self, loc: Location) -> dict | None:
        return read_manifest(loc)

    def is_complete(self, loc: Location) -> bool:
        return is_complete(loc)

    def read_text(self, loc: Location, rel: str) -> str | None:
        return read_text(loc, rel)
