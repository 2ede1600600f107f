"""pytest plugin: a real S3 API (moto server) and a Hub-API server, both on 127.0.0.1, for any test dir.

Use it with `-p tests.runner.store.fixtures` or `pytest_plugins = ["tests.runner.store.fixtures"]` in the top-level
conftest. Fixtures:

    s3_server   .endpoint .bucket .client (boto3, path-style) .region; AWS_* env set for the test,
                AWS_ENDPOINT_URL_S3 pointing at the server, bucket created; state reset per test
    hub_server  .url .token .seed(repo_id, files, repo_type="model", private=False) .commits(repo_id)
                .files(repo_id) .exists() .is_private() .fail_next(status, count) .anonymous_reads
                .requests; HF_ENDPOINT / HF_TOKEN set for the test; state reset per test

Both servers are started once per session (a port that stays the same all session) and reset per test.

    s3_process, hub_process   the same servers, each in a process of its own started for the test, with
                .freeze() (SIGSTOP: the endpoint still accepts connections, and answers nothing) and .thaw()
                (SIGCONT); teardown always thaws and kills it. The env is set as for s3_server / hub_server.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any

import pytest

from tests.runner.store.hub_server import HubServer

_LOOPBACK = "127.0.0.1,localhost"


# ---------------------------------------------------------------------------------------------- S3
@dataclass
class S3Server:
    endpoint: str
    bucket: str
    client: Any
    region: str
    access_key: str
    secret_key: str


@pytest.fixture(scope="session")
def _moto_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_server(_moto_endpoint, monkeypatch, tmp_path) -> S3Server:
    urllib.request.urlopen(urllib.request.Request(f"{_moto_endpoint}/moto-api/reset", method="POST"), timeout=30)
    return point_s3_clients_at(_moto_endpoint, monkeypatch, tmp_path)


def point_s3_clients_at(_moto_endpoint: str, monkeypatch, tmp_path) -> S3Server:
    """AWS_* env for the test pointing at `_moto_endpoint`, and bucket `test-bucket` there."""
    import boto3
    from botocore.config import Config

    access_key, secret_key, region = "AKIATESTFIXTURE00001", "fixture-secret-" + uuid.uuid4().hex, "us-east-1"
    env = {
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_REGION": region,
        "AWS_DEFAULT_REGION": region,
        "AWS_ENDPOINT_URL_S3": _moto_endpoint,
        # Nothing from the machine's own AWS setup, and never the instance metadata service (not loopback).
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "NO_PROXY": _LOOPBACK,
        "no_proxy": _LOOPBACK,
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_MAX_ATTEMPTS",
              "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
              "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        monkeypatch.delenv(k, raising=False)
    client = boto3.session.Session().client(
        "s3", endpoint_url=_moto_endpoint, region_name=region, aws_access_key_id=access_key,
        aws_secret_access_key=secret_key, config=Config(s3={"addressing_style": "path"}),
    )
    bucket = "test-bucket"
    client.create_bucket(Bucket=bucket)
    return S3Server(_moto_endpoint, bucket, client, region, access_key, secret_key)


# ---------------------------------------------------------------------------------------------- Hub
@pytest.fixture(scope="session")
def _hub_server_session():
    server = HubServer().start()
    yield server
    server.stop()


def point_hub_clients_at(url: str, monkeypatch, home) -> None:
    """Make every Hub client in this process use `url`.

    huggingface_hub reads HF_ENDPOINT once, at import, into `constants.ENDPOINT` and the derived
    `constants.HUGGINGFACE_CO_URL_TEMPLATE` (hf_hub_url, file_download and repocard use those when no
    endpoint is passed). So: set HF_ENDPOINT (read at call time by runner.store, and by huggingface_hub /
    datasets if they are imported later), AND patch those constants in the already-imported module (and
    datasets.config's copies if datasets is loaded). The server lives for the whole session, so its URL
    never changes and a copy taken at import time stays right.
    """
    monkeypatch.setenv("HF_ENDPOINT", url)
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "ENDPOINT", url)
    monkeypatch.setattr(hc, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    if hasattr(hc, "HF_URL_HOSTS"):
        monkeypatch.setattr(hc, "HF_URL_HOSTS", frozenset(hc.HF_URL_HOSTS | {"127.0.0.1"}))
    # Caches and stored tokens inside the test's tmp dir, never the user's home (also read at import).
    for name, value in {
        "HF_HOME": home, "HF_HUB_CACHE": home / "hub", "HUGGINGFACE_HUB_CACHE": home / "hub",
        "HF_ASSETS_CACHE": home / "assets", "HF_XET_CACHE": home / "xet",
        "HF_TOKEN_PATH": home / "token", "HF_STORED_TOKENS_PATH": home / "stored_tokens",
    }.items():
        if hasattr(hc, name):
            monkeypatch.setattr(hc, name, str(value))
        monkeypatch.setenv(name, str(value))
    for name in ("HF_HUB_OFFLINE",):
        if hasattr(hc, name):
            monkeypatch.setattr(hc, name, False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        monkeypatch.setattr(datasets_config, "HF_ENDPOINT", url, raising=False)
        monkeypatch.setattr(datasets_config, "HUB_DATASETS_URL",
                            url + "/datasets/{repo_id}/resolve/{revision}/{path}", raising=False)
        if hasattr(datasets_config, "HF_HUB_OFFLINE"):
            monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub_server(_hub_server_session, monkeypatch, tmp_path) -> HubServer:
    server = _hub_server_session
    server.reset()
    point_hub_clients_at(server.url, monkeypatch, tmp_path / "hf-home")
    monkeypatch.setenv("HF_TOKEN", server.token)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("NO_PROXY", _LOOPBACK)
    monkeypatch.setenv("no_proxy", _LOOPBACK)
    return server


# ---------------------------------------------------------------------------------------------- in a process
@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str

    def freeze(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(argv: list[str], url: str) -> ServerProcess:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            break
        except urllib.error.HTTPError:
            break  # it answers
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"test server {argv} did not start") from None
            time.sleep(0.1)
    return ServerProcess(proc, url)


def _stop(server: ServerProcess) -> None:
    try:
        server.thaw()  # a stopped process must run again to die cleanly
    except ProcessLookupError:
        pass
    server.proc.kill()
    server.proc.wait(timeout=30)


@pytest.fixture
def s3_process(monkeypatch, tmp_path):
    """(ServerProcess, S3Server): a moto S3 server in its own process, the env pointing at it."""
    port = _free_port()
    server = _start([sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1", "-p", str(port)],
                    f"http://127.0.0.1:{port}")
    try:
        yield server, point_s3_clients_at(server.url, monkeypatch, tmp_path)
    finally:
        _stop(server)


@pytest.fixture
def hub_process(monkeypatch, tmp_path):
    """(ServerProcess, token): the Hub test server in its own process, the env pointing at it."""
    token = "hf_" + uuid.uuid4().hex
    port = _free_port()
    server = _start([sys.executable, "-m", "tests.runner.store.hub_server", "--port", str(port), "--token", token],
                    f"http://127.0.0.1:{port}")
    try:
        point_hub_clients_at(server.url, monkeypatch, tmp_path / "hf-home")
        monkeypatch.setenv("HF_TOKEN", token)
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        monkeypatch.setenv("NO_PROXY", _LOOPBACK)
        monkeypatch.setenv("no_proxy", _LOOPBACK)
        yield server, token
    finally:
        _stop(server)
