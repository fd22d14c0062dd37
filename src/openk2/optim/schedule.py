"""Learning-rate schedules as pure functions of the step (K2_SPEC §3).

K2 pre-training uses warm-up-stable-decay (WSD): 500 warm-up steps, a constant 2e-4 for
10T tokens, then cosine to 2e-5 over the last 5.5T (decay_fraction ≈ 0.35, final ratio 0.1).

Conventions, shared by all schedules (step counts from 0; `total` is the number of steps):
- warm-up: lr(s) = peak * (s + 1) / warmup for s < warmup, so the first step already moves
  and step warmup - 1 runs at the peak;
- decay: runs from the peak at step total - decay_steps to peak * final_ratio at step total
  (the value after the last update); steps past total stay at the final value.
"""

from __future__ import annotations

import math


def _decay_shape(progress: float, decay: str) -> float:
    """1 -> 0 as progress goes 0 -> 1."""
    progress = min(max(progress, 0.0), 1.0)
    if decay == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if decay == "linear":
        return 1.0 - progress
    raise ValueError(f"decay={decay!r}: use 'cosine' or 'linear'")


def _warmup(step: int, warmup: int) -> float:
    return (step + 1) / warmup if step < warmup else 1.0


def wsd_lr(step: int, total: int, peak: float, warmup: int = 0, decay_fraction: float = 0.35,
           decay: str = "cosine", final_ratio: float = 0.1) -> float:
    """Warm-up, stable at `peak`, then decay over the last decay_fraction of the steps."""
    if total <= 0:
        raise ValueError(f"total steps must be positive, got {total}")
    decay_steps = round(decay_fraction * total)
    decay_start = total - decay_steps
    if step < warmup:
        return peak * _warmup(step, warmup)
    if decay_steps <= 0 or step < decay_start:
        return peak
    shape = _decay_shape((step - decay_start) / decay_steps, decay)
    return peak * (final_ratio + (1.0 - final_ratio) * shape)


def cosine_lr(step: int, total: int, peak: float, warmup: int = 0, final_ratio: float = 0.1) -> float:
    """Warm-up, then cosine from `peak` (at step warmup) to peak * final_ratio (at step total)."""
    if total <= 0:
        raise ValueError(f"total steps must be positive, got {total}")
    if step < warmup:
        return peak * _warmup(step, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (final_ratio + (1.0 - final_ratio) * _decay_shape(progress, "cosine"))


def lr_at(config, step: int, total_steps: int) -> float:
    """The learning rate of `config` (an OptimConfig) at `step` of a `total_steps` run."""
    c = config
    if c.schedule == "wsd":
        return wsd_lr(step, total_steps, c.lr, c.warmup_steps, c.decay_fraction, c.decay, c.final_lr_ratio)
    if c.schedule == "cosine":
        return cosine_lr(step, total_steps, c.lr, c.warmup_steps, c.final_lr_ratio)
    if c.schedule == "constant":
        return c.lr * _warmup(step, c.warmup_steps)
    raise ValueError(f"schedule={c.schedule!r}: use 'wsd', 'cosine' or 'constant'")
