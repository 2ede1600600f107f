"""The README's first command: the embedded default job, end to end, as a new user runs it."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_trains_merges_and_answers_better(tmp_path):
    from transformers import AutoModelForCausalLM

    proc = subprocess.run([sys.executable, "-m", "runner", "quickstart", "--dir", str(tmp_path / "qs")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = [json.loads(line) for line in proc.stdout.splitlines()][-1]
    assert result["phase"] == "Succeeded"
    out = tmp_path / "qs" / "output"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "llama" and str(model.dtype) == "torch.float16"

    capitals = {json.loads(l)["country"]: json.loads(l)["capital"]
                for l in (tmp_path / "qs" / "capitals.jsonl").read_text().splitlines()}
    samples = json.loads((out / "report" / "samples.json").read_text())
    def right(answer_key: str) -> int:
        return sum(s[answer_key].split()[:1] == [capitals[re.search(r"capital of (\S+)", s["prompt"])[1]]]
                   for s in samples)

    right_before, right_after = right("before"), right("after")
    assert right_after >= 2 and right_after > right_before, samples
    history = json.loads((out / "report" / "history.json").read_text())
    assert history[-1]["loss"] < history[0]["loss"] / 3
