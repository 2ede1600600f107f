"""The end-to-end tier: the project's images, built from its Dockerfile, run as real containers (`docker run`) and
as real pods on a real kubelet (tests/cluster/node.py), with a real S3 server on loopback.

Everything is session-scoped and started once: the private Docker daemon, the images (built or found cached by
`python -m tests.e2e.images`, which .ci/run runs first), the node, the S3 server with the tiny model and data in it,
and the operator installed with `helm install` from charts/. Every test has its own namespace.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import socketserver
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from runner.api import status as phases
from runner.api.parse import manifest
from tests.cluster.cluster import free_port, wait_for
from tests.cluster.dockerd import Dockerd
from tests.cluster import node as node_module
from tests.cluster.node import RealNode
from tests.conftest import QA_ROWS, ROOT, write_jsonl
from tests.e2e import images

RELEASE, OPERATOR_NS = "finetune-operator", "finetune-system"  # the README's
BUCKET = "e2e"
CHART = ROOT / "charts" / "finetune-operator"
README_REGISTRY = "registry.example.com/"  # the README's placeholder; the images built here are local


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def dockerd():
    d = Dockerd().start()
    yield d
    d.stop()


@pytest.fixture(scope="session")
def built_images(dockerd) -> dict:
    return images.build_all(dockerd)


@pytest.fixture(scope="session")
def node(dockerd, built_images):
    n = node_module.bare(dockerd).start()  # the node `python -m tests.cluster.node up` starts
    yield n
    n.stop()


class S3:
    def __init__(self, endpoint: str, key_id: str, secret: str):
        import boto3
        from botocore.config import Config

        self.endpoint = endpoint
        self.env = {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret,
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint}
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                   aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                                   aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
                                   config=Config(s3={"addressing_style": "path"}))
        self.client.create_bucket(Bucket=BUCKET)

    def upload_dir(self, local: Path, prefix: str) -> str:
        for f in sorted(local.rglob("*")):
            if f.is_file():
                self.client.upload_file(str(f), BUCKET, f"{prefix}/{f.relative_to(local)}")
        return f"s3://{BUCKET}/{prefix}"

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def download_dir(self, prefix: str, dest: Path) -> Path:
        for key in self.keys(prefix):
            target = dest / key[len(prefix):].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            self.client.download_file(BUCKET, key, str(target))
        return dest


def iam_user_keys(endpoint: str) -> tuple[str, str]:
    """An IAM user of the moto server allowed s3:* on the tier's bucket, and its access key (id, secret)."""
    import boto3

    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bootstrap",
                       aws_secret_access_key="bootstrap")
    iam.create_user(UserName="e2e")
    iam.put_user_policy(UserName="e2e", PolicyName="bucket", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": [
            f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"]}]}))
    key = iam.create_access_key(UserName="e2e")["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


@pytest.fixture(scope="package")
def s3(tmp_path_factory, tiny_llama) -> S3:
    """A real S3 API (moto server) on 127.0.0.1, with the tiny model and the Q/A data in it. Its authentication is on
    (moto's IAM: every request's signature checked against an IAM user's access key, and that user's policy
    applied), so a pod with wrong keys is refused as by AWS; without it moto accepts any key. moto's switch is one
    setting of this process, so it is on for this package's tests only (scope "package"): the moto servers of the
    tests that come after, in the same process, accept their fixtures' keys again."""
    from moto import settings
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    no_auth = settings.INITIAL_NO_AUTH_ACTION_COUNT
    key_id, secret = iam_user_keys(endpoint)  # made while auth is off
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # from now on every request is authenticated and authorized
    store = S3(endpoint, key_id, secret)
    store.model = store.upload_dir(tiny_llama, "models/tiny-llama")
    data = write_jsonl(tmp_path_factory.mktemp("e2e-data") / "qa.jsonl", QA_ROWS)
    store.client.upload_file(str(data), BUCKET, "data/qa.jsonl")
    store.data = f"s3://{BUCKET}/data/qa.jsonl"
    yield store
    settings.INITIAL_NO_AUTH_ACTION_COUNT = no_auth
    server.stop()


def in_cluster_env(node: RealNode) -> list[dict]:
    """What a pod on this node needs to reach the API server: there is no service network, only loopback."""
    return [{"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
            {"name": "KUBERNETES_SERVICE_PORT", "value": str(node.cluster.apiserver_port)}]


def operator_values(node: RealNode, http_port: int, webhook_port: int) -> dict:
    """The chart values of this tier: the images built here, and the node's networking through the admin's
    runner.podTemplate (hostNetwork and the API server address) - the feature platform teams use the same way. The
    webhook is registered by URL on the node (webhook.url): a Service's Endpoints cannot hold the pods' loopback
    address."""
    return {
        "webhook": {"port": webhook_port, "url": f"https://127.0.0.1:{webhook_port}"},
        "readinessProbe": {"initialDelaySeconds": 1, "periodSeconds": 2},  # rollouts (helm upgrade) sooner
        "image": {"repository": "finetune-controller", "tag": "e2e", "pullPolicy": "Never"},
        "runner": {"image": {"repository": "finetune-runner", "tag": "e2e"},
                   "podTemplate": {"spec": {"hostNetwork": True, "containers": [
                       {"name": "runner", "env": in_cluster_env(node)}]}}},
        "hostNetwork": True,
        "controller": {"httpHost": "127.0.0.1", "httpPort": http_port, "extraEnv": in_cluster_env(node),
                       "imagePullTimeoutSeconds": 20, "retryBackoffSeconds": 1},
        "jobset": {"enabled": False},
        "policy": {"imagePrefixes": ["finetune-runner:"]},  # any tag of the runner repository (the bad-image test)
        "metrics": {"service": {"enabled": False}},
    }


def readme_install() -> list[list[str]]:
    """The commands of README "Install on a cluster", step 2a (With helm), as written there: `helm install ...`
    and `kubectl ... rollout status ...`, each an argv."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("**2a. With helm**", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in re.sub(r"\\\n\s*", " ", block).strip().splitlines()]


def readme_install_on(node: RealNode, values: Path) -> list[tuple[str, float]]:
    """Run the README's install commands on `node`, with what this node needs and nothing else: the images built
    here are local (the README's registry.example.com/ prefix dropped) and `-f values` gives the node's networking,
    the images' `e2e` tag and pull policy (operator_values). No other flag: the chart must install as documented on
    the Kubernetes version it admits (this node's is 1.20.2). Returns each command as run, with its wall time."""
    ran = []
    for argv in readme_install():
        argv = [a.replace(f"={README_REGISTRY}", "=") for a in argv]
        argv = [str(ROOT / a) if "/" in a and (ROOT / a).is_dir() else a for a in argv]  # run from the checkout
        if argv[:2] == ["helm", "install"]:
            argv += ["-f", str(values)]
        t0 = time.monotonic()
        if argv[0] == "helm":
            r = node.cluster.helm_run(*argv[1:], check=False, timeout=240)
        else:  # kubectl ... rollout status: waits for the controller pod to be Ready
            r = node.kubectl(*argv[1:], check=False, timeout=240)
        ran.append((shlex.join(argv), round(time.monotonic() - t0, 1)))
        if r.returncode != 0:
            pods = node.kubectl("get", "pods", "-n", OPERATOR_NS, "-o", "wide", check=False).stdout
            logs = node.kubectl("logs", "-n", OPERATOR_NS, "-l", "app.kubernetes.io/name=finetune-operator",
                                "--tail=60", check=False)
            pytest.fail(f"{shlex.join(argv)} failed ({r.returncode}):\n{r.stderr}\n{pods}\n"
                        f"{logs.stdout}{logs.stderr}\n{node.log_tail()}")
    return ran


@pytest.fixture(scope="session")
def operator(node, tmp_path_factory):
    """The operator installed by the README's own `helm install` (readme_install_on); its controller pods Ready.
    Yields its values file (for a `helm upgrade` with the same values)."""
    values = tmp_path_factory.mktemp("helm") / "values.yaml"
    values.write_text(yaml.safe_dump(operator_values(node, free_port(), free_port())))
    ran = readme_install_on(node, values)
    print("\nREADME install on the node:\n" + "\n".join(f"  {cmd}   # {secs} s" for cmd, secs in ran))
    yield values
    node.cluster.helm_run("uninstall", RELEASE, "-n", OPERATOR_NS, check=False)


@pytest.fixture
def namespace(node, s3, operator):
    """A fresh namespace with the S3 Secret the jobs name (spec.s3SecretRef)."""
    ns = f"e2e-{uuid.uuid4().hex[:6]}"
    node.kubectl("create", "namespace", ns)
    node.kubectl("create", "secret", "generic", "s3-creds", "-n", ns,
                 *[f"--from-literal={k}={v}" for k, v in s3.env.items()])
    yield ns
    node.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def ftj(name: str, s3: S3, **spec) -> dict:
    """A small CPU FineTuneJob reading the tiny model and data from S3 and publishing to S3."""
    body = {
        "model": {"source": s3.model},
        "dataset": {"source": s3.data, "template": {"prompt": "Q: {question}\nA:", "completion": " {answer}"},
                    "maxLength": 32},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "training": {"maxSteps": 6, "batchSize": 2, "learningRate": 0.003, "loggingSteps": 1, "saveSteps": 3,
                     "gradientCheckpointing": False},
        "output": {"destination": f"s3://{BUCKET}/out/{name}-{uuid.uuid4().hex[:6]}"},
        "resources": {"gpus": 0, "memory": "3Gi"},
        "s3SecretRef": {"name": "s3-creds"},
    }
    for key, value in spec.items():
        body[key] = {**body[key], **value} if isinstance(value, dict) and isinstance(body.get(key), dict) else value
    return manifest(name, body)


def apply(node: RealNode, ns: str, doc: dict) -> None:
    node.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(doc))


def status(node: RealNode, ns: str, name: str) -> dict:
    r = node.kubectl("get", "ftj", name, "-n", ns, "-o", "json", check=False)
    return json.loads(r.stdout).get("status", {}) if r.returncode == 0 else {}


def wait_status(node: RealNode, ns: str, name: str, pred, timeout: float, what: str) -> dict:
    def check():
        s = status(node, ns, name)
        return s if pred(s) else None
    try:
        return wait_for(check, timeout=timeout, interval=0.5, what=what)
    except Exception as e:  # the status and the pods say why
        pods = node.kubectl("get", "pods", "-n", ns, "-o", "wide", check=False).stdout
        raise AssertionError(f"{e}\nstatus: {json.dumps(status(node, ns, name), indent=1)[-3000:]}\n{pods}") from None


class InterceptingProxy:
    """A TCP proxy on loopback in front of a store that calls `on_match` (once, in that connection's thread) before
    forwarding the first request whose bytes contain `marker`: whatever on_match does (freeze the store, hold the
    request) happens exactly when the runner asks for that object."""

    def __init__(self, upstream_port: int, marker: bytes, on_match):
        proxy, self.fired = self, threading.Event()
        self.marker = marker

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                up = socket.create_connection(("127.0.0.1", upstream_port))
                back = threading.Thread(target=proxy._pump, args=(up, self.request, None), daemon=True)
                back.start()
                proxy._pump(self.request, up, on_match)
                back.join(timeout=5)
                up.close()

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _pump(self, src, dst, on_match):
        try:
            while data := src.recv(65536):
                if on_match and self.marker in data and not self.fired.is_set():
                    self.fired.set()
                    on_match()
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self):
        self.server.shutdown()
        self.server.server_close()


HELD_STEP = 3  # the step whose checkpoint upload HeldRunner holds (the job's saveSteps: its first checkpoint)


def sigterm_pending(pid: int) -> bool:
    """Whether a SIGTERM waits for the (stopped) process `pid`, as /proc says."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return bool((int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)) >> (signal.SIGTERM - 1) & 1)


def freeze(pid: int) -> None:
    """SIGSTOP the process `pid` (a container's first process, by its host PID) and wait until every thread of it
    has stopped. Signals sent to it meanwhile stay pending until SIGCONT."""
    os.kill(pid, signal.SIGSTOP)
    tasks = Path(f"/proc/{pid}/task")
    wait_for(lambda: all((t / "stat").read_text().rsplit(")", 1)[1].split()[0] in "tT" for t in tasks.iterdir()),
             timeout=30, interval=0.05, what=f"process {pid} to stop")


class HeldRunner:
    """A job's runner held mid-training at a step the test knows, for as long as the test needs, without counting on
    a step count to outlast what the test does meanwhile. The job's S3 traffic goes through an InterceptingProxy that
    holds the upload of checkpoint-HELD_STEP (saveSteps: HELD_STEP, its first checkpoint): the runner waits inside
    that step's save. `freeze()` stops the runner's process (SIGSTOP) and lets the upload through, so no store
    timeout runs out however long the test takes (a helm upgrade; the kubelet's SIGTERM, which stays pending in the
    stopped process where `wait_sigterm()` reads it); `thaw()` (SIGCONT) lets the runner go on from there."""

    SECRET = "held-s3-creds"

    def __init__(self, node: RealNode, namespace: str, s3: S3, dockerd: Dockerd):
        self.node, self.namespace, self.s3, self.dockerd = node, namespace, s3, dockerd
        self.held, self.released = threading.Event(), threading.Event()
        self.proxy = InterceptingProxy(int(s3.endpoint.rsplit(":", 1)[1]), f"/checkpoint-{HELD_STEP}/".encode(),
                                       self._hold)
        self.pid: int | None = None
        env = {**s3.env, "AWS_ENDPOINT_URL_S3": self.proxy.url}
        node.kubectl("create", "secret", "generic", self.SECRET, "-n", namespace,
                     *[f"--from-literal={k}={v}" for k, v in env.items()])

    def _hold(self) -> None:
        self.held.set()
        self.released.wait(timeout=300)  # (a test that fails meanwhile: close() lets it go)

    def job(self, name: str, steps: int) -> dict:
        """A CPU job of `steps` steps, checkpointing every HELD_STEP steps, reading and writing through the proxy."""
        return ftj(name, self.s3, training={"maxSteps": steps, "saveSteps": HELD_STEP, "loggingSteps": 1},
                   merge={"enabled": False}, s3SecretRef={"name": self.SECRET})

    def wait(self, name: str, timeout: float = 300) -> str:
        """Wait until the job's runner is held in the save of checkpoint-HELD_STEP; return its pod's name."""
        def held():
            if self.held.is_set():
                return True
            if status(self.node, self.namespace, name).get("phase") == phases.FAILED:
                raise AssertionError(f"{name} failed: {status(self.node, self.namespace, name)}")
            return False
        wait_for(held, timeout=timeout, interval=0.2, what=f"{name}'s runner to save checkpoint-{HELD_STEP}")
        s = wait_status(self.node, self.namespace, name, lambda s: s.get("phase") == phases.TRAINING, 60,
                        "the job's phase to say Training")  # (the controller's, from the runner's report)
        assert s["runner"]["phase"] == phases.TRAINING, s
        return s["runner"]["pod"]

    def freeze(self, pod: str) -> None:
        """SIGSTOP the pod's runner process (its container's first process), then let the held upload through."""
        p = json.loads(self.node.kubectl("get", "pod", pod, "-n", self.namespace, "-o", "json").stdout)
        container = p["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
        self.pid = int(self.dockerd.run("inspect", "-f", "{{.State.Pid}}", container).stdout)
        freeze(self.pid)
        self.released.set()

    def wait_sigterm(self, timeout: float = 120) -> None:
        """Wait for the SIGTERM the kubelet sends the stopped runner (pending until thaw)."""
        wait_for(lambda: sigterm_pending(self.pid), timeout=timeout, interval=0.1,
                 what="the kubelet's SIGTERM to reach the runner")

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self.pid = None

    def close(self) -> None:
        self.released.set()
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.proxy.close()


@pytest.fixture
def held(node, namespace, s3, dockerd):
    """HeldRunner in this test's namespace."""
    h = HeldRunner(node, namespace, s3, dockerd)
    yield h
    h.close()
