"""The loss curve of a run (run_dir/loss_curve.png), with the in-training eval scores."""

from __future__ import annotations

import os
from pathlib import Path


def plot_loss_curve(log_history: list[dict], path: str | os.PathLike) -> Path | None:
    """Training loss per logged step as a PNG (matplotlib Agg; log scale while every loss is positive), the
    held-out ``eval_score`` of the in-training eval marked on a second axis; None when nothing was logged."""
    points = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_score"]) for h in log_history if "eval_score" in h and "step" in h]
    if not points and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if points:
        ax.plot(*zip(*points), marker=".")
        if min(loss for _, loss in points) > 0:
            ax.set_yscale("log")  # the tail, where the loss is near zero, stays readable
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (log scale)" if ax.get_yscale() == "log" else "training loss")
    ax.grid(alpha=0.3)
    if evals:
        scores = ax.twinx()
        scores.plot(*zip(*evals), marker="s", linestyle="--", color="tab:orange")
        for step, value in evals:
            scores.annotate(
                f"{value:.3g}", (step, value), textcoords="offset points", xytext=(0, 6), ha="center"
            )
        scores.set_ylabel("held-out eval score", color="tab:orange")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
