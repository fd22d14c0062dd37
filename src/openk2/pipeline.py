"""`openk2 speedrun`: every stage on the embedded defaults, one run folder, one report.

Stages so far: tokenizer -> pre-training -> report. Each stage is also its own command;
this module only chains them and writes RUN/report.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from openk2.eval.report import Report, plot_training, table, training_summary
from openk2.train.metrics import read_metrics
from openk2.train.pretrain import pretrain


def speedrun(recipe: dict, run_dir: str | Path, resume: bool = False, log: Callable[[str], None] = print) -> Path:
    run_dir = Path(run_dir)
    pre_dir = run_dir / "pretrain"
    log("[bold]stage 1-2: tokenizer and pre-training[/]")
    summary = pretrain(recipe, pre_dir, resume=resume, log=log)
    report = Report(run_dir, "openk2 speedrun")
    records = [r for r in read_metrics(pre_dir / "metrics.jsonl")]
    plots = plot_training(records, run_dir, "pretrain", tau=recipe["optim"]["qk_clip_tau"] or None)
    stats = training_summary(records)
    rows = [
        ("steps", stats["steps"]),
        ("tokens", f"{stats['tokens']:,}"),
        ("final train loss (nats/token)", stats["final_loss"]),
        ("final validation loss (nats/token)", summary["val_loss"]),
        ("validation bits per byte", summary["val_bits_per_byte"]),
        ("unigram baseline (nats/token)", summary["unigram_val_loss"]),
        ("unigram baseline (bits per byte)", summary["unigram_bits_per_byte"]),
        ("largest rise of the smoothed training loss", stats["largest_smoothed_rise"]),
        ("max attention logit", stats["max_logit"]),
        ("steps with QK-Clip active", stats["clipped_steps"]),
        ("training time (s)", stats["seconds"]),
    ]
    val_lines = "\n".join(f"- step {step}: {loss:.4f}" for step, loss in stats["val_losses"])
    body = table(rows) + "\n\nValidation loss at each eval point:\n\n" + val_lines + "\n\n"
    body += "\n\n".join(report.image(path, name) for name, path in plots.items())
    report.add("Pre-training", body)
    (run_dir / "speedrun.json").write_text(json.dumps({"pretrain": summary}, indent=2) + "\n")
    return report.write()
