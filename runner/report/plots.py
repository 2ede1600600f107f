"""The report's figures: loss.png (train loss raw and smoothed, eval loss, learning rate) and token_lengths.png."""
from __future__ import annotations

import math
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """Exponential moving average, debiased as TensorBoard's (the first points are not pulled towards 0). The
    weight grows with the number of points: 0 below 10 points (nothing to smooth), up to 0.85 at 67 and more."""
    if weight is None:
        weight = 0.0 if len(values) < 10 else min(0.85, 1 - 10 / len(values))
    out, last, norm = [], 0.0, 0.0
    for v in values:
        last = weight * last + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(last / norm if norm else v)
    return out


def log_scale(values: list[float]) -> bool:
    """A log y axis when the losses span more than a factor of 10 (a long run's tail is then still readable)."""
    pos = [v for v in values if v > 0 and math.isfinite(v)]
    return len(pos) == len(values) and len(pos) > 1 and max(pos) / min(pos) > 10


def loss_plot(history: list[dict], path: Path, published: dict | None = None) -> None:
    plt = _pyplot()
    train = [(h["step"], h["loss"]) for h in history if isinstance(h.get("loss"), (int, float))]
    evals = [(h["step"], h["evalLoss"]) for h in history if isinstance(h.get("evalLoss"), (int, float))]
    rates = [(h["step"], h["learningRate"]) for h in history if isinstance(h.get("learningRate"), (int, float))]
    fig, (ax, lr_ax) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    if train:
        steps, losses = zip(*train)
        smoothed = smooth(list(losses))
        if smoothed != list(losses):
            ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=1, label="train loss (logged)")
            ax.plot(steps, smoothed, color="tab:blue", linewidth=2, label="train loss (smoothed)")
        else:
            ax.plot(steps, losses, color="tab:blue", linewidth=2, label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", color="tab:orange", linewidth=2, markersize=4, label="eval loss")
    if published and published.get("choice") == "best" and isinstance(published.get("step"), int):
        ax.axvline(published["step"], color="tab:green", linestyle="--", linewidth=1.5,
                   label=f"published: step {published['step']} (best eval loss)")
    losses_all = [v for _, v in train] + [v for _, v in evals]
    if log_scale(losses_all):
        from matplotlib import ticker

        ax.set_yscale("log")
        ax.set_ylabel("loss (log scale)")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}".lstrip("0.")[:1] in "25"
                                                          else ""))
    else:
        ax.set_ylabel("loss")
    last = f"final train loss {train[-1][1]:.4g}" if train else ""
    if evals:
        last += (" · " if last else "") + f"final eval loss {evals[-1][1]:.4g}"
    ax.set_title("Loss" + (f"  ({last})" if last else ""))
    ax.grid(alpha=0.3, which="both")
    if train or evals:
        ax.legend(loc="upper right")
    if rates:
        lr_ax.plot(*zip(*rates), color="tab:purple", linewidth=1.5)
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("optimizer step")
    lr_ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def lengths_plot(lengths: list[int], max_length: int, path: Path) -> None:
    plt = _pyplot()
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
