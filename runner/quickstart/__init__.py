"""The embedded default job: a tiny model and dataset generated or shipped here, run on CPU."""
from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path


def prepare(directory: Path) -> Path:
    """Write the quickstart's base model, data and job file under `directory`; return the job file."""
    from runner.quickstart.tiny import build_tiny_model

    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    pkg = resources.files(__package__)
    data = directory / "capitals.jsonl"
    data.write_text(pkg.joinpath("capitals.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    model_dir = directory / "base-model"
    if not (model_dir / "config.json").exists():
        rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
        texts = [f"Q: What is the capital of {r['country']} ?\nA: {r['capital']}" for r in rows]
        # A wide init lets the frozen output head express confident answers once LoRA has learned them.
        build_tiny_model("llama", model_dir, texts, init_std=0.2)
    job = directory / "job.yaml"
    job.write_text(pkg.joinpath("job.yaml").read_text(encoding="utf-8").replace("@DIR@", str(directory)))
    shutil.rmtree(directory / "output.checkpoints", ignore_errors=True)  # a quickstart always starts fresh
    return job
