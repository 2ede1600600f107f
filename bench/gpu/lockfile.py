"""The runner's GPU lock (locks/runner.txt) on a GPU machine: which of its wheels to carry there, which to install
into the venv beside the machine's own torch, and `pip freeze` against it. Run by bench/gpu/setup.sh,
fetch-wheels.sh and lock-check.sh (stdlib and `packaging` only: it runs on the GPU machine's Python).

    python3 bench/gpu/lockfile.py carry            # the lock's lines to fetch here (hashes kept)
    python3 bench/gpu/lockfile.py missing          # on the GPU machine: the names to carry (not there at the lock's version)
    python3 bench/gpu/lockfile.py need DIR...      # lines this Python lacks, whose wheel is in one of the DIRs
    python3 bench/gpu/lockfile.py compare OUT.json # every lock pin against what this Python has
"""
from __future__ import annotations

import json
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import Marker
from packaging.utils import canonicalize_name
from packaging.version import Version

LOCK = Path(__file__).resolve().parents[2] / "locks" / "runner.txt"
# The GPU machines' own CUDA stack (torch 2.11.0+cu130, its nvidia-* libraries, triton: several GB), used as it is;
# lock-check compares their versions with the lock's like every other package's.
MACHINES_OWN = re.compile(r"^(torch|triton|nvidia-.*|cuda-toolkit)$")


GPU_PYTHON = "3.12"  # the GPU machines' python3


def entries(python: str | None = None) -> list[tuple[str, str, str]]:
    """(name, version, the lock's line with its hashes) of every pin that applies on Linux x86_64 to `python`
    (default: this interpreter)."""
    env = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}
    if python:
        env |= {"python_version": python, "python_full_version": python + ".0"}
    text = re.sub(r"^#.*\n", "", LOCK.read_text(), flags=re.M)
    out = []
    for entry in re.split(r"\n(?=\S)", text):
        if not entry.strip():
            continue
        head = entry.split("\\")[0].strip()
        req, _, marker = head.partition(";")
        name, _, version = req.strip().partition("==")
        if marker.strip() and not Marker(marker.strip()).evaluate(env):
            continue
        out.append((canonicalize_name(name), version.strip(), entry.strip()))
    return out


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def same(have: str | None, want: str) -> bool:
    return have is not None and Version(have).public == Version(want).public


def wheel_names(folder: Path) -> set[str]:
    return {canonicalize_name(w.name.split("-")[0]) for w in folder.glob("*.whl")}


def main(argv: list[str]) -> int:
    command = argv[0] if argv else ""
    if command == "carry":
        # markers already evaluated for the GPU machines' python: dropped, or pip here would evaluate them again for
        # its own python and skip the 3.12-only pins (numpy, networkx, ...)
        print("\n".join(re.sub(r"^[^\\]*", f"{name}=={version} ", line, count=1)
                        for name, version, line in entries(GPU_PYTHON) if not MACHINES_OWN.match(name)))
    elif command == "missing":
        print(" ".join(f"{name}" for name, version, _ in entries()
                       if not MACHINES_OWN.match(name) and not same(installed(name), version)))
    elif command == "need":
        have = set().union(*(wheel_names(Path(d)) for d in argv[1:]))
        lines, missing = [], []
        for name, version, line in entries():
            if same(installed(name), version) or MACHINES_OWN.match(name):
                continue
            (lines if name in have else missing).append(line if name in have else f"{name}=={version}")
        print("\n".join(lines))
        if missing:
            print(f"lockfile: no wheel carried for {', '.join(missing)}", file=sys.stderr)
    elif command == "compare":
        rows = [{"package": name, "lock": version, "installed": installed(name)} for name, version, _ in entries()]
        differ = [r for r in rows if not same(r["installed"], r["lock"])]
        Path(argv[1]).write_text(json.dumps({"equal": len(rows) - len(differ), "pins": len(rows), "differ": differ},
                                            indent=1))
        print(f"lock-check: {len(rows) - len(differ)} of {len(rows)} pins of locks/runner.txt equal"
              + "".join(f"\n  {r['package']}: lock {r['lock']}, installed {r['installed']}" for r in differ))
        return 1 if differ else 0
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
