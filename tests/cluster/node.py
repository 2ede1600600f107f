"""A real single-node Kubernetes cluster: the test control plane (cluster.py) plus kube-scheduler and a kubelet
(v1.20.2, its built-in dockershim) over the private Docker daemon (dockerd.py). Real pods, real containers.

    python -m tests.cluster.node up      # start; prints the kubeconfig path, stays up until Ctrl-C
                                         # (no CRD: the README's `helm install` brings it, as on a real cluster)
    with RealNode() as node:             # in tests (tests/e2e/conftest.py)
        node.kubectl("get", "nodes")

What it promises the machine: nothing outside its temp dir and the test cache is changed. The kubelet is built
with its sysctl rewriting turned into warnings (build.sh), and the three sysctls it would touch are checked and
restored on stop anyway; every process is stopped by PID; every mount under the node's dir is unmounted; the
fixed paths the kubelet creates (/var/log/pods, /var/log/containers, /var/lib/kubelet/device-plugins) are
removed when the node made them. Pods must use hostNetwork and images present in the daemon (pull policy Never
or IfNotPresent with a non-latest tag): nothing can be pulled, and there is no pod network.
"""
from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from tests.cluster.cluster import ClusterError, TestCluster, _die_with_parent, _tail, wait_for
from tests.cluster.dockerd import Dockerd, _alive, _stop_pid, mounts_under, unmount_under

NODE_NAME = "127.0.0.1"  # --hostname-override; --node-ip cannot be a loopback address
NODE_USER = f"system:node:{NODE_NAME}"
PAUSE_IMAGE = "ftc-pause:3.4"
SYSCTLS = ("vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops")
FIXED_PATHS = (Path("/var/log/pods"), Path("/var/log/containers"), Path("/var/lib/kubelet/device-plugins"),
               Path("/var/lib/kubelet"))


def ensure_pause(d: Dockerd, pause_binary: str) -> None:
    """The pod sandbox image, from the pause binary tests/cluster/build.sh compiles from the kubelet's tree."""
    if d.has_image(PAUSE_IMAGE):
        return
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.add(pause_binary, arcname="pause")
    d.run("import", "--change", 'ENTRYPOINT ["/pause"]', "-", PAUSE_IMAGE, input=buf.getvalue(), timeout=120)


def read_sysctls() -> dict[str, str]:
    return {k: Path("/proc/sys", k).read_text().strip() for k in SYSCTLS}


class RealNode:
    """Control plane + scheduler + kubelet. ``cluster`` and ``dockerd`` may be given (already started)."""

    def __init__(self, crds=(), users=(), dockerd: Dockerd | None = None, workdir: str | None = None):
        self.cluster = TestCluster(crds=crds, users=users, controllers="*", service_accounts=True,
                                   wait_for_controllers=False, workdir=workdir)
        self.node_token = self.cluster.add_user(NODE_USER, groups=("system:nodes",))
        self.dockerd = dockerd
        self._own_dockerd = dockerd is None
        self.dir: Path | None = None
        self._procs: dict[str, subprocess.Popen] = {}
        self._made: list[Path] = []
        self._sysctls: dict[str, str] = {}
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "RealNode":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 120) -> "RealNode":
        t0 = time.monotonic()
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        self.timings["ready"] = round(time.monotonic() - t0, 2)
        return self

    def _start(self, timeout: float) -> None:
        b = self.cluster.binaries
        if not (b.kubelet and b.kube_scheduler and b.pause):
            raise ClusterError("build.sh printed no KUBELET/KUBE_SCHEDULER/PAUSE: rebuild with FTC_REBUILD=1")
        self._sysctls = read_sysctls()
        self._made = [p for p in FIXED_PATHS if not p.exists()]
        if self.dockerd is None:
            self.dockerd = Dockerd().start()
        ensure_pause(self.dockerd, b.pause)
        self.cluster.start()
        self.timings["control plane"] = self.cluster.start_seconds
        self.dir = Path(tempfile.mkdtemp(prefix="ftc-node-", dir=self.cluster.dir))
        d = self.dir
        self._spawn("kube-scheduler", [b.kube_scheduler, f"--kubeconfig={self.cluster.kubeconfig}",
                                       "--leader-elect=false", "--port=0", "--secure-port=0", "--v=1"])
        kubeconfig = d / "kubelet.kubeconfig"
        self.cluster.write_kubeconfig(kubeconfig, self.node_token, NODE_USER)
        for sub in ("root", "pki", "dockershim", "plugins", "manifests"):
            (d / sub).mkdir()
        sock = self.dockerd.host
        self._spawn("kubelet", [
            b.kubelet, f"--kubeconfig={kubeconfig}", f"--hostname-override={NODE_NAME}",
            "--container-runtime=docker", f"--docker-endpoint={sock}", f"--docker={sock}",
            f"--container-runtime-endpoint=unix://{d / 'dockershim.sock'}",
            f"--pod-infra-container-image={PAUSE_IMAGE}", "--cgroup-driver=cgroupfs",
            f"--root-dir={d / 'root'}", f"--cert-dir={d / 'pki'}",
            f"--experimental-dockershim-root-directory={d / 'dockershim'}",
            f"--volume-plugin-dir={d / 'plugins'}", f"--pod-manifest-path={d / 'manifests'}",
            "--address=127.0.0.1", "--healthz-bind-address=127.0.0.1", "--read-only-port=0",
            "--fail-swap-on=false", "--make-iptables-util-chains=false", "--node-status-update-frequency=1s",
            "--image-gc-high-threshold=100", "--image-gc-low-threshold=99", "--serialize-image-pulls=false",
            "--eviction-hard=memory.available<100Mi,nodefs.available<1%,imagefs.available<1%,nodefs.inodesFree<1%",
            "--v=1",
        ])
        wait_for(self._node_ready, timeout=timeout, interval=0.5, what="the node to be Ready")

    def _node_ready(self) -> bool:
        for name, p in self._procs.items():
            if p.poll() is not None:
                raise ClusterError(f"{name} exited with {p.returncode}:\n{_tail(self.dir / f'{name}.log')}")
        r = self.kubectl("get", "node", NODE_NAME, "-o",
                         "jsonpath={.status.conditions[?(@.type=='Ready')].status}", check=False)
        return r.returncode == 0 and r.stdout.strip() == "True"

    def _spawn(self, name: str, argv: list[str]) -> None:
        assert self.dir is not None
        with open(self.dir / f"{name}.log", "wb") as f:
            self._procs[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, cwd=self.dir,
                preexec_fn=_die_with_parent, start_new_session=True,
                env={k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")})
        (self.dir / "pids").write_text("".join(f"{n} {p.pid}\n" for n, p in self._procs.items()))

    def stop(self) -> None:
        t0 = time.monotonic()
        for name in ("kubelet", "kube-scheduler"):
            p = self._procs.pop(name, None)
            if p is not None:
                _stop_pid(p.pid, grace=5)
                p.wait(timeout=30)
        if self.dockerd is not None:  # the pods' containers (k8s_*), whoever started the daemon
            ids = self.dockerd.run("ps", "-aq", "--filter", "name=k8s_", check=False, timeout=60).stdout.split()
            if ids:
                self.dockerd.run("rm", "-f", *ids, check=False, timeout=300)
        if self.dir is not None:
            unmount_under(self.dir)
        self.cluster.stop()  # removes its dir, and ours inside it
        if self.dockerd is not None and self._own_dockerd:
            self.dockerd.stop()
            self.dockerd = None
        for path in reversed(self._made):
            shutil.rmtree(path, ignore_errors=True)
        self._made = []
        for key, value in self._sysctls.items():
            if Path("/proc/sys", key).read_text().strip() != value:
                Path("/proc/sys", key).write_text(value)
        self.timings["stop"] = round(time.monotonic() - t0, 2)

    # ------------------------------------------------------------------ access
    @property
    def pids(self) -> dict[str, int]:
        return {n: p.pid for n, p in self._procs.items()}

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None
                ) -> subprocess.CompletedProcess:
        p = subprocess.run([self.cluster.kubectl, *args], env=self.cluster.env(), capture_output=True, text=True,
                           timeout=timeout, input=input, stdin=None if input is not None else subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed:\n{p.stderr[-3000:]}")
        return p

    def log_tail(self, name: str = "kubelet", n: int = 40) -> str:
        return _tail(self.dir / f"{name}.log", n) if self.dir else ""


def leftovers(before_pids: set[int] | None = None) -> list[str]:
    """What a stopped node may have left: processes of its binaries, mounts of its dirs, changed sysctls."""
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and _alive(int(proc.name)):
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if os.path.basename(cmd) in ("kubelet", "kube-scheduler", "kube-apiserver", "kube-controller-manager"):
                if before_pids is None or int(proc.name) not in before_pids:
                    out.append(f"process {proc.name} {cmd}")
    out += [f"mount {m}" for m in mounts_under(Path(tempfile.gettempdir())) if "ftc-" in m]
    return out


def bare(dockerd: Dockerd | None = None) -> RealNode:
    """The node `up` starts, and the one tests/e2e installs the operator on: nothing of the project's applied, so
    the README's `helm install` installs the CRD with the release (it refuses a CRD it does not own)."""
    return RealNode(dockerd=dockerd)


def main(argv: list[str]) -> int:
    if argv[:1] != ["up"]:
        print("usage: python -m tests.cluster.node up   (Ctrl-C stops it and cleans up)", file=sys.stderr)
        return 2
    node = bare()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    with node:
        print(f"KUBECONFIG={node.cluster.kubeconfig}\nready in {node.timings['ready']} s; no CRD yet: install the "
              "operator with the README's helm install (Install on a cluster, 2a); Ctrl-C to stop", flush=True)
        try:
            while not stop:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    print(f"stopped in {node.timings['stop']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
