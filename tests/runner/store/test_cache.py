"""The shared model cache (runner/store/cache.py) against a real Hub API and a real S3 API on loopback, filled by real
processes: what a second use downloads (nothing), two fillers at once, a filler killed mid-download."""
from __future__ import annotations

import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from runner.store import cache
from runner.api import names
from runner.api.errors import RetryableError
from runner.api.uris import Location


REPO = "org/tiny-base"
FILL = """
import sys
from pathlib import Path
from runner.store import cache
from runner.api.uris import Location
got = cache.download(Location.parse(sys.argv[1]), Path(sys.argv[2]), log=lambda m: print(m, flush=True),
                     stall=float(sys.argv[3]))
print("RESULT", got, flush=True)
"""


def _files(size: int = 3 << 20) -> dict[str, bytes]:
    return {"config.json": b'{"model_type": "llama"}', "model.safetensors": os.urandom(size),
            "tokenizer.json": b"{}"}


def _resolves(hub_server) -> list[str]:
    return [p for m, p, _ in hub_server.requests if m == "GET" and "/resolve/" in p]


def _entries(root: Path) -> list[Path]:
    return sorted(p.parent for p in (root / "models").glob(f"*/*/{cache.MARKER}"))


class SlowProxy:
    """A real TCP proxy in front of a server that sends the answers at `rate` bytes/s (None: at full speed): a
    download that takes seconds, so a second filler really meets the first one mid-fill. `.sent`: the bytes the
    server has sent through it (what clients downloaded)."""

    def __init__(self, upstream: str, rate: int | None):
        host, port = upstream.rsplit("//", 1)[1].split(":")
        proxy = self
        self.sent = 0
        self._lock = threading.Lock()

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                up = socket.create_connection((host, int(port)))
                t = threading.Thread(target=proxy._pump, args=(self.request, up, None, False), daemon=True)
                t.start()
                proxy._pump(up, self.request, rate, True)
                t.join(timeout=5)
                up.close()

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _pump(self, src, dst, rate, count):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                if count:
                    with self._lock:
                        self.sent += len(data)
                if rate:
                    time.sleep(len(data) / rate)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def slow_hub(hub_server):
    proxy = SlowProxy(hub_server.url, rate=1 << 20)
    yield proxy
    proxy.close()


def _filler(source: str, work: Path, root: Path, endpoint: str, stall: float = 300.0) -> subprocess.Popen:
    env = {**os.environ, names.ENV_MODEL_CACHE: str(root), "HF_ENDPOINT": endpoint, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", FILL, source, str(work), str(stall)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _filling(root: Path) -> bool:
    return any(f.is_file() and f.stat().st_size > 0 for f in (root / "tmp").rglob("*")) if (root / "tmp").is_dir() \
        else False


# --------------------------------------------------------------------------------------------- reuse
def test_second_use_of_the_same_revision_downloads_nothing_and_a_new_commit_is_a_new_entry(hub_server, tmp_path):
    files = _files(1 << 20)
    hub_server.seed(REPO, files)
    root, lines = tmp_path / "cache", []
    first = cache.download(Location.parse(f"hf://{REPO}"), tmp_path / "w1", log=lines.append, cache_root=root)
    assert (first / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert lines[-1].startswith(f"model cache miss: hf://{REPO}@") and "downloaded 3 files" in lines[-1]
    assert f"({sum(map(len, files.values()))} bytes)" in lines[-1]
    downloads = len(_resolves(hub_server))
    assert downloads >= len(files)

    second = cache.download(Location.parse(f"hf://{REPO}@main"), tmp_path / "w2", log=lines.append, cache_root=root)
    assert second == first and not (tmp_path / "w2").exists()
    assert lines[-1].startswith(f"model cache hit: hf://{REPO}@") and lines[-1].endswith("downloaded 0 bytes")
    assert len(_resolves(hub_server)) == downloads  # not one file requested again

    changed = {**files, "model.safetensors": os.urandom(1 << 20)}
    sha = hub_server.seed(REPO, changed)
    third = cache.download(Location.parse(f"hf://{REPO}"), tmp_path / "w3", log=lines.append, cache_root=root)
    assert "model cache miss" in lines[-1] and sha in lines[-1]
    assert (third / "model.safetensors").read_bytes() == changed["model.safetensors"]
    assert (first / "model.safetensors").read_bytes() == files["model.safetensors"]  # the old entry is intact
    assert len(_entries(root)) == 2 and list((root / "tmp").iterdir()) == []


def test_s3_sources_are_keyed_by_their_listing_so_an_overwritten_model_is_downloaded_again(s3_server, tmp_path):
    c, bucket = s3_server.client, s3_server.bucket
    for name, data in _files(1 << 16).items():
        c.put_object(Bucket=bucket, Key=f"bases/tiny/{name}", Body=data)
    loc, root, lines = Location.parse(f"s3://{bucket}/bases/tiny"), tmp_path / "cache", []
    first = cache.download(loc, tmp_path / "w1", log=lines.append, cache_root=root)
    assert "model cache miss" in lines[-1]
    assert cache.download(loc, tmp_path / "w2", log=lines.append, cache_root=root) == first
    assert "model cache hit" in lines[-1] and "downloaded 0 bytes" in lines[-1]
    new = os.urandom(1 << 16)  # same key, same size, other bytes: a retrained model uploaded over the old one
    c.put_object(Bucket=bucket, Key="bases/tiny/model.safetensors", Body=new)
    third = cache.download(loc, tmp_path / "w3", log=lines.append, cache_root=root)
    assert "model cache miss" in lines[-1] and (third / "model.safetensors").read_bytes() == new


def test_a_damaged_entry_is_filled_again_and_no_cache_means_a_plain_download(hub_server, tmp_path, monkeypatch):
    files = _files(1 << 16)
    hub_server.seed(REPO, files)
    root, lines = tmp_path / "cache", []
    entry = cache.download(Location.parse(f"hf://{REPO}"), tmp_path / "w1", log=lines.append, cache_root=root)
    with open(entry / "model.safetensors", "r+b") as f:  # cut short, as by a full disk or a careless cleanup
        f.truncate(100)
    again = cache.download(Location.parse(f"hf://{REPO}"), tmp_path / "w2", log=lines.append, cache_root=root)
    assert "model cache miss" in lines[-1]
    assert (again / "model.safetensors").read_bytes() == files["model.safetensors"]
    monkeypatch.delenv(names.ENV_MODEL_CACHE, raising=False)
    logged = len(lines)
    plain = cache.download(Location.parse(f"hf://{REPO}"), tmp_path / "w3", log=lines.append)
    assert plain == tmp_path / "w3" and len(lines) == logged  # into the work dir, as without the cache


def test_the_same_repo_at_another_endpoint_is_another_entry(hub_server, slow_hub, tmp_path, monkeypatch):
    """The key names the endpoint: a job pointed at one endpoint (a test double, a mirror) never fills an entry
    that a job reading another endpoint is then handed."""
    hub_server.seed(REPO, _files(1 << 16))
    root, lines = tmp_path / "cache", []
    first = cache.download(Location.parse(f"hf://{REPO}"), tmp_path / "w1", log=lines.append, cache_root=root)
    monkeypatch.setenv("HF_ENDPOINT", slow_hub.url)
    second = cache.download(Location.parse(f"hf://{REPO}"), tmp_path / "w2", log=lines.append, cache_root=root)
    assert "model cache miss" in lines[-1] and second != first and len(_entries(root)) == 2


# ------------------------------------------------------------------------------------- two processes
def test_two_processes_filling_at_once_download_once(hub_server, slow_hub, tmp_path):
    files = _files()
    hub_server.seed(REPO, files)
    root = tmp_path / "cache"
    a = _filler(f"hf://{REPO}", tmp_path / "a", root, slow_hub.url)
    _wait_for(lambda: _filling(root), what="the first filler to start writing")
    b = _filler(f"hf://{REPO}", tmp_path / "b", root, slow_hub.url)
    out_a, out_b = a.communicate(timeout=300)[0], b.communicate(timeout=300)[0]
    assert a.returncode == 0 and b.returncode == 0, out_a + out_b
    assert "model cache miss" in out_a and "model cache hit" in out_b, out_a + out_b
    assert "another runner is filling" in out_b  # it really met the first one mid-fill, and waited
    got = {line.split(" ", 1)[1] for line in (out_a + out_b).splitlines() if line.startswith("RESULT ")}
    assert len(got) == 1
    entry = Path(got.pop())
    assert all((entry / n).read_bytes() == d for n, d in files.items())
    assert sorted(p.rsplit("/", 1)[1] for p in _resolves(hub_server)) == sorted(files)  # each file once
    assert list((root / "tmp").iterdir()) == [] and _entries(root) == [entry]


def test_a_killed_filler_leaves_nothing_that_looks_complete(hub_server, slow_hub, tmp_path, monkeypatch):
    files = _files()
    hub_server.seed(REPO, files)
    root = tmp_path / "cache"
    a = _filler(f"hf://{REPO}", tmp_path / "a", root, slow_hub.url)
    _wait_for(lambda: _filling(root), what="the filler to start writing")
    a.send_signal(signal.SIGKILL)  # as the OOM killer or a node failure would
    a.wait(timeout=30)
    assert _entries(root) == [] and not list((root / "models").rglob(cache.MARKER))
    assert list((root / "tmp").iterdir())  # its partial download is there, but not as an entry

    monkeypatch.setenv("HF_ENDPOINT", slow_hub.url)  # the same endpoint: the same entry
    lines: list[str] = []
    entry = cache.download(Location.parse(f"hf://{REPO}"), tmp_path / "b", log=lines.append, cache_root=root)
    assert "model cache miss" in lines[-1]
    assert all((entry / n).read_bytes() == d for n, d in files.items())
    assert list((root / "tmp").iterdir()) == []  # the next filler cleared the leftovers


def test_a_stalled_filler_does_not_block_the_next_runner(hub_server, slow_hub, tmp_path):
    files = _files()
    hub_server.seed(REPO, files)
    root = tmp_path / "cache"
    a = _filler(f"hf://{REPO}", tmp_path / "a", root, slow_hub.url)
    try:
        _wait_for(lambda: _filling(root), what="the filler to start writing")
        a.send_signal(signal.SIGSTOP)  # holds the lock, makes no progress (a hung mount, a frozen node)
        b = _filler(f"hf://{REPO}", tmp_path / "b", root, slow_hub.url, stall=2.0)
        out_b = b.communicate(timeout=120)[0]
        assert b.returncode == 0, out_b
        assert "with no progress for 2s; downloading without the cache" in out_b
        got = Path(next(line for line in out_b.splitlines() if line.startswith("RESULT ")).split(" ", 1)[1])
        assert got == tmp_path / "b" and (got / "model.safetensors").read_bytes() == files["model.safetensors"]
        assert _entries(root) == []
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=30)
    marker_free = json.dumps([str(p) for p in (root / "models").rglob(cache.MARKER)])
    assert marker_free == "[]"


# ------------------------------------------------------------------------------------------- poisoning
class RewritingProxy:
    """A TCP proxy to `upstream` (settable: the same address, another server behind it) that replaces byte strings
    in what the server sends (same length each): a store that lists what another store holds (its ETags, its
    blob ids) and sends other bytes."""

    def __init__(self, upstream: str, replace: dict[bytes, bytes] | None = None):
        self.upstream, self.replace = upstream, dict(replace or {})
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                host, port = proxy.upstream.rsplit("//", 1)[1].split(":")
                up = socket.create_connection((host, int(port)))
                t = threading.Thread(target=proxy._pump, args=(self.request, up, False), daemon=True)
                t.start()
                proxy._pump(up, self.request, True)
                t.join(timeout=5)
                up.close()

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _pump(self, src, dst, rewrite):
        try:
            while data := src.recv(1 << 20):
                for old, new in (self.replace.items() if rewrite else ()):
                    data = data.replace(old, new)
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def attackers_s3(s3_server):
    """A second real S3 server (moto, a process of its own) holding the same bucket and keys as the victim's, of
    the same sizes, with zeros for weights."""
    from tests.runner.store import fixtures

    port = fixtures._free_port()
    server = fixtures._start([sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1",
                              "-p", str(port)], f"http://127.0.0.1:{port}")
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=server.url, region_name="us-east-1", aws_access_key_id="AKIAATTACKER0000001",
                          aws_secret_access_key="attacker", config=Config(s3={"addressing_style": "path"}))
    client.create_bucket(Bucket=s3_server.bucket)
    yield server, client
    fixtures._stop(server)


def _seed_both(s3_server, attacker) -> tuple[dict[str, bytes], dict[bytes, bytes]]:
    """The real model in the victim's store, the poisoned one in the attacker's; and the attacker's ETags -> the
    victim's, so that the attacker's store lists exactly what the victim's lists."""
    real, etags = _files(1 << 16), {}
    for name, data in real.items():
        mine = s3_server.client.put_object(Bucket=s3_server.bucket, Key=f"bases/tiny/{name}", Body=data)["ETag"]
        poison = b"\0" * len(data) if name == "model.safetensors" else data
        theirs = attacker.put_object(Bucket=s3_server.bucket, Key=f"bases/tiny/{name}", Body=poison)["ETag"]
        etags[theirs.strip('"').encode()] = mine.strip('"').encode()
    return real, etags


def test_a_job_at_its_own_s3_serving_the_same_listing_with_other_weights_poisons_no_other_job(
        s3_server, attackers_s3, tmp_path, monkeypatch):
    server, attacker = attackers_s3
    real, etags = _seed_both(s3_server, attacker)
    loc, root, lines = Location.parse(f"s3://{s3_server.bucket}/bases/tiny"), tmp_path / "cache", []
    victims_endpoint = s3_server.endpoint
    lying = RewritingProxy(server.url, etags)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", lying.url)  # the attacker's job points at its own store
        assert cache.resolve(loc).rev.revision == cache.resolve(loc).rev.revision  # a stable listing
        listing = cache.resolve(loc).rev.revision
        with pytest.raises(RetryableError) as e:
            cache.download(loc, tmp_path / "attacker", log=lines.append, cache_root=root)
        assert "is not what it lists" in e.value.message and "model.safetensors" in e.value.message
        assert _entries(root) == []  # nothing cached, under any key

        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", victims_endpoint)  # the victim's job, on the real store
        assert cache.resolve(loc).rev.revision == listing  # the very listing the attacker's store served
        got = cache.download(loc, tmp_path / "victim", log=lines.append, cache_root=root)
        assert "model cache miss" in lines[-1]
        assert (got / "model.safetensors").read_bytes() == real["model.safetensors"]
    finally:
        lying.close()


def test_another_server_answering_at_the_victims_store_address_cannot_fill_its_entry(
        s3_server, attackers_s3, tmp_path, monkeypatch):
    """The same endpoint name, another server behind it (a Service of the same name in the attacker's namespace):
    the key is the same, so only the check of every byte against the listed ETags keeps the poison out."""
    server, attacker = attackers_s3
    real, etags = _seed_both(s3_server, attacker)
    loc, root, lines = Location.parse(f"s3://{s3_server.bucket}/bases/tiny"), tmp_path / "cache", []
    address = RewritingProxy(server.url, etags)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", address.url)
        with pytest.raises(RetryableError, match="is not what it lists"):
            cache.download(loc, tmp_path / "attacker", log=lines.append, cache_root=root)
        address.upstream, address.replace = s3_server.endpoint, {}  # the victim's store at that address again
        got = cache.download(loc, tmp_path / "victim", log=lines.append, cache_root=root)
        assert "model cache miss" in lines[-1] and "downloaded 0 bytes" not in lines[-1]
        assert (got / "model.safetensors").read_bytes() == real["model.safetensors"]
    finally:
        address.close()


def test_hub_files_whose_bytes_are_not_their_listed_blob_ids_are_never_cached(hub_server, tmp_path, monkeypatch):
    files = {**_files(1 << 16), "model.safetensors": b"REAL" * (1 << 14)}
    hub_server.seed(REPO, files)
    root, lines = tmp_path / "cache", []
    lying = RewritingProxy(hub_server.url, {b"REAL": b"FAKE"})
    try:
        monkeypatch.setenv("HF_ENDPOINT", lying.url)
        with pytest.raises(RetryableError, match="is not what it lists"):
            cache.download(Location.parse(f"hf://{REPO}"), tmp_path / "w1", log=lines.append, cache_root=root)
        assert _entries(root) == []
        lying.replace = {}
        got = cache.download(Location.parse(f"hf://{REPO}"), tmp_path / "w2", log=lines.append, cache_root=root)
        assert "model cache miss" in lines[-1] and (got / "model.safetensors").read_bytes() == files["model.safetensors"]
    finally:
        lying.close()


def test_a_job_running_its_models_own_code_reads_the_cache_but_never_fills_it(hub_server, tmp_path):
    hub_server.seed(REPO, _files(1 << 16))
    root, lines = tmp_path / "cache", []
    got = cache.download(Location.parse(f"hf://{REPO}"), tmp_path / "w1", log=lines.append, cache_root=root,
                         fill=False)
    assert got == tmp_path / "w1" and _entries(root) == [] and "model.trustRemoteCode" in lines[-1]
    entry = cache.download(Location.parse(f"hf://{REPO}"), tmp_path / "w2", log=lines.append, cache_root=root)
    assert cache.download(Location.parse(f"hf://{REPO}"), tmp_path / "w3", log=lines.append, cache_root=root,
                          fill=False) == entry and "model cache hit" in lines[-1]
