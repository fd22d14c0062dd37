"""The training loop shared by pre-training and SFT (K2_SPEC §3, §4).

One optimizer step = `batch_size / micro_batch_size` micro-batches of next-token loss
(masked to the assistant's tokens for SFT), then MuonClip's step (Muon + AdamW, QK-Clip,
router-bias update). Every step appends a line to RUN/metrics.jsonl; every
`checkpoint_every` steps an atomic checkpoint lands in RUN/checkpoints/; `resume=True`
continues from the newest checkpoint that verifies, bit for bit on CPU.

Distributed (`mesh`, see train/distributed.py): every rank runs this loop on its own share of
each step's batch; losses are normalised by the global target count, logged values are summed
over ranks, and rank 0 alone writes metrics.jsonl and shows progress.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from openk2.config import ConfigError
from openk2.model import K2ForCausalLM
from openk2.model.linear import warn_if_slow_bf16
from openk2.optim import build_optimizer, lr_at, OptimConfig
from openk2.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from openk2.train.distributed import Mesh, clip_grad_norm_
from openk2.train.loss import IGNORE, linear_cross_entropy
from openk2.train.metrics import MetricsLog, progress_bar


class BatchSource(Protocol):
    """Yields micro-batches: tokens [B, L+1] and an optional loss mask [B, L+1] (True where the
    token is a target the loss counts); resumable through state_dict/load_state_dict."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainSettings:
    steps: int
    batch_size: int
    micro_batch_size: int
    seq_len: int
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    eval_every: int = 100
    eval_batches: int = 8
    max_grad_norm: float = 0.0
    device: str = "cpu"
    dtype: str = "float32"  # "bfloat16": forward under autocast (weights and optimizer stay float32)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"train.dtype={self.dtype!r}: use float32 or bfloat16")
        if self.dtype == "bfloat16" and torch.device(self.device).type == "cpu":
            warn_if_slow_bf16("train.dtype='bfloat16'")

    def autocast(self):
        """The forward's precision context: bf16 autocast, or nothing for float32."""
        device_type = torch.device(self.device).type
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.dtype == "bfloat16")

    @classmethod
    def from_recipe(cls, train: dict[str, Any]) -> "TrainSettings":
        return cls(**{k: train[k] for k in cls.__dataclass_fields__ if k in train})

    @property
    def accumulation(self) -> int:
        return self.batch_size // self.micro_batch_size


def next_token_loss(model: K2ForCausalLM, tokens: torch.Tensor,
                    mask: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of predicting tokens[:, 1:] (where mask[:, 1:]) and the target count."""
    targets = tokens[:, 1:]
    if mask is not None:
        targets = targets.masked_fill(~mask[:, 1:], IGNORE)
    count = int((targets != IGNORE).sum()) if mask is not None else targets.numel()
    if hasattr(model, "fused_loss"):  # FSDP: the sharded head is gathered inside it (distributed.py)
        return model.fused_loss(tokens[:, :-1], targets), count
    hidden = model.model(tokens[:, :-1])
    return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight,
                                targets.reshape(-1)), count


@torch.no_grad()
def evaluate(model: K2ForCausalLM, batches: list[tuple[torch.Tensor, torch.Tensor | None]], device: str,
             autocast=contextlib.nullcontext) -> float:
    """Mean next-token loss (nats/token) over fixed validation micro-batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for tokens, mask in batches:
        with autocast():
            loss, n = next_token_loss(model, tokens.to(device), None if mask is None else mask.to(device))
        total += loss.item()
        count += n
    model.reset_stats()
    model.train(was_training)
    return total / max(count, 1)


def train(
    run_dir: Path,
    model: K2ForCausalLM,
    optim_config: OptimConfig,
    settings: TrainSettings,
    batches: BatchSource,
    val_batches: list[tuple[torch.Tensor, torch.Tensor | None]],
    resume: bool = False,
    log: Callable[[str], None] = print,
    on_final: Callable[[K2ForCausalLM], None] | None = None,
    show_progress: bool = True,
    mesh: Mesh | None = None,
    on_step: Callable[[K2ForCausalLM, list, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the loop; returns a summary (final step, last loss, last val_loss, tokens, seconds).
    `settings.batch_size` is global: with a mesh, each rank draws its accumulation // world
    micro-batches per step. `on_step(model, micro_batches, record)`, if given, runs after every
    optimizer step, before evaluation, and may add entries to the step's metrics record (used
    by experiments that measure the model between steps)."""
    run_dir = Path(run_dir)
    world = mesh.world_size if mesh is not None else 1
    rank0 = mesh is None or mesh.rank == 0
    device = settings.device
    optimizer = build_optimizer(model, optim_config)
    start_step, tokens_seen = 0, 0
    resume_from = latest_checkpoint(run_dir, warn=log) if resume else None
    if resume and resume_from is None:
        log(f"no usable checkpoint under {run_dir}/checkpoints; starting from step 0")
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer)
        batches.load_state_dict(state["data"])
        start_step, tokens_seen = state["step"], state["tokens"]
        log(f"resumed from {resume_from} (step {start_step})")
    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=start_step if resume_from else None,
                         enabled=rank0)
    stream = iter(batches)
    summary: dict[str, Any] = {"step": start_step, "loss": None, "val_loss": None, "tokens": tokens_seen}
    started = time.perf_counter()
    model.train()
    with progress_bar(disable=not show_progress or not rank0) as progress:
        task = progress.add_task("train", total=settings.steps, completed=start_step, status="")
        for step in range(start_step + 1, settings.steps + 1):
            step_start = time.perf_counter()
            lr = lr_at(optim_config, step - 1, settings.steps)
            optimizer.set_lr(lr)
            micro = [next(stream) for _ in range(settings.accumulation // world)]
            step_targets = sum(_target_count(tokens, mask) for tokens, mask in micro)
            if mesh is not None:
                step_targets = int(mesh.all_reduce_sum([step_targets])[0])
            model.reset_stats()
            total_loss = 0.0
            for tokens, mask in micro:
                tokens = tokens.to(device)
                mask = None if mask is None else mask.to(device)
                with settings.autocast():
                    loss, _ = next_token_loss(model, tokens, mask)
                objective = loss / step_targets
                aux = model.aux_loss()
                if aux is not None:
                    objective = objective + aux / settings.accumulation
                objective.backward()
                total_loss += loss.item()
            if mesh is not None:
                total_loss = mesh.all_reduce_sum([total_loss])[0]
            grad_norm = None
            if settings.max_grad_norm > 0 and mesh is not None:
                grad_norm = clip_grad_norm_(model, settings.max_grad_norm)
            elif settings.max_grad_norm > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm))
            stats = optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens_seen += world * sum(t.shape[0] * (t.shape[1] - 1) for t, _ in micro)
            elapsed = time.perf_counter() - step_start
            record: dict[str, Any] = {
                "step": step,
                "loss": total_loss / step_targets,
                "lr": lr,
                "tokens": tokens_seen,
                "tokens_per_s": settings.batch_size * settings.seq_len / elapsed,
                "max_logit": stats.get("max_logit"),
                "clipped_heads": stats.get("clipped_heads"),
                "expert_imbalance": stats.get("expert_imbalance"),
                "skipped": bool(stats.get("skipped", False)),
                "time": time.perf_counter() - started,
            }
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            if on_step is not None:
                on_step(model, micro, record)
            if (settings.eval_every and (step % settings.eval_every == 0 or step == settings.steps)
                    and val_batches):
                record["val_loss"] = evaluate(model, val_batches, device, settings.autocast)
                summary["val_loss"] = record["val_loss"]
            metrics.write(record)
            summary.update(step=step, loss=record["loss"], tokens=tokens_seen)
            status = f"loss {record['loss']:.3f} | {record['tokens_per_s']:,.0f} tok/s"
            if "val_loss" in record:
                status += f" | val {record['val_loss']:.3f}"
            progress.update(task, completed=step, status=status)
            if settings.checkpoint_every and step % settings.checkpoint_every == 0 and step < settings.steps:
                save_checkpoint(run_dir, step, model, optimizer,
                                {"tokens": tokens_seen, "data": batches.state_dict()},
                                keep=settings.keep_checkpoints)
    summary["seconds"] = time.perf_counter() - started
    if on_final is not None:
        on_final(model)
    return summary


def _target_count(tokens: torch.Tensor, mask: torch.Tensor | None) -> int:
    if mask is None:
        return tokens.shape[0] * (tokens.shape[1] - 1)
    return int(mask[:, 1:].sum())
