"""`python -m bench.memwatch EVENTS OUT.json`: peak memory per phase of a running `python -m runner run`.

Polls every --interval seconds until the runner's events file holds its result (or --timeout passes): the
phase it is in (the last `phase` event of EVENTS), each runner process's resident memory (VmRSS, and VmHWM,
the kernel's own peak, read at every poll) - the ranks by their RANK variable, the launcher and torchrun by
their command line - and each GPU's used memory (NVML; device i is local rank i, CUDA context included).
Writes per phase the peak of each, and over the whole run each process's VmHWM.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

GiB = 2**30


def _status(pid: str) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(line.split()[1]) * 1024
    return out


def processes() -> dict[str, dict[str, int]]:
    """{'rank0': {...}, 'rank1': ..., 'launcher': ..., 'torchrun': ...} for the runner's processes now."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
            if b"runner" not in cmd and not any(c.endswith(b"torch.distributed.run") for c in cmd):
                continue
            rank = next((e[5:].decode() for e in env if e.startswith(b"RANK=")), None)
            if any(c.endswith(b"torch.distributed.run") for c in cmd):
                name = "torchrun"
            elif rank is not None:
                name = f"rank{rank}"
            elif b"run" in cmd:
                name = "launcher"
            else:
                continue
            found[name] = _status(proc.name)
        except OSError:
            continue
    return found


def gpus() -> list[int]:
    try:
        import pynvml
    except ImportError:
        return []
    pynvml.nvmlInit()
    return [pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).used
            for i in range(pynvml.nvmlDeviceGetCount())]


def phase_of(events: Path) -> tuple[str | None, bool]:
    phase, done = None, False
    if events.exists():
        for line in events.read_text().splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("event") == "phase":
                phase = e["phase"]
            elif e.get("event") == "result":
                done = True
    return phase, done


def watch(events: Path, out: Path, interval: float, timeout: float) -> dict:
    per_phase: dict[str, dict] = {}
    hwm: dict[str, int] = {}
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        phase, done = phase_of(events)
        procs, used = processes(), gpus()
        if phase:
            p = per_phase.setdefault(phase, {"seconds": 0.0, "rssGiB": {}, "gpuUsedGiB": [0.0] * len(used)})
            p["seconds"] += interval
            for name, st in procs.items():
                p["rssGiB"][name] = max(p["rssGiB"].get(name, 0.0), round(st.get("VmRSS", 0) / GiB, 2))
            p["gpuUsedGiB"] = [max(a, round(b / GiB, 2)) for a, b in zip(p["gpuUsedGiB"], used)]
        for name, st in procs.items():
            hwm[name] = max(hwm.get(name, 0), st.get("VmHWM", 0))
        result = {"phases": per_phase, "peakRssGiBPerProcess": {k: round(v / GiB, 2) for k, v in hwm.items()},
                  "intervalSeconds": interval}
        out.write_text(json.dumps(result, indent=1))
        if done:
            break
        time.sleep(interval)
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("events", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--interval", type=float, default=0.5)
    p.add_argument("--timeout", type=float, default=3600)
    a = p.parse_args()
    watch(a.events, a.out, a.interval, a.timeout)


if __name__ == "__main__":
    main()
