"""`python -m bench data`: corpora of any size through the quickstart's tiny model, on CPU.

For each size (default 100k, 1M and 5M rows of ~500 bytes, instruction format) it writes the corpus as JSON
lines, then runs, each as its own process, and measures wall time, peak memory (the sum of the resident memory of
the process and its children: their proportional set size, polled every 0.1 s) and the work folder's disk:

    validate        `runner validate JOB`
    preview         `runner preview JOB` (a sample of the rows)
    tokenize        every row tokenized into the work folder (what a job without maxSteps does before training)
    run             `runner run JOB` with maxSteps 3 (first attempt: tokenizes only the rows 3 steps use)
    run-resumed     the same job again on a fresh work folder (another node) after its output was removed:
                    the tokenized data comes from output.checkpoints and 0 rows are tokenized

    compare         the first 200k rows tokenized by the code before this design (BASELINE: one process, Python
                    lists) and by this tree's, each in a fresh process: rows/s and the speed-up

and writes bench/results/cpu-data.json (with the commit). bench/README.md "Corpora of any size" has the method.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the model reads a question and answers it with care while the data grows large enough that memory "
         "and time both matter for every step of training on a cluster of nodes with disks and caches").split()


def corpus(path: Path, rows: int, *, seed: int = 0) -> Path:
    """`rows` instruction rows of ~500 bytes as JSON lines (a pool of distinct rows, each line numbered)."""
    if path.exists() and path.stat().st_size > rows * 400:
        return path
    rng = random.Random(seed)
    pool = []
    for _ in range(4099):
        pool.append(json.dumps({"instruction": " ".join(rng.choices(WORDS, k=rng.randint(10, 20))),
                                "input": " ".join(rng.choices(WORDS, k=rng.randint(10, 30))),
                                "output": " ".join(rng.choices(WORDS, k=rng.randint(40, 70)))})[1:])
    part = path.with_name(path.name + ".partial")
    with open(part, "w") as f:
        buf = []
        for i in range(rows):
            buf.append(f'{{"id": {i}, {pool[i % len(pool)]}\n')
            if len(buf) == 10000:
                f.write("".join(buf))
                buf = []
        f.write("".join(buf))
    os.replace(part, path)
    return path


class Peak:
    """Polls the memory of a process and its descendants (proportional set size: what they hold together, shared
    pages once); keeps the largest sum seen."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.pid, self.interval, self.peak, self._stop = pid, interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(proc.name))
        out, todo = [], [self.pid]
        while todo:
            p = todo.pop()
            out.append(p)
            todo += children.get(p, [])
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for p in self._tree():
                try:  # Pss: shared pages (a forked worker's copy of its parent) counted once, as the cgroup does
                    for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                        if line.startswith("Pss:"):
                            total += int(line.split()[1]) * 1024
                except OSError:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def measure(argv: list[str], *, log: Path, env: dict | None = None) -> dict:
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
        peak = Peak(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    tree = peak.stop()
    return {"exit": proc.returncode, "wall_s": round(time.monotonic() - started, 2),
            "peak_rss_mb": round(max(tree, usage.ru_maxrss * 1024) / 2**20),
            "main_process_peak_rss_mb": round(usage.ru_maxrss / 1024)}


def disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) if path.exists() else 0


TOKENIZE = """
import json, sys, time
from pathlib import Path
from runner.api.parse import load_job
from runner.model import load as model_load
from runner.train import tokens
job = load_job(sys.argv[1]); work = Path(sys.argv[2])
tok = model_load.load_tokenizer(Path(job.places.model.path), job.spec.model)
t = time.monotonic()
data = tokens.tokenized_data(job, Path(job.places.data.path), None, Path(job.places.model.path), tok, work, print)
print(json.dumps({"rows": data.tokenized, "seconds": time.monotonic() - t}))
"""


STEPS = ("validate", "preview", "tokenize", "run", "compare")
BASELINE = "6a911c4"  # the runner before tokenizing into Arrow files in parallel: one process, Python lists
COMPARE = """
import importlib.util, json, shutil, sys, time
from pathlib import Path
from runner.api.spec import DatasetSpec, ModelSpec
from runner.data import dataset
from runner.model import load as model_load
module, corpus, rows, model, work = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5])
shutil.rmtree(work, ignore_errors=True)
tok = model_load.load_tokenizer(model, ModelSpec(source=str(model)))
spec = DatasetSpec(source=corpus, max_length=512, packing=True)
data = dataset.load_rows(Path(corpus), split=f"train[:{rows}]", cache_dir=work / "rows")
if module == "this":
    t = time.monotonic()
    dataset.prepare(spec, data, None, tok, seed=0, into=(work / "out"))
else:
    spec_ = importlib.util.spec_from_file_location("baseline_dataset", module)
    old = sys.modules["baseline_dataset"] = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(old)
    t = time.monotonic()
    old.prepare(spec, data, None, tok, seed=0)
print(json.dumps({"rows": rows, "seconds": time.monotonic() - t}))
"""


def one_size(rows: int, base: Path, model: Path, steps: tuple[str, ...] = STEPS) -> dict:
    here = base / f"rows-{rows}"
    here.mkdir(parents=True, exist_ok=True)
    data = corpus(base / f"corpus-{rows}.jsonl", rows)
    doc = yaml.safe_load((ROOT / "runner/quickstart/job.yaml").read_text().replace("@DIR@", str(base / "qs")))
    spec = doc["spec"]
    spec["dataset"] = {"source": str(data), "maxLength": 512, "packing": True}
    spec["training"].update({"maxSteps": 3, "saveSteps": 3, "loggingSteps": 1, "batchSize": 4})
    spec["training"].pop("epochs", None)
    spec["output"] = {"destination": str(here / "output"), "checkpoints": str(here / "checkpoints")}
    spec.pop("evalPrompts", None)
    job = here / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    py = [sys.executable, "-m", "runner"]
    for d in ("output", "checkpoints", "w-run", "w-resume", "w-tok", "w-preview"):
        shutil.rmtree(here / d, ignore_errors=True)
    out: dict = {"rows": rows, "corpus_mb": round(data.stat().st_size / 2**20)}
    if "validate" in steps:
        out["validate"] = measure(py + ["validate", str(job)], log=here / "validate.log")
    if "preview" in steps:
        out["preview"] = measure(py + ["preview", str(job), "--color", "never", "--work-dir", str(here / "w-preview")],
                                 log=here / "preview.log")
    if "tokenize" in steps:
        out["tokenize"] = _tokenize_every_row(here, job)
    if "run" in steps:
        out.update(_run_twice(here, job, py))
    if "compare" in steps:
        out["compare"] = _compare(here, data, model, min(rows, 200_000))
    return out


def _compare(here: Path, data: Path, model: Path, rows: int) -> dict:
    """The first `rows` rows tokenized by the baseline's code and by this tree's, each in a fresh process with
    its own caches (the rows' Arrow conversion is not timed): rows/s of each, and the speed-up."""
    old = here / "baseline_dataset.py"
    old.write_text(subprocess.run(["git", "show", f"{BASELINE}:runner/data/dataset.py"], cwd=ROOT, check=True,
                                  capture_output=True, text=True).stdout)
    out: dict = {"rows": rows, "baseline": BASELINE}
    for name, module in (("baseline", str(old)), ("this", "this")):
        r = measure([sys.executable, "-c", COMPARE, module, str(data), str(rows), str(model), str(here / "w-cmp")],
                    log=here / f"compare-{name}.log")
        got = json.loads((here / f"compare-{name}.log").read_text().strip().splitlines()[-1])
        out[name] = {**r, "rows_per_s": round(rows / got["seconds"])}
        shutil.rmtree(here / "w-cmp", ignore_errors=True)
    out["speedup"] = round(out["this"]["rows_per_s"] / out["baseline"]["rows_per_s"], 2)
    return out


def _tokenize_every_row(here: Path, job: Path) -> dict:
    tok = here / "job-all-rows.yaml"
    every = yaml.safe_load(job.read_text())
    every["spec"]["training"].pop("maxSteps")
    every["spec"]["training"]["epochs"] = 1
    every["spec"]["output"]["checkpoints"] = str(here / "checkpoints-tok")
    tok.write_text(yaml.safe_dump(every))
    shutil.rmtree(here / "checkpoints-tok", ignore_errors=True)
    out = measure([sys.executable, "-c", TOKENIZE, str(tok), str(here / "w-tok")], log=here / "tok.log")
    result = json.loads((here / "tok.log").read_text().strip().splitlines()[-1])
    out.update(rows_tokenized=result["rows"], rows_per_s=round(result["rows"] / result["seconds"]),
               disk_mb=round(disk(here / "w-tok") / 2**20))
    shutil.rmtree(here / "w-tok", ignore_errors=True)
    shutil.rmtree(here / "checkpoints-tok", ignore_errors=True)
    return out


def _run_twice(here: Path, job: Path, py: list[str]) -> dict:
    out: dict = {}
    events = here / "run-events.jsonl"
    out["run"] = measure(py + ["run", str(job), "--work-dir", str(here / "w-run")], log=events)
    out["run"]["disk_mb"] = round(disk(here / "w-run") / 2**20)
    out["run"]["log"] = _lines(events, ("tokenized", "maxSteps"))
    shutil.rmtree(here / "output")  # the bench's own output: the next attempt publishes again
    resumed = here / "resume-events.jsonl"
    out["run_resumed"] = measure(py + ["run", str(job), "--work-dir", str(here / "w-resume")], log=resumed)
    out["run_resumed"]["disk_mb"] = round(disk(here / "w-resume") / 2**20)
    out["run_resumed"]["log"] = _lines(resumed, ("tokenized",))
    for d in ("w-run", "w-resume", "w-preview"):
        shutil.rmtree(here / d, ignore_errors=True)
    return out


def _lines(path: Path, words: tuple[str, ...]) -> list[str]:
    return [ln.strip()[:300] for ln in path.read_text(errors="replace").splitlines()
            if ln.startswith("[runner]") and any(w in ln for w in words)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench data", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="100000,1000000,5000000", help="comma list of corpus sizes")
    p.add_argument("--work-dir", default="/tmp/finetune-bench-data")
    p.add_argument("--out", default=str(ROOT / "bench/results/cpu-data.json"))
    p.add_argument("--steps", default=",".join(STEPS), help="comma list of: " + ", ".join(STEPS))
    args = p.parse_args(argv)
    base = Path(args.work_dir)
    base.mkdir(parents=True, exist_ok=True)
    from runner.quickstart import prepare

    prepare(base / "qs")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    found = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    found.update(commit=commit, cpus=os.cpu_count(), machine=os.uname().machine)
    sizes = found.setdefault("sizes", {})
    for rows in (int(x) for x in args.rows.split(",") if x):
        result = one_size(rows, base, base / "qs" / "base-model", tuple(args.steps.split(",")))
        for step in set(result) - {"rows", "corpus_mb"}:
            result[step]["commit"] = commit
        sizes[str(rows)] = {**sizes.get(str(rows), {}), **result}
        Path(args.out).write_text(json.dumps(found, indent=1) + "\n")
        print(table(found))
    return 0


def table(found: dict) -> str:
    head = ("| rows | corpus | validate | preview | tokenize every row | `run` maxSteps 3 | resumed `run` |\n"
            "|---|---|---|---|---|---|---|")
    lines = [head]
    for rows, r in sorted(found["sizes"].items(), key=lambda kv: int(kv[0])):
        def cell(k):
            return f"{r[k]['wall_s']:.0f} s / {r[k]['peak_rss_mb']} MB" if k in r else "-"
        t = r.get("tokenize")
        tok = (f"{t['wall_s']:.0f} s / {t['peak_rss_mb']} MB, {t['rows_per_s']:,} rows/s, {t['disk_mb']} MB" if t
               else "-")
        lines.append(f"| {int(rows):,} | {r['corpus_mb']} MB | {cell('validate')} | {cell('preview')} | {tok} | "
                     f"{cell('run')} | {cell('run_resumed')} |")
    return "\n".join(lines)
