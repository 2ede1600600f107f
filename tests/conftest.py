"""Shared fixtures: tiny real models (Llama, GPT-NeoX, OPT) built once per session, job helpers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from runner.api.parse import manifest

ROOT = Path(__file__).resolve().parents[1]  # the repository

# Hub access stays on (HF_HUB_OFFLINE=0): the Hub tests talk to a Hub server of their own on loopback
# (tests/runner/store/hub_server.py), and no test names a repository of the real Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "0")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["tests.runner.store.fixtures", "tests.runner.store.gcs_server", "tests.cluster.conftest_plugin"]

ARCHS = ("llama", "gpt_neox", "opt")

QA_ROWS = [
    {"question": f"What is {a} plus {b} ?", "answer": str(a + b), "topic": "math"}
    for a in range(1, 9)
    for b in range(1, 5)
]


def corpus() -> list[str]:
    """Every word the test data uses, so the tiny word-level tokenizers know them all."""
    words = [f"{r['question']} {r['answer']}" for r in QA_ROWS]
    words += [str(i) for i in range(0, 100)]
    words += [
        "Q: A: ### Instruction: Input: Response: Question: Answer: system user assistant hello hi there "
        "note quote sol1 sol2 goal The following is a note by Eevee the Dog : 명령어: 맥락: 답변: 당신은 게이머입니다 "
        "what how why is are a an of to and in it you me I we yes no good bad sky blue red green sum",
    ]
    return words


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from runner.quickstart.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny_model(arch, root / arch, corpus()) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def qa_jsonl(tmp_path) -> Path:
    return write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)


def job_doc(model: Path | str, data: Path | str, out: Path | str, **overrides) -> dict:
    """A small, fast FineTuneJob manifest; `overrides` are merged section by section."""
    spec = {
        "model": {"source": str(model)},
        "dataset": {
            "source": str(data),
            "template": {"prompt": "Q: {question}\nA:", "completion": " {answer}"},
            "maxLength": 32,
        },
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "training": {"maxSteps": 6, "batchSize": 2, "learningRate": 0.003, "loggingSteps": 2,
                     "saveSteps": 3, "gradientCheckpointing": False},
        "output": {"destination": str(out)},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return manifest("test-job", spec)


def run_cli(tmp_path: Path, doc: dict, *, env: dict | None = None, args: tuple = ()) -> tuple[int, list[dict], str, dict | None]:
    """`python -m runner run` on `doc` in a subprocess: (exit code, JSON events, stderr, termination result)."""
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc, allow_unicode=True))
    term = tmp_path / "termination-log"
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "runner", "run", str(job), "--termination-log", str(term), *args],
        capture_output=True, text=True, env=full_env, timeout=600, cwd=tmp_path,
    )
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    result = json.loads(term.read_text()) if term.exists() else None
    return proc.returncode, events, proc.stderr, result
