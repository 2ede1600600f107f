"""A real, throw-away Kubernetes control plane for tests (no Docker, no kubelet).

etcd + kube-apiserver + kube-controller-manager v1.20.2 (job, garbagecollector and
namespace controllers), all on loopback ports picked at start, all state in a temp
dir. The binaries come from ``tests/cluster/build.sh`` (built once, cached under
``~/.cache/finetune-test-cluster``). No scheduler and no kubelet run: Pods stay
Pending until a test plays the kubelet with :class:`tests.cluster.kubelet.FakeKubelet`.

Usage without pytest::

    from tests.cluster.cluster import TestCluster
    with TestCluster(crds=["manifests/crds/finetunejob.yaml"]) as c:
        v1 = kubernetes.client.CoreV1Api(c.api_client())
        subprocess.run([c.kubectl, "get", "ns"], env=c.env(), check=True)

This module depends only on the standard library and PyYAML; ``api_client()`` and
``service_account_token()`` import the ``kubernetes`` package lazily.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import yaml

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build.sh"
KUBE_VERSION = "v1.20.2"

ADMIN_USER = "admin"
ADMIN_GROUPS = ("system:masters",)


class ClusterError(RuntimeError):
    """The test cluster could not be built, started or used."""


# --------------------------------------------------------------------------- binaries
@dataclass(frozen=True)
class ClusterBinaries:
    kube_apiserver: str
    kube_controller_manager: str
    etcd: str
    kubectl: str
    helm: str
    build_log: str = ""
    kube_scheduler: str = ""  # the real-node tier (tests/cluster/node.py) only
    kubelet: str = ""
    pause: str = ""

    @property
    def bin_dir(self) -> str:
        return os.path.dirname(self.kube_apiserver)


def ensure_binaries(build_script: str | os.PathLike | None = None, timeout: float = 3600) -> ClusterBinaries:
    """Run build.sh (a no-op after the first successful build) and return the paths it prints."""
    script = Path(build_script or BUILD_SCRIPT)
    proc = subprocess.run(
        ["bash", str(script)], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise ClusterError(
            f"{script} failed with exit code {proc.returncode}:\n{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}"
        )
    vals: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        key, sep, val = line.partition("=")
        if sep and key.isupper():
            vals[key] = val
    try:
        return ClusterBinaries(
            kube_apiserver=vals["KUBE_APISERVER"],
            kube_controller_manager=vals["KUBE_CONTROLLER_MANAGER"],
            etcd=vals["ETCD"],
            kubectl=vals["KUBECTL"],
            helm=vals["HELM"],
            build_log=vals.get("BUILD_LOG", ""),
            kube_scheduler=vals.get("KUBE_SCHEDULER", ""),
            kubelet=vals.get("KUBELET", ""),
            pause=vals.get("PAUSE", ""),
        )
    except KeyError as e:
        raise ClusterError(f"{script} did not print {e.args[0]}=...; stdout was:\n{proc.stdout}") from None


# --------------------------------------------------------------------------- users
@dataclass(frozen=True)
class TokenUser:
    """One line of the apiserver's --token-auth-file: ``token,user,uid,"group1,group2"``."""

    name: str
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    uid: str = ""
    groups: tuple[str, ...] = ()

    @classmethod
    def parse(cls, line: str) -> "TokenUser":
        import csv

        row = next(csv.reader([line.strip()]))
        if len(row) < 3:
            raise ValueError(f"token line needs token,user,uid[,groups]: {line!r}")
        groups = tuple(g.strip() for field_ in row[3:] for g in field_.split(",") if g.strip())
        return cls(name=row[1], token=row[0], uid=row[2], groups=groups)

    def csv_line(self) -> str:
        for v in (self.token, self.name, self.uid or self.name, *self.groups):
            if any(c in v for c in ',"\n'):
                raise ValueError(f"bad character in token-file field {v!r}")
        line = f"{self.token},{self.name},{self.uid or self.name}"
        if self.groups:
            line += ',"' + ",".join(self.groups) + '"'
        return line


def _coerce_user(u: "TokenUser | str | Sequence[str] | Mapping") -> TokenUser:
    if isinstance(u, TokenUser):
        return u
    if isinstance(u, str):
        return TokenUser.parse(u)
    if isinstance(u, Mapping):
        return TokenUser(
            name=u["name"], token=u.get("token") or uuid.uuid4().hex, uid=u.get("uid", ""),
            groups=tuple(u.get("groups", ())),
        )
    token, name, uid, *rest = u
    groups: tuple[str, ...] = ()
    if rest:
        g = rest[0]
        groups = tuple(x for x in (g.split(",") if isinstance(g, str) else g) if x)
    return TokenUser(name=name, token=token, uid=uid, groups=groups)


# --------------------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # preexec_fn: SIGKILL the child if the Python process dies
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _load_yaml_docs(paths: Iterable[str | os.PathLike]) -> list[dict]:
    docs: list[dict] = []
    for p in paths:
        with open(p) as f:
            for d in yaml.safe_load_all(f):
                if not d:
                    continue
                if d.get("kind") == "List":
                    docs.extend(i for i in d.get("items", []) if i)
                else:
                    docs.append(d)
    return docs


def sweep_stale_dirs(parent: str | None = None, min_age_s: float = 600) -> list[str]:
    """Remove ftc-cluster-* temp dirs left by killed sessions: none of the PIDs in their
    ``pids`` file is alive, and they are older than ``min_age_s``."""
    removed = []
    root = Path(parent or tempfile.gettempdir())
    now = time.time()
    for d in root.glob("ftc-cluster-*"):
        try:
            if not d.is_dir() or now - d.stat().st_mtime < min_age_s:
                continue
            pidfile = d / "pids"
            pids = [int(line.split()[1]) for line in pidfile.read_text().splitlines() if line.strip()] \
                if pidfile.exists() else []
            alive = False
            for pid in pids:
                try:
                    os.kill(pid, 0)
                    alive = True
                except ProcessLookupError:
                    pass
                except PermissionError:
                    alive = True
            if not alive:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(str(d))
        except (OSError, ValueError, IndexError):
            continue
    return removed


# --------------------------------------------------------------------------- cluster
class TestCluster:
    """etcd + kube-apiserver + kube-controller-manager on loopback.

    Args:
        crds: paths of YAML files with CustomResourceDefinitions (multi-doc ok); they are
            created and waited for (Established) BEFORE the controller-manager starts, so
            the garbage collector knows the new kinds from the start.
        users: extra token users, each a ``TokenUser``, a ``"token,user,uid,group1,group2"``
            line, a ``(token, user, uid, groups)`` tuple or a ``{"name":..,"groups":[..]}``
            dict. Token files are only read at startup, so add them before ``start()``
            (``add_user()``), or use ``service_account_token()`` for identities made later.
        binaries: a ``ClusterBinaries``; default: ``ensure_binaries()`` (runs build.sh).
        controllers: the controller-manager's ``--controllers``.
        start_controller_manager: False gives an API server only.
        wait_for_controllers: wait until the job and namespace controllers report synced
            caches before ``start()`` returns (~0.5 s after the controller-manager starts).
        wait_for_gc: also wait for the garbage collector's first full sync (~2 s more).
        workdir: parent for the temp dir (default: the system temp dir).
        keep_workdir: leave the temp dir (logs, etcd data) after ``stop()``.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        crds: Iterable[str | os.PathLike] = (),
        users: Iterable = (),
        binaries: ClusterBinaries | None = None,
        controllers: str = "job,garbagecollector,namespace",
        start_controller_manager: bool = True,
        wait_for_controllers: bool = True,
        wait_for_gc: bool = False,
        workdir: str | os.PathLike | None = None,
        keep_workdir: bool = False,
        start_timeout: float = 90.0,
        extra_apiserver_args: Sequence[str] = (),
        extra_controller_manager_args: Sequence[str] = (),
        service_accounts: bool = False,
    ):
        self.crd_files = [str(p) for p in crds]
        self.admin_token = uuid.uuid4().hex
        self._users: dict[str, TokenUser] = {}
        for u in users:
            self._add(_coerce_user(u))
        self._binaries = binaries
        self.controllers = controllers
        self.start_controller_manager = start_controller_manager
        self.wait_for_controllers = wait_for_controllers
        self.wait_for_gc = wait_for_gc
        self._workdir_parent = str(workdir) if workdir else None
        self.keep_workdir = keep_workdir
        self.start_timeout = start_timeout
        self.extra_apiserver_args = list(extra_apiserver_args)
        self.extra_controller_manager_args = list(extra_controller_manager_args)
        # A cluster with nodes (tests/cluster/node.py): the ServiceAccount admission plugin and token
        # controller on (pods get their token), and the Node authorizer for kubelets.
        self.service_accounts = service_accounts

        self.dir: Path | None = None
        self.server: str = ""
        self.kubeconfig: str = ""
        self.ca_file: str = ""
        self.apiserver_port = self.etcd_port = self.etcd_peer_port = 0
        self.etcd_url = ""
        self._procs: dict[str, subprocess.Popen] = {}
        self._logs: dict[str, Path] = {}
        self._ssl_ctx: ssl.SSLContext | None = None
        self.started = False
        self.start_seconds = 0.0
        self.timings: dict[str, float] = {}  # seconds since start() per startup phase
        self.stop_seconds: dict[str, float] = {}
        self._t0 = 0.0

    # ------------------------------------------------------------------ users
    def _add(self, u: TokenUser) -> None:
        if u.name in self._users or u.name == ADMIN_USER:
            raise ValueError(f"user {u.name!r} defined twice")
        self._users[u.name] = u

    def add_user(self, name: str, groups: Sequence[str] = (), token: str | None = None, uid: str = "") -> str:
        """Define a token user (before start()); returns its bearer token."""
        if self.started:
            raise ClusterError("token users must be added before start() (the token file is read at startup)")
        u = TokenUser(name=name, token=token or uuid.uuid4().hex, uid=uid, groups=tuple(groups))
        self._add(u)
        return u.token

    @property
    def users(self) -> dict[str, TokenUser]:
        return dict(self._users)

    def user_token(self, name: str) -> str:
        if name == ADMIN_USER:
            return self.admin_token
        try:
            return self._users[name].token
        except KeyError:
            raise KeyError(f"no token user {name!r}; defined: {sorted(self._users)}") from None

    # ------------------------------------------------------------------ binaries
    @property
    def binaries(self) -> ClusterBinaries:
        if self._binaries is None:
            self._binaries = ensure_binaries()
        return self._binaries

    @property
    def kubectl(self) -> str:
        return self.binaries.kubectl

    @property
    def helm(self) -> str:
        return self.binaries.helm

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "TestCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "TestCluster":
        if self.started:
            return self
        b = self.binaries
        sweep_stale_dirs(self._workdir_parent)
        t0 = time.monotonic()
        for attempt in range(3):  # a port picked as free may be taken before the server binds it
            try:
                self._start_once(b)
                break
            except BaseException as e:  # never leave processes behind a failed start
                self._stop_procs()
                if not self.keep_workdir:
                    self._remove_dir()
                port_clash = isinstance(e, ClusterError) and "address already in use" in str(e).lower()
                if not port_clash or attempt == 2:
                    raise
        self.started = True
        self.start_seconds = time.monotonic() - t0
        return self

    def _start_once(self, b: ClusterBinaries) -> None:
        self._t0 = time.monotonic()
        self.timings: dict[str, float] = {}
        self.dir = Path(tempfile.mkdtemp(prefix="ftc-cluster-", dir=self._workdir_parent))
        d = self.dir
        (d / "logs").mkdir()
        (d / "pki").mkdir()
        self.etcd_port, self.etcd_peer_port, self.apiserver_port = free_port(), free_port(), free_port()
        while len({self.etcd_port, self.etcd_peer_port, self.apiserver_port}) < 3:
            self.etcd_peer_port, self.apiserver_port = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{self.etcd_port}"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        self.server = f"https://127.0.0.1:{self.apiserver_port}"

        # etcd first (the apiserver retries until it answers)
        self._spawn("etcd", [
            b.etcd, "--name=default", f"--data-dir={d / 'etcd'}", "--unsafe-no-fsync",
            f"--listen-client-urls={self.etcd_url}", f"--advertise-client-urls={self.etcd_url}",
            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}", "--initial-cluster-state=new",
            "--log-level=warn", "--logger=zap",
        ])

        # service-account signing key (TokenRequest) while etcd starts
        sa_key, sa_pub = d / "pki" / "sa.key", d / "pki" / "sa.pub"
        self._openssl(["genrsa", "-out", str(sa_key), "2048"])
        self._openssl(["rsa", "-in", str(sa_key), "-pubout", "-out", str(sa_pub)])

        tokens = d / "pki" / "tokens.csv"
        lines = [TokenUser(ADMIN_USER, self.admin_token, ADMIN_USER, ADMIN_GROUPS).csv_line()]
        lines += [u.csv_line() for u in self._users.values()]
        tokens.write_text("\n".join(lines) + "\n")
        tokens.chmod(0o600)

        cert_dir = d / "pki" / "apiserver"
        self._spawn("kube-apiserver", [
            b.kube_apiserver,
            f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={self.apiserver_port}", "--insecure-port=0",
            f"--cert-dir={cert_dir}",
            f"--token-auth-file={tokens}",
            "--authorization-mode=Node,RBAC" if self.service_accounts else "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={sa_pub}",
            f"--service-account-signing-key-file={sa_key}",
            "--api-audiences=https://kubernetes.default.svc",
            "--service-cluster-ip-range=10.0.0.0/24",
            *(() if self.service_accounts else ("--disable-admission-plugins=ServiceAccount",)),
            "--enable-priority-and-fairness=false",
            "--profiling=false",
            "--v=1",
            *self.extra_apiserver_args,
        ])
        self.ca_file = str(cert_dir / "apiserver.crt")
        self._mark("keys+spawn")
        self._wait_ready()
        self._mark("apiserver ready")
        self._ssl_ctx = ssl.create_default_context(cafile=self.ca_file)

        self.kubeconfig = str(d / "kubeconfig")
        self.write_kubeconfig(self.kubeconfig, self.admin_token, ADMIN_USER)
        if self.crd_files:
            self.apply_crds(self.crd_files)
            self._mark("crds established")

        if self.start_controller_manager:
            self._spawn("kube-controller-manager", [
                b.kube_controller_manager,
                f"--kubeconfig={self.kubeconfig}",
                "--leader-elect=false", "--port=0", "--secure-port=0",
                f"--controllers={self.controllers}",
                "--use-service-account-credentials=false",
                "--concurrent-gc-syncs=5",
                *((f"--service-account-private-key-file={sa_key}", f"--root-ca-file={self.ca_file}")
                  if self.service_accounts else ()),
                "--v=2",
                *self.extra_controller_manager_args,
            ])
            if self.wait_for_controllers:
                self._wait_controllers()
                self._mark("controllers synced")

    def _mark(self, what: str) -> None:
        self.timings[what] = round(time.monotonic() - self._t0, 3)

    def _openssl(self, args: list[str]) -> None:
        p = subprocess.run(["openssl", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            raise ClusterError(f"openssl {' '.join(args)} failed: {p.stderr}")

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        assert self.dir is not None
        log = self.dir / "logs" / f"{name}.log"
        self._logs[name] = log
        with open(log, "wb") as f:
            p = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                cwd=self.dir, preexec_fn=_die_with_parent, start_new_session=True,
                env={k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")},
            )
        self._procs[name] = p
        (self.dir / "pids").write_text("".join(f"{n} {q.pid}\n" for n, q in self._procs.items()))
        return p

    def _check_alive(self) -> None:
        for name, p in self._procs.items():
            if p.poll() is not None:
                raise ClusterError(
                    f"{name} exited with code {p.returncode} during startup; log {self._logs[name]}:\n"
                    + _tail(self._logs[name])
                )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        last = ""
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                req = urllib.request.Request(
                    self.server + "/readyz", headers={"Authorization": f"Bearer {self.admin_token}"}
                )
                with urllib.request.urlopen(req, timeout=2, context=insecure) as r:  # noqa: S310
                    if r.status == 200 and os.path.exists(self.ca_file):
                        return
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {e.read()[:300]!r}"
            except (OSError, ssl.SSLError) as e:
                last = repr(e)
            time.sleep(0.1)
        raise ClusterError(
            f"kube-apiserver not ready after {self.start_timeout}s ({last}); log:\n{_tail(self._logs['kube-apiserver'])}"
        )

    def _wait_controllers(self) -> None:
        wanted = []
        ctrls = self.controllers.split(",")
        if "job" in ctrls or "*" in ctrls:
            wanted.append("Caches are synced for job")
        if "namespace" in ctrls or "*" in ctrls:
            wanted.append("Caches are synced for namespace")
        if self.wait_for_gc and ("garbagecollector" in ctrls or "*" in ctrls):
            # ~2 s more; without it the collector finishes syncing in the background and
            # then also handles owners deleted meanwhile (it verifies dangling owners).
            wanted.append("Garbage collector: all resource monitors have synced")
        log = self._logs["kube-controller-manager"]
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            self._check_alive()
            text = log.read_text(errors="replace")
            if all(w in text for w in wanted):
                return
            time.sleep(0.05)
        raise ClusterError(f"kube-controller-manager not ready after {self.start_timeout}s; log:\n{_tail(log)}")

    def stop(self) -> None:
        """Kill all processes (by PID) and remove the temp dir. Safe to call twice."""
        self._stop_procs()
        if not self.keep_workdir:
            self._remove_dir()
        self.started = False

    def _stop_procs(self, grace: float = 3.0) -> None:
        # controller-manager, then apiserver, then etcd; SIGTERM, SIGKILL after `grace`
        # (nothing here is worth a long graceful shutdown: the data dir is thrown away).
        self.stop_seconds = {}
        for name, p in reversed(list(self._procs.items())):
            t = time.monotonic()
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    p.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    try:
                        os.kill(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    p.wait(timeout=10)
            self.stop_seconds[name] = round(time.monotonic() - t, 3)
        self._procs.clear()

    def _remove_dir(self) -> None:
        if self.dir is not None and self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)

    def __del__(self) -> None:  # last-resort cleanup
        try:
            if self._procs:
                self._stop_procs()
        except Exception:
            pass

    # ------------------------------------------------------------------ status
    @property
    def pids(self) -> dict[str, int]:
        return {n: p.pid for n, p in self._procs.items()}

    @property
    def log_files(self) -> dict[str, str]:
        return {n: str(p) for n, p in self._logs.items()}

    def log_tail(self, name: str = "kube-controller-manager", lines: int = 40) -> str:
        return _tail(self._logs[name], lines)

    def is_running(self) -> bool:
        return bool(self._procs) and all(p.poll() is None for p in self._procs.values())

    # ------------------------------------------------------------------ access
    def write_kubeconfig(self, path: str | os.PathLike, token: str, user: str = "user",
                         namespace: str | None = None) -> str:
        ctx: dict = {"cluster": "test", "user": user}
        if namespace:
            ctx["namespace"] = namespace
        cfg = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "test", "cluster": {"server": self.server, "certificate-authority": self.ca_file}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "test", "context": ctx}],
            "current-context": "test", "preferences": {},
        }
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f)
        os.chmod(path, 0o600)
        return str(path)

    def kubeconfig_for(self, user: str | None = None, token: str | None = None,
                       namespace: str | None = None) -> str:
        """A kubeconfig file for a token user (by name) or for any bearer token."""
        assert self.dir is not None, "cluster not started"
        if token is None:
            token = self.user_token(user or ADMIN_USER)
        name = user or "token-" + token[:8]
        path = self.dir / f"kubeconfig-{name.replace(':', '_').replace('/', '_')}-{uuid.uuid4().hex[:6]}"
        return self.write_kubeconfig(path, token, name, namespace)

    def api_client(self, user: str | None = None, token: str | None = None):
        """A ``kubernetes.client.ApiClient`` for the admin (default), a token user or a token."""
        import kubernetes.client

        if token is None:
            token = self.user_token(user or ADMIN_USER)
        cfg = kubernetes.client.Configuration(host=self.server, ssl_ca_cert=self.ca_file)
        cfg.api_key = {"authorization": token}
        cfg.api_key_prefix = {"authorization": "Bearer"}
        cfg.verify_ssl = True
        cfg.proxy = None
        return kubernetes.client.ApiClient(cfg)

    def env(self, user: str | None = None, token: str | None = None, **extra: str) -> dict[str, str]:
        """os.environ plus KUBECONFIG (admin, or a user's), PATH with kubectl/helm first,
        and private HELM_* dirs; for subprocesses (kubectl, helm, the controller)."""
        e = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
        e["KUBECONFIG"] = self.kubeconfig if (user is None and token is None) else self.kubeconfig_for(user, token)
        e["PATH"] = self.binaries.bin_dir + os.pathsep + e.get("PATH", "")
        if self.dir is not None:
            for k in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
                e[k] = str(self.dir / "helm" / k.split("_")[1].lower())
        e.update(extra)
        return e

    # ------------------------------------------------------------------ raw API
    def request(self, method: str, path: str, body: dict | None = None, token: str | None = None,
                content_type: str = "application/json", timeout: float = 10) -> tuple[int, dict]:
        """A raw HTTPS call to the apiserver (stdlib only). Returns (status, json body)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method, headers={
            "Authorization": f"Bearer {token or self.admin_token}",
            "Content-Type": content_type, "Accept": "application/json",
        })
        https = urllib.request.HTTPSHandler(context=self._ssl_ctx)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), https)
        try:
            with opener.open(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw else {})
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, {"message": raw.decode(errors="replace")}

    def apply_crds(self, paths: Iterable[str | os.PathLike], timeout: float = 30) -> list[str]:
        """Create (or replace) the CRDs in the files and wait until they are Established."""
        names = []
        for doc in _load_yaml_docs(paths):
            if doc.get("kind") != "CustomResourceDefinition":
                raise ClusterError(f"not a CustomResourceDefinition: {doc.get('kind')} {doc.get('metadata', {}).get('name')}")
            api = doc.get("apiVersion", "apiextensions.k8s.io/v1")
            base = f"/apis/{api}/customresourcedefinitions"
            name = doc["metadata"]["name"]
            code, resp = self.request("POST", base, doc)
            if code == 409:
                code0, cur = self.request("GET", f"{base}/{name}")
                doc = dict(doc)
                doc["metadata"] = dict(doc["metadata"], resourceVersion=cur["metadata"]["resourceVersion"])
                code, resp = self.request("PUT", f"{base}/{name}", doc)
            if code >= 300:
                raise ClusterError(f"creating CRD {name} failed: HTTP {code}: {resp.get('message', resp)}")
            names.append((base, name))
        deadline = time.monotonic() + timeout
        for base, name in names:
            while True:
                code, cur = self.request("GET", f"{base}/{name}")
                conds = {c["type"]: c["status"] for c in (cur.get("status") or {}).get("conditions") or []}
                if conds.get("Established") == "True":
                    break
                if time.monotonic() > deadline:
                    raise ClusterError(f"CRD {name} not Established after {timeout}s: {cur.get('status')}")
                time.sleep(0.05)
        return [n for _, n in names]

    def service_account_token(self, namespace: str, name: str, create: bool = True,
                              expiration_seconds: int = 3600,
                              audiences: Sequence[str] = ("https://kubernetes.default.svc",)) -> str:
        """A bearer token for ServiceAccount ``namespace/name`` via the TokenRequest API
        (creating the ServiceAccount, and the namespace, if missing and ``create``).
        The apiserver authenticates it as ``system:serviceaccount:<ns>:<name>``, groups
        ``system:serviceaccounts`` and ``system:serviceaccounts:<ns>``."""
        if create:
            code, resp = self.request("POST", "/api/v1/namespaces",
                                      {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
            if code not in (201, 409):
                raise ClusterError(f"creating namespace {namespace}: HTTP {code} {resp.get('message')}")
            code, resp = self.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts",
                                      {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}})
            if code not in (201, 409):
                raise ClusterError(f"creating serviceaccount {namespace}/{name}: HTTP {code} {resp.get('message')}")
        code, resp = self.request(
            "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
             "spec": {"audiences": list(audiences), "expirationSeconds": expiration_seconds}},
        )
        if code != 201:
            raise ClusterError(f"TokenRequest for {namespace}/{name}: HTTP {code} {resp.get('message', resp)}")
        return resp["status"]["token"]

    def kubectl_run(self, *args: str, user: str | None = None, token: str | None = None,
                    check: bool = True, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run kubectl against this cluster; returns the CompletedProcess (text)."""
        p = subprocess.run([self.kubectl, *args], env=self.env(user, token), capture_output=True, text=True,
                           input=input, timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed ({p.returncode}): {p.stderr}")
        return p

    def helm_run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run helm (v3.6.2) against this cluster; returns the CompletedProcess (text)."""
        p = subprocess.run([self.helm, *args], env=self.env(), capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise ClusterError(f"helm {' '.join(args)} failed ({p.returncode}): {p.stderr}")
        return p


if __name__ == "__main__":  # python -m tests.cluster.cluster: start, print, wait for Ctrl-C
    import sys

    def _interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    c = TestCluster(crds=sys.argv[1:])
    c.start()
    print(f"ready in {c.start_seconds:.2f}s\nKUBECONFIG={c.kubeconfig}\nserver={c.server}\npids={c.pids}", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()


def wait_for(fn, timeout: float = 30, interval: float = 0.05, what: str = "condition"):
    """Poll fn() until it returns something truthy; return that (shared by every cluster test)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
