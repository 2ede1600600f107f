"""What a job writes cannot hang its runner or pass for a retryable failure: a model file that is a device or a
FIFO, and templates whose rendering would take forever or fill the memory. Each ends `validate` and `run` with
exit 2 naming the field, fast, with no traceback - through the real `python -m runner` commands."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import yaml

from runner.api import errors
from tests.conftest import ROOT, job_doc, run_cli

HANG_BOUND_S = 120  # a hang would be killed here; the refusals take a second or two


def _validate(tmp_path, doc) -> tuple[int, str]:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    proc = subprocess.run([sys.executable, "-m", "runner", "validate", str(job)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=HANG_BOUND_S, cwd=tmp_path)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("odd", ["dev-zero", "fifo"])
def test_a_model_file_that_is_dev_zero_or_a_fifo_is_a_permanent_error_naming_the_model(odd, tiny_llama, qa_jsonl,
                                                                                          tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    (model / "tokenizer_config.json").unlink()
    if odd == "dev-zero":
        (model / "tokenizer_config.json").symlink_to("/dev/zero")
    else:
        os.mkfifo(model / "tokenizer_config.json")
    doc = job_doc(model, qa_jsonl, tmp_path / "out")
    code, text = _validate(tmp_path, doc)
    assert code == errors.EXIT_PERMANENT, text
    assert "model.source" in text and "tokenizer_config.json" in text and "Traceback" not in text, text
    assert ("/dev/zero" in text and "character device" in text) if odd == "dev-zero" else "a FIFO" in text

    code, events, stderr, result = run_cli(tmp_path, doc)
    assert code == errors.EXIT_PERMANENT, stderr
    assert result["reason"] == errors.INVALID_SPEC and "model.source" in result["message"], result
    assert "tokenizer_config.json" in result["message"] and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()
