"""What is published beside the weights: the training report (metrics.json: runner/report/metrics_file.py; the
loss curve, token-length histogram, before/after samples), the job spec, and a model card."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from runner.report import card
from runner.report import metrics_file
from runner.report import plots
from runner.report.card import METHODS  # noqa: F401 - how the adapter was trained, by quantization.bits
from runner.api.parse import manifest
from runner.api.spec import Job


def write_report(
    report_dir: Path,
    *,
    job: Job,
    metrics: dict,
    history: list[dict],
    lengths: list[int],
    samples: list[dict],
) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    metrics_file.write(report_dir, metrics)
    (report_dir / "history.json").write_text(json.dumps(history, indent=2))
    (report_dir / "samples.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False))
    # The spec as run, every default filled in, published with the model (Hub, S3): spec.env entries by name only -
    # a value (an API key set as a plain value, say) or a valueFrom reference never leaves the cluster. Credentials
    # are Secret references (hfTokenSecretRef, s3SecretRef, gcsSecretRef): their names are published, never their
    # contents.
    spec = job.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    if spec.get("env"):
        spec["env"] = [{"name": e.get("name")} for e in spec["env"] if isinstance(e, dict)]
    (report_dir / "job.yaml").write_text(
        yaml.safe_dump(manifest(job.name, spec), sort_keys=False, allow_unicode=True)
    )
    plots.loss_plot(history, report_dir / "loss.png", published=metrics.get("published"))
    plots.lengths_plot(lengths, job.spec.dataset.max_length, report_dir / "token_lengths.png")


def model_card(job: Job, metrics: dict, *, merged: bool, samples: list[dict] | None = None,
               adapter: bool = False) -> str:
    """README.md of the output, or (`adapter`) of its adapter/ folder beside a merged model: runner/report/card.py."""
    return card.model_card(job, metrics, merged=merged, samples=samples, adapter=adapter)
