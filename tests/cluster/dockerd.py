"""A private Docker daemon for the real-node tier: Debian's docker.io, loopback only, its own directories.

    with Dockerd() as d:
        d.docker("images")

- No network of its own: ``--bridge=none --iptables=false --ip-forward=false --ip-masq=false``; every container
  runs with the host's network namespace and servers bind 127.0.0.1.
- Its data root lives in the test cache (``~/.cache/finetune-test-cluster/docker``), so images built once (the
  Debian base, the pause image, the project's images and their layers) are still there on the next run.
- Its default runtime is a small wrapper around runc that turns a negative ``oomScoreAdj`` into 0: the kubelet
  asks for -998 on every pod sandbox, which this kind of machine (no CAP_SYS_RESOURCE) refuses.
- One daemon per data root (a lock file); stopped by PID (SIGTERM, then SIGKILL), its containers with it.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "finetune-test-cluster"

RUNC_WRAPPER = """#!/bin/sh
# runc, with any negative oomScoreAdj in the OCI bundle set to 0 (this machine's root lacks CAP_SYS_RESOURCE).
bundle=""
prev=""
for a in "$@"; do
  case "$prev" in --bundle|-b) bundle="$a" ;; esac
  case "$a" in --bundle=*) bundle="${a#--bundle=}" ;; esac
  prev="$a"
done
if [ -n "$bundle" ] && [ -f "$bundle/config.json" ]; then
  sed -i -E 's/"oomScoreAdj": *-[0-9]+/"oomScoreAdj":0/' "$bundle/config.json"
fi
exec RUNC "$@"
"""


class DockerError(RuntimeError):
    """The private Docker daemon could not start or a docker command failed."""


def missing_packages() -> list[str]:
    """What the machine lacks for this tier (Debian package names), for a clear message."""
    need = {"dockerd": "docker.io", "runc": "runc", "mmdebstrap": "mmdebstrap"}
    return sorted({pkg for binary, pkg in need.items() if shutil.which(binary) is None})


class Dockerd:
    def __init__(self, home: Path | None = None):
        # FTC_DOCKER_HOME: another daemon's home, e.g. for a `node up` beside the test session's daemon
        self.home = Path(home or os.environ.get("FTC_DOCKER_HOME") or CACHE / "docker")
        self.sock = self.home / "docker.sock"
        self.host = f"unix://{self.sock}"
        self.proc: subprocess.Popen | None = None
        self._lock = None
        self.start_seconds = 0.0

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "Dockerd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 60) -> "Dockerd":
        missing = missing_packages()
        if missing:
            raise DockerError(f"the real-node tier needs Debian packages: apt-get install {' '.join(missing)}")
        self.home.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.home / ".lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DockerError(f"another test session's dockerd uses {self.home} (lock {self.home / '.lock'})") from None
        self._reap_stale()
        wrapper = self.home / "runc-no-negative-oom"
        wrapper.write_text(RUNC_WRAPPER.replace("RUNC", shutil.which("runc")))
        wrapper.chmod(0o755)
        t0 = time.monotonic()
        log = open(self.home / "dockerd.log", "ab")
        self.proc = subprocess.Popen(
            ["dockerd", "--iptables=false", "--ip-forward=false", "--ip-masq=false", "--bridge=none",
             "--userland-proxy=false", f"--data-root={self.home / 'root'}", f"--exec-root={self.home / 'exec'}",
             "-H", self.host, f"--pidfile={self.home / 'dockerd.pid'}",
             "--exec-opt", "native.cgroupdriver=cgroupfs",
             "--add-runtime", f"ftc={wrapper}", "--default-runtime", "ftc"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DockerError(f"dockerd exited with {self.proc.returncode}; log {self.home / 'dockerd.log'}:\n"
                                  + self.log_tail())
            if self.sock.exists() and self.run("version", check=False, timeout=10).returncode == 0:
                self.start_seconds = time.monotonic() - t0
                return self
            time.sleep(0.2)
        self.stop()
        raise DockerError(f"dockerd did not answer within {timeout:.0f} s; log:\n{self.log_tail()}")

    def _reap_stale(self) -> None:
        """A daemon left by a killed session on this data root (we hold the lock, so it is not live)."""
        pidfile = self.home / "dockerd.pid"
        if pidfile.exists():
            try:
                pid = int(pidfile.read_text().strip() or 0)
            except ValueError:
                pid = 0
            if pid and Path(f"/proc/{pid}/cmdline").exists() and b"dockerd" in Path(f"/proc/{pid}/cmdline").read_bytes():
                _stop_pid(pid)
            pidfile.unlink(missing_ok=True)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                # containers first (a kubelet's pods), then the daemon (it stops its containerd)
                ids = self.run("ps", "-aq", check=False, timeout=30).stdout.split()
                if ids:
                    self.run("rm", "-f", *ids, check=False, timeout=120)
                _stop_pid(self.proc.pid, grace=20)
            self.proc.wait(timeout=30)
            self.proc = None
        for leftover in (self.home / "exec",):
            unmount_under(leftover)
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join((self.home / "dockerd.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # ------------------------------------------------------------------ commands
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host}

    def run(self, *args: str, check: bool = True, timeout: float = 600, input: bytes | str | None = None,
            capture: bool = True) -> subprocess.CompletedProcess:
        argv = ["docker", "-H", self.host, *args]
        text = not isinstance(input, bytes)
        p = subprocess.run(argv, input=input, capture_output=capture, text=text, timeout=timeout, env=self.env(),
                           stdin=None if input is not None else subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise DockerError(f"{' '.join(argv)} failed ({p.returncode}):\n{(p.stderr or '')[-3000:]}")
        return p

    def has_image(self, ref: str) -> bool:
        return self.run("image", "inspect", ref, check=False, timeout=30).returncode == 0

    def image_size(self, ref: str) -> int:
        return int(self.run("image", "inspect", "-f", "{{.Size}}", ref, timeout=30).stdout.strip())


def _stop_pid(pid: int, grace: float = 10) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    """By process state, not kill -0: a zombie is not alive."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] not in ("Z", "X")


def mounts_under(prefix: Path) -> list[str]:
    prefix_s = str(prefix)
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount_point = line.split()[4].replace("\\040", " ")
        if mount_point == prefix_s or mount_point.startswith(prefix_s + "/"):
            out.append(mount_point)
    return out


def unmount_under(prefix: Path) -> None:
    for mount_point in sorted(mounts_under(prefix), key=len, reverse=True):
        subprocess.run(["umount", "-l", mount_point], capture_output=True)
