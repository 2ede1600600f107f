"""What is published beside the weights: the training report (metrics JSON, loss curve, token-length
histogram, before/after samples), the job spec, and a model card."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from runner import card
from runner.card import METHODS  # noqa: F401 - how the adapter was trained, by quantization.bits
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
    (report_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True, default=str))
    (report_dir / "history.json").write_text(json.dumps(history, indent=2))
    (report_dir / "samples.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False))
    # The spec as run, published with the model (Hub, S3): spec.env entries by name only - a value (an API key
    # set as a plain value, say) or a valueFrom reference never leaves the cluster. Credentials are Secret
    # references (hfTokenSecretRef, s3SecretRef): their names are published, never their contents.
    spec = job.spec.model_dump(by_alias=True, exclude_defaults=True)
    if spec.get("env"):
        spec["env"] = [{"name": e.get("name")} for e in spec["env"] if isinstance(e, dict)]
    (report_dir / "job.yaml").write_text(
        yaml.safe_dump(manifest(job.name, spec), sort_keys=False, allow_unicode=True)
    )
    _plot_loss(history, report_dir / "loss.png")
    _plot_lengths(lengths, job.spec.dataset.max_length, report_dir / "token_lengths.png")


def _plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["evalLoss"]) for h in history if "evalLoss" in h]
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_lengths(lengths: list[int], max_length: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.hist(lengths, bins=min(40, max(5, len(set(lengths)))), color="tab:blue", alpha=0.8)
    ax.axvline(max_length, color="tab:red", linestyle="--", label=f"maxLength {max_length}")
    over = sum(1 for n in lengths if n > max_length)
    ax.set_title(f"Token lengths of {len(lengths)} training examples ({over} truncated)")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def model_card(job: Job, metrics: dict, *, merged: bool, samples: list[dict] | None = None,
               adapter: bool = False) -> str:
    """README.md of the output, or (`adapter`) of its adapter/ folder beside a merged model: runner/card.py."""
    return card.model_card(job, metrics, merged=merged, samples=samples, adapter=adapter)
