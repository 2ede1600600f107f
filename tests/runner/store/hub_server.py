"""A small Hugging Face Hub-API-compatible HTTP server for tests (loopback only, state in memory).

It answers the routes the real huggingface_hub client uses for create_repo, create_commit / upload_folder,
repo_info, list_repo_tree / list_repo_files, paths-info, file_exists, hf_hub_download and snapshot_download:

    GET  /api/whoami-v2
    POST /api/repos/create                          409 when the repo exists
    DELETE /api/repos/delete
    POST /api/validate-yaml                         (a README.md in a commit makes the client call it)
    GET  /api/{models,datasets}/{org}/{name}[/revision/{rev}]
    GET  /api/{models,datasets}/{org}/{name}/tree/{rev}[/{path}]   ?recursive=1
    POST /api/{models,datasets}/{org}/{name}/paths-info/{rev}
    POST /api/{models,datasets}/{org}/{name}/preupload/{rev}     always uploadMode "regular" (no LFS, no Xet)
    POST /api/{models,datasets}/{org}/{name}/commit/{rev}        NDJSON: header, file, deletedFile, deletedFolder
    POST /api/{models,datasets}/{org}/{name}/branch/{branch}
    HEAD/GET /[datasets/]{org}/{name}/resolve/{rev}/{path}     Range, true Content-Length, ETag, X-Repo-Commit

Traps it avoids: HEAD answers the true Content-Length (0 makes the client cache empty files), and a missing
file is a 404 with `X-Error-Code: EntryNotFound`. Every request needs `Authorization: Bearer <token>`
(401 without it) unless `anonymous_reads` is set, which lets public repos be read without a token.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    snapshots: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit sha -> files
    api_commits: int = 0  # commits made through the commit endpoint (seeding is not counted)

    def new_commit(self, branch: str, files: dict[str, bytes]) -> str:
        sha = uuid.uuid4().hex + uuid.uuid4().hex[:8]
        self.snapshots[sha] = dict(files)
        self.refs[branch] = sha
        return sha

    def resolve(self, rev: str) -> str | None:
        if rev in self.refs:
            return self.refs[rev]
        if rev in self.snapshots:
            return rev
        return None


class HubState:
    def __init__(self, token: str):
        self.token = token
        self.anonymous_reads = False
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str, bool]] = []  # (method, path, had a valid token)
        self._failures: list[int] = []

    def reset(self) -> None:
        with self.lock:
            self.anonymous_reads = False
            self.repos.clear()
            self.requests.clear()
            self._failures.clear()


class HubServer:
    """Start with .start(); .url is its base URL. Seed repos with .seed(), inspect with .files()/.commits()."""

    def __init__(self, token: str | None = None, host: str = "127.0.0.1", port: int = 0):
        self.state = HubState(token or "hf_" + uuid.uuid4().hex)
        state = self.state

        class Handler(_Handler):
            pass

        Handler.state = state
        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self.url = f"http://{host}:{self._httpd.server_address[1]}"

    # ------------------------------------------------------------------------------ lifecycle
    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def reset(self) -> None:
        self.state.reset()

    # ------------------------------------------------------------------------------ test API
    @property
    def token(self) -> str:
        return self.state.token

    @property
    def anonymous_reads(self) -> bool:
        return self.state.anonymous_reads

    @anonymous_reads.setter
    def anonymous_reads(self, value: bool) -> None:
        self.state.anonymous_reads = value

    @property
    def requests(self) -> list[tuple[str, str, bool]]:
        return list(self.state.requests)

    def seed(self, repo_id: str, files: dict[str, bytes], repo_type: str = "model", *, private: bool = False,
             branch: str = "main") -> str:
        """Create (or add a commit to) a repo holding exactly `files`; returns the commit sha."""
        with self.state.lock:
            repo = self.state.repos.get((repo_type, repo_id))
            if repo is None:
                repo = self.state.repos[(repo_type, repo_id)] = Repo(repo_id, repo_type, private)
            return repo.new_commit(branch, {k: bytes(v) for k, v in files.items()})

    def commits(self, repo_id: str, repo_type: str = "model") -> int:
        repo = self.state.repos.get((repo_type, repo_id))
        return repo.api_commits if repo else 0

    def files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        repo = self.state.repos.get((repo_type, repo_id))
        if repo is None:
            return {}
        sha = repo.resolve(revision)
        return dict(repo.snapshots.get(sha, {})) if sha else {}

    def exists(self, repo_id: str, repo_type: str = "model") -> bool:
        return (repo_type, repo_id) in self.state.repos

    def is_private(self, repo_id: str, repo_type: str = "model") -> bool:
        return self.state.repos[(repo_type, repo_id)].private

    def fail_next(self, status: int = 503, count: int = 1) -> None:
        """The next `count` requests answer `status` (to test retryable errors)."""
        with self.state.lock:
            self.state._failures.extend([status] * count)


class _Error(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.extra = extra or {}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"
    state: HubState

    def log_message(self, format, *args):  # noqa: A002 - keep test output quiet
        pass

    # ------------------------------------------------------------------------------ plumbing
    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, obj, status: int = 200, headers: dict | None = None):
        self._send(status, json.dumps(obj).encode(), headers)

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization", "")
        return auth.startswith("Bearer ") and auth[len("Bearer "):].strip() == self.state.token

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        segs = [unquote(s) for s in split.path.strip("/").split("/")] if split.path.strip("/") else []
        authed = self._authorized()
        body = self._body() if method in ("POST", "PUT", "DELETE") else b""
        with self.state.lock:
            self.state.requests.append((method, split.path, authed))
            failure = self.state._failures.pop(0) if self.state._failures else None
        try:
            if failure is not None:
                raise _Error(failure, "injected failure")
            self._route(method, segs, body, authed)
        except _Error as e:
            headers = dict(e.headers)
            if e.code:
                headers["X-Error-Code"] = e.code
            headers["X-Error-Message"] = e.message
            self._json({"error": e.message, **e.extra}, e.status, headers)
        except Exception as e:  # noqa: BLE001 - a bug in this server: answer 500 rather than drop the socket
            self._json({"error": f"fake hub server error: {type(e).__name__}: {e}"}, 500)

    # ------------------------------------------------------------------------------ routing
    def _route(self, method: str, segs: list[str], body: bytes, authed: bool) -> None:
        if not authed and not (self.state.anonymous_reads and self._is_read(method, segs)):
            raise _Error(401, "Invalid credentials in Authorization header")
        if segs[:1] == ["api"]:
            return self._api(method, segs[1:], body, authed)
        if "resolve" in segs:
            i = segs.index("resolve")
            head = segs[:i]
            rtype = "model"
            if len(head) == 3 and head[0] in ("datasets", "spaces"):
                rtype, head = _TYPES[head[0]], head[1:]
            if len(head) == 2 and len(segs) > i + 2 and method in ("GET", "HEAD"):
                return self._resolve(rtype, "/".join(head), segs[i + 1], "/".join(segs[i + 2:]), authed)
        raise _Error(404, f"no route for {method} /{'/'.join(segs)}")

    @staticmethod
    def _is_read(method: str, segs: list[str]) -> bool:
        if method in ("GET", "HEAD") and "resolve" in segs:
            return True
        if len(segs) < 4 or segs[0] != "api" or segs[1] not in _TYPES:
            return False
        if len(segs) == 4 or segs[4] in ("revision", "tree", "refs"):
            return method == "GET"
        return segs[4] == "paths-info" and method == "POST"

    def _api(self, method: str, segs: list[str], body: bytes, authed: bool) -> None:
        if segs == ["whoami-v2"] and method == "GET":
            return self._json({
                "type": "user", "id": "1", "name": "test-user", "fullname": "Test User",
                "orgs": [{"type": "org", "name": "test-org"}],
                "auth": {"type": "access_token", "accessToken": {"displayName": "tests", "role": "write"}},
            })
        if segs == ["validate-yaml"] and method == "POST":
            return self._json({"errors": [], "warnings": []})
        if segs == ["repos", "create"] and method == "POST":
            return self._create_repo(json.loads(body or b"{}"))
        if segs == ["repos", "delete"] and method == "DELETE":
            payload = json.loads(body or b"{}")
            repo_id = f"{payload.get('organization')}/{payload.get('name')}"
            with self.state.lock:
                if self.state.repos.pop((payload.get("type") or "model", repo_id), None) is None:
                    raise _Error(404, "Repository not found", "RepoNotFound")
            return self._json({})
        if len(segs) >= 3 and segs[0] in _TYPES:
            rtype, repo_id, rest = _TYPES[segs[0]], f"{segs[1]}/{segs[2]}", segs[3:]
            repo = self._repo(rtype, repo_id, authed)
            if not rest and method == "GET":
                return self._info(repo, "main")
            if rest[:1] == ["revision"] and len(rest) == 2 and method == "GET":
                return self._info(repo, rest[1])
            if rest[:1] == ["tree"] and len(rest) >= 2 and method == "GET":
                return self._tree(repo, rest[1], "/".join(rest[2:]))
            if rest[:1] == ["paths-info"] and len(rest) == 2 and method == "POST":
                return self._paths_info(repo, rest[1], body)
            if rest[:1] == ["preupload"] and len(rest) == 2 and method == "POST":
                return self._preupload(repo, rest[1], body)
            if rest[:1] == ["commit"] and len(rest) == 2 and method == "POST":
                return self._commit(repo, rest[1], body)
            if rest[:1] == ["branch"] and len(rest) == 2 and method == "POST":
                return self._branch(repo, rest[1], json.loads(body or b"{}"))
            if rest == ["refs"] and method == "GET":
                return self._json({"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s}
                                                for b, s in repo.refs.items()], "tags": [], "converts": []})
        raise _Error(404, f"no route for {method} /api/{'/'.join(segs)}")

    # ------------------------------------------------------------------------------ handlers
    def _repo(self, rtype: str, repo_id: str, authed: bool) -> Repo:
        repo = self.state.repos.get((rtype, repo_id))
        if repo is None:
            raise _Error(404, "Repository not found", "RepoNotFound")
        if repo.private and not authed:
            raise _Error(401, "Repository not found", "RepoNotFound")
        return repo

    def _sha(self, repo: Repo, rev: str) -> str:
        sha = repo.resolve(rev)
        if sha is None:
            raise _Error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return sha

    def _create_repo(self, payload: dict) -> None:
        name, org = payload.get("name"), payload.get("organization")
        rtype = payload.get("type") or "model"
        repo_id = f"{org}/{name}" if org else f"test-user/{name}"
        private = payload.get("private")
        if private is None:
            private = payload.get("visibility") == "private"
        url = f"http://{self.headers.get('Host')}/{_URL_PREFIX.get(rtype, '')}{repo_id}"
        with self.state.lock:
            if (rtype, repo_id) in self.state.repos:
                # The real Hub's 409 body carries the url: create_repo(exist_ok=True) reads it.
                raise _Error(409, f"You already created this {rtype} repo", extra={"url": url})
            repo = self.state.repos[(rtype, repo_id)] = Repo(repo_id, rtype, bool(private))
            repo.new_commit("main", {})
        self._json({"url": url, "name": repo_id, "id": uuid.uuid4().hex})

    def _info(self, repo: Repo, rev: str) -> None:
        sha = self._sha(repo, rev)
        files = repo.snapshots[sha]
        self._json({
            "_id": uuid.uuid4().hex, "id": repo.repo_id, "author": repo.repo_id.split("/")[0], "sha": sha,
            "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
            "lastModified": "2024-01-01T00:00:00.000Z", "createdAt": "2024-01-01T00:00:00.000Z",
            "siblings": [{"rfilename": p} for p in sorted(files)],
        })

    @staticmethod
    def _file_entry(path: str, data: bytes) -> dict:
        return {"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": path}

    def _tree(self, repo: Repo, rev: str, path: str) -> None:
        files = repo.snapshots[self._sha(repo, rev)]
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in files):
            raise _Error(404, f"{path} does not exist", "EntryNotFound")
        out, dirs = [], set()
        for p in sorted(files):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):]
            parts = rest.split("/")
            for i in range(1, len(parts)):
                if recursive or i == 1:
                    dirs.add(prefix + "/".join(parts[:i]))
            if recursive or len(parts) == 1:
                out.append(self._file_entry(p, files[p]))
        out += [{"type": "directory", "oid": git_blob_oid(d.encode()), "size": 0, "path": d} for d in sorted(dirs)]
        self._json(out)

    def _paths_info(self, repo: Repo, rev: str, body: bytes) -> None:
        files = repo.snapshots[self._sha(repo, rev)]
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = json.loads(body or b"{}").get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        out = []
        for p in paths:
            p = p.strip("/")
            if p in files:
                out.append(self._file_entry(p, files[p]))
            elif any(f.startswith(p + "/") for f in files):
                out.append({"type": "directory", "oid": git_blob_oid(p.encode()), "size": 0, "path": p})
        self._json(out)

    def _preupload(self, repo: Repo, rev: str, body: bytes) -> None:
        payload = json.loads(body or b"{}")
        self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                              for f in payload.get("files", [])], "commitOid": repo.resolve(rev)})

    def _commit(self, repo: Repo, rev: str, body: bytes) -> None:
        if rev not in repo.refs:
            raise _Error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _Error(400, "the commit payload must start with a header line")
        with self.state.lock:
            files = dict(repo.snapshots[repo.refs[rev]])
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                path = value.get("path", "").strip("/")
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise _Error(400, "only base64 file content is supported")
                    files[path] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise _Error(404, "A file with this name doesn't exist", "EntryNotFound")
                elif key == "deletedFolder":
                    files = {p: d for p, d in files.items() if not p.startswith(path + "/")}
                else:
                    raise _Error(400, f"unsupported commit operation {key!r} (this server only takes regular files)")
            sha = repo.new_commit(rev, files)
            repo.api_commits += 1
        url = f"http://{self.headers.get('Host')}/{_URL_PREFIX.get(repo.repo_type, '')}{repo.repo_id}/commit/{sha}"
        self._json({"success": True, "commitOid": sha, "commitUrl": url, "pullRequestUrl": None})

    def _branch(self, repo: Repo, branch: str, payload: dict) -> None:
        with self.state.lock:
            if branch in repo.refs:
                raise _Error(409, f"Reference already exists: refs/heads/{branch}")
            start = self._sha(repo, payload.get("startingPoint") or "main")
            repo.refs[branch] = start
        self._json({})

    def _resolve(self, rtype: str, repo_id: str, rev: str, path: str, authed: bool) -> None:
        repo = self._repo(rtype, repo_id, authed)
        sha = self._sha(repo, rev)
        files = repo.snapshots[sha]
        if path not in files:
            raise _Error(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": sha})
        data = files[path]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_oid(data)}"', "Accept-Ranges": "bytes"}
        status, start, end = 200, 0, len(data)
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if m and data:
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)) + 1, len(data)) if m.group(2) else len(data)
            else:  # suffix range: the last N bytes
                start = max(0, len(data) - int(m.group(2) or 0))
            if start >= len(data):
                raise _Error(416, "Range Not Satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        chunk = data[start:end]
        headers["Content-Length"] = len(chunk)  # HEAD too: the true size, never 0
        self._send(status, chunk, headers, content_type="application/octet-stream")



if __name__ == "__main__":  # a server in a process of its own (tests freeze it with SIGSTOP)
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", required=True)
    args = parser.parse_args()
    server = HubServer(token=args.token, port=args.port)
    server._httpd.serve_forever()
