"""Helpers shared by the experiment scripts: run a pre-training recipe with overrides, read curves."""

from __future__ import annotations

import json
from pathlib import Path

from openk2.recipe import load_recipe
from openk2.train.metrics import read_metrics
from openk2.train.pretrain import pretrain


def run(out: Path, recipe: str, overrides: list[str], on_step=None) -> list[dict]:
    """Pre-train into `out` and return its metrics: a finished run there is reused, an
    interrupted one resumed from its newest checkpoint (delete `out` to start over).
    `on_step(model, micro_batches, record)` runs after every optimizer step (see trainer.train)."""
    out = Path(out)
    if not (out / "summary.json").is_file():
        config = load_recipe(recipe, overrides)
        pretrain(config, out, resume=True, log=lambda message: None, show_progress=False, on_step=on_step)
    return read_metrics(out / "metrics.jsonl")


def val_curve(records: list[dict]) -> list[tuple[int, float]]:
    """(tokens, val_loss) points."""
    return [(r["tokens"], r["val_loss"]) for r in records if r.get("val_loss") is not None]


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """Tokens at which a validation curve first reaches `target`, interpolated linearly."""
    previous = None
    for tokens, loss in curve:
        if loss <= target:
            if previous is None:
                return float(tokens)
            t0, l0 = previous
            return t0 + (tokens - t0) * (l0 - target) / (l0 - loss)
        previous = (tokens, loss)
    return None


def dump(path: Path, data) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
