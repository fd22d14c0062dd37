"""The run report: RUN/report.md with loss and max-logit curves as PNG files.

Stages add sections (pre-training, SFT, RL, evaluation); each section is markdown text
plus the plots it references, written next to report.md.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def smooth(values: list[float], alpha: float = 0.1) -> list[float]:
    """Bias-corrected exponential moving average."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = (1 - alpha) * avg + alpha * v
        out.append(avg / (1 - (1 - alpha) ** i))
    return out


def largest_rise(values: list[float]) -> float:
    """Largest increase of a curve over its running minimum (0 for a curve that never rises):
    the size of the worst loss spike."""
    rise, low = 0.0, math.inf
    for v in values:
        low = min(low, v)
        rise = max(rise, v - low)
    return rise


def plot_training(records: list[dict[str, Any]], out_dir: Path, prefix: str = "pretrain",
                  tau: float | None = None) -> dict[str, Path]:
    """Loss (raw, smoothed, validation) and max-logit plots; returns their paths."""
    out_dir = Path(out_dir)
    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    paths = {}
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, alpha=0.3, label="train loss")
    ax.plot(steps, smooth(losses), label="train loss (EMA 0.1)")
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    paths["loss"] = _save(fig, ax, "nats / token", out_dir / f"{prefix}_loss.png")
    logits = [(r["step"], r["max_logit"]) for r in records if r.get("max_logit") is not None]
    if logits:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(*zip(*logits), label="max attention logit (before clipping)")
        if tau:
            ax.axhline(tau, color="red", linestyle="--", label=f"τ = {tau:g}")
        paths["max_logit"] = _save(fig, ax, "max logit", out_dir / f"{prefix}_max_logit.png")
    return paths


def _save(fig, ax, ylabel: str, path: Path) -> Path:
    """Label (x: step), grid, legend, write and close a per-step plot."""
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def training_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    losses = [r["loss"] for r in records]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    logits = [r["max_logit"] for r in records if r.get("max_logit") is not None]
    return {
        "steps": records[-1]["step"] if records else 0,
        "tokens": records[-1]["tokens"] if records else 0,
        "final_loss": losses[-1] if losses else None,
        "final_val_loss": val[-1][1] if val else None,
        "val_losses": val,
        "largest_smoothed_rise": largest_rise(smooth(losses)) if losses else None,
        "max_logit": max(logits) if logits else None,
        "clipped_steps": sum(1 for r in records if (r.get("clipped_heads") or 0) > 0),
        "seconds": records[-1].get("time") if records else None,
    }


class Report:
    """Collects sections and writes RUN/report.md."""

    def __init__(self, run_dir: Path, title: str = "openk2 run report"):
        self.run_dir = Path(run_dir)
        self.sections: list[str] = [f"# {title}\n"]

    def add(self, heading: str, body: str) -> None:
        self.sections.append(f"## {heading}\n\n{body.strip()}\n")

    def image(self, path: Path, caption: str) -> str:
        return f"![{caption}]({Path(path).relative_to(self.run_dir).as_posix()})"

    def write(self) -> Path:
        path = self.run_dir / "report.md"
        path.write_text("\n".join(self.sections))
        return path


def table(rows: list[tuple[str, Any]]) -> str:
    lines = ["| | |", "|---|---|"]
    for key, value in rows:
        if isinstance(value, float):
            value = f"{value:.4g}"
        lines.append(f"| {key} | {value} |")
    return "\n".join(lines)
