"""`openk2 speedrun`: every stage on the embedded defaults, one run folder, one report.

Stages so far: tokenizer -> pre-training -> report. Each stage is also its own command;
this module only chains them and writes RUN/report.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from openk2.data.tokenizer import K2Tokenizer
from openk2.eval.report import Report, plot_training, table, training_summary
from openk2.infer.engine import Engine, SamplingParams
from openk2.model import load_model
from openk2.train.metrics import read_metrics
from openk2.train.pretrain import pretrain

SAMPLE_PROMPTS = ["ROMEO:", "KING HENRY:\nWhat news", "Question: What is 17 + 25?\nAnswer:", "To be, or not"]


def samples(model_dir: Path, prompts: list[str] = SAMPLE_PROMPTS, max_tokens: int = 60,
            seed: int = 0) -> list[str]:
    """Continuations of `prompts` by the model in `model_dir` (temperature 0.8)."""
    tokenizer = K2Tokenizer.load(model_dir)
    engine = Engine(load_model(model_dir), tokenizer)
    ids = [[tokenizer.bos_id, *tokenizer.encode(p)] for p in prompts]
    outputs = engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0.8,
                                                  top_p=0.95, seed=seed))
    return [p + out.text for p, out in zip(prompts, outputs)]


def speedrun(recipe: dict, run_dir: str | Path, resume: bool = False,
             log: Callable[[str], None] = print) -> Path:
    run_dir = Path(run_dir)
    pre_dir = run_dir / "pretrain"
    log("stage 1-2: tokenizer and pre-training")
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
    texts = samples(pre_dir / "final")
    body += "\n\nSamples (temperature 0.8):\n\n" + "\n\n".join(f"```\n{t}\n```" for t in texts)
    for text in texts:
        log(f"sample: {text!r}")
    report.add("Pre-training", body)
    (run_dir / "speedrun.json").write_text(json.dumps({"pretrain": summary}, indent=2) + "\n")
    return report.write()
