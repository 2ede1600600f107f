"""Build the project's images from its Dockerfile, offline except for the package registries.

    python -m tests.e2e.images          # build (or check) everything; prints sizes, layers and times as JSON

No base image can be pulled here, so CI makes one from Debian packages (mmdebstrap: Debian 12 with python3 and
python3-venv), imports it into the private daemon (tests/cluster/dockerd.py) and builds the Dockerfile as a user
does, with only the base images' names substituted (BASE and CPU_BASE): `docker build .` with no target, which is
the production runner (CUDA torch from PyPI, exactly as its lock says), then the `runner-cpu` and `controller`
targets (the legacy builder has built every stage on the way; these two only tag them). The CPU runner's torch
build comes from the machine's local wheel folder (served on loopback as TORCH_CPU_LINKS) instead of PyTorch's
CPU index. Everything else is installed by the Dockerfile's own `pip install --require-hashes` from the locks.

Cached between runs: the base tarball (in ~/.cache/finetune-test-cluster/images) and the daemon's data root, so
a second build reuses every layer whose inputs did not change (the locks' layers come before the source).
"""
from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from tests.cluster.dockerd import CACHE, Dockerd, DockerError

ROOT = Path(__file__).resolve().parents[2]
BASE = "ftc-debian:bookworm"
RUNNER = "finetune-runner:e2e"  # the default target: the production runner
RUNNER_CPU = "finetune-runner-cpu:e2e"
CONTROLLER = "finetune-controller:e2e"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "passwd")
REPORT = CACHE / "images" / "last-build.json"
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
WHEEL_PORT = 38517


def debian_mirror() -> str:
    """The machine's own Debian mirror (its apt sources), as tests/cluster/build.sh finds it."""
    for f in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in f.read_text().split("\n\n"):
            if "bookworm" in stanza:
                for line in stanza.splitlines():
                    if line.startswith("URIs:"):
                        return line.split()[1]
    for f in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*.list")]:
        if f.exists():
            for line in f.read_text().splitlines():
                parts = line.split()
                if parts[:1] == ["deb"] and " bookworm " in f" {line} ":
                    return next(p for p in parts[1:] if p.startswith(("http", "file")))
    raise DockerError("no Debian bookworm mirror in /etc/apt/sources.list*")


def ensure_base(d: Dockerd) -> float:
    """The Debian base image: mmdebstrap once (tarball cached), docker import when the daemon lacks it."""
    if d.has_image(BASE):
        return 0.0
    t0 = time.monotonic()
    tar = CACHE / "images" / "debian-bookworm-base.tar"
    if not tar.exists():
        tar.parent.mkdir(parents=True, exist_ok=True)
        part = tar.with_suffix(".part")
        # The machine's trust store goes in (its package registries may sit behind a TLS proxy with its own CA),
        # and pip is told to use it rather than its bundled certificates, as on the machine itself.
        subprocess.run(["mmdebstrap", "--quiet", "--format=tar", "--variant=minbase",
                        f"--include={','.join(BASE_PACKAGES)}",
                        f"--customize-hook=copy-in {HOST_CA_BUNDLE} /etc/ssl/certs",
                        f"--customize-hook=echo '[global]\ncert = {HOST_CA_BUNDLE}' > \"$1/etc/pip.conf\"",
                        "bookworm", str(part), debian_mirror()],
                       check=True, stdin=subprocess.DEVNULL)
        part.rename(tar)
    d.run("import", "--change", 'CMD ["/bin/bash"]', str(tar), BASE, timeout=600)
    return time.monotonic() - t0


def local_wheel_dir() -> Path:
    """The machine's local wheel folder (pip's find-links), which holds the CPU torch build."""
    value = os.environ.get("PIP_FIND_LINKS") or subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.find-links"], capture_output=True, text=True).stdout
    for candidate in value.split():
        if Path(candidate).is_dir():
            return Path(candidate)
    raise DockerError("no local wheel folder (pip's find-links) with the CPU torch build on this machine")


@contextmanager
def serve(directory: Path):
    """The wheel folder on loopback. A fixed port: the URL is a build argument, and the legacy builder keys its
    layer cache on the values of the build arguments a stage declares (a new port would rebuild every layer)."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", WHEEL_PORT), handler)
    except OSError:  # taken: any port (the build is right, only its cache is missed)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # noqa: D102 - pip's requests are not news
        pass


def build(d: Dockerd, target: str | None, tag: str, *build_args: str, log: Path) -> float:
    """One `docker build` (target None: the Dockerfile's default, as a plain `docker build .`); seconds."""
    t0 = time.monotonic()
    argv = ["build", "--network", "host", *(["--target", target] if target else []), "-t", tag]
    for a in build_args:
        argv += ["--build-arg", a]
    with open(log, "w") as f:
        p = subprocess.run(["docker", "-H", d.host, *argv, str(ROOT)], stdout=f, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, env={**d.env(), "DOCKER_BUILDKIT": "0"}, timeout=3000)
    if p.returncode != 0:
        raise DockerError(f"docker build {'--target ' + target if target else '.'} failed; log {log}:\n"
                          + "\n".join(log.read_text(errors="replace").splitlines()[-40:]))
    return time.monotonic() - t0


def layers(d: Dockerd, tag: str) -> list[dict]:
    """The image's layers that hold data, newest first: MB and the instruction that made each."""
    out = d.run("history", "--no-trunc", "--format", "{{json .}}", tag, timeout=60).stdout.splitlines()
    rows = [json.loads(line) for line in out]
    return [{"mb": round(_bytes(r["Size"]) / 1e6), "step": r["CreatedBy"].replace("/bin/sh -c ", "")[:120]}
            for r in rows if _bytes(r["Size"]) >= 1e6]


def _bytes(size: str) -> float:
    units = {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9}
    number = size.rstrip("kKMGB")
    return float(number) * units[size[len(number):] or "B"]


def build_all(d: Dockerd) -> dict:
    """Every image (and the base): seconds, sizes and the runners' layers."""
    logs = CACHE / "images"
    logs.mkdir(parents=True, exist_ok=True)
    report: dict = {"base_seconds": round(ensure_base(d), 1)}
    wheels = local_wheel_dir()
    if not list(wheels.glob("torch-*+cpu-*.whl")):
        raise DockerError(f"{wheels} has no CPU torch wheel for the CPU runner image")
    bases = (f"BASE={BASE}", f"CPU_BASE={BASE}")  # the legacy builder reads every stage's FROM
    with serve(wheels) as url:
        args = (*bases, f"TORCH_CPU_LINKS={url}")
        report["runner_seconds"] = round(build(d, None, RUNNER, *args, log=logs / "runner-build.log"), 1)
        for target, tag in (("runner-cpu", RUNNER_CPU), ("controller", CONTROLLER)):
            report[f"{target}_seconds"] = round(build(d, target, tag, *args, log=logs / f"{target}-build.log"), 1)
    report["sizes_mb"] = {tag: round(d.image_size(tag) / 1e6) for tag in (BASE, CONTROLLER, RUNNER_CPU, RUNNER)}
    report["layers"] = {tag: layers(d, tag) for tag in (RUNNER, RUNNER_CPU)}
    REPORT.write_text(json.dumps(report, indent=1))
    return report


def main() -> int:
    try:
        with Dockerd() as d:
            print(json.dumps(build_all(d), indent=1))
    except DockerError as e:
        print(f"images: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
