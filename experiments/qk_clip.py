"""QK-Clip at small scale (K2_SPEC §2): does plain Muon's max attention logit run away, and
does QK-Clip cap it at tau without hurting the loss?

Runs the same high-learning-rate recipe twice, with qk_clip_tau = 0 (plain Muon) and
qk_clip_tau = TAU, and plots the per-step max logit (before clipping) and the loss.

After every step the step's own batch goes through the model once more (no gradients), with
the weights the step left. QK-Clip computes its factors from the forward before the update
and applies them after it, so on that batch a clipped head's max is tau times the growth
that the step's own update gave it: `max_logit_after_step` is tau times the drift of the
update. The next step's pre-clip max (on a new batch) adds the spread between batches.
Each head's max is recorded too, before and after the step (`StepProbe`), and summarised per
head (`head_drift`): how far one clipped head comes back above tau, against the largest of the
heads clipped on a step, which is what `max_logit_after_step` reports.

At the end, the RMS of the final weights by the parts QK-Clip scales (each head's q-nope and
q-rope rows, its k-nope rows) and the parts it leaves alone (v rows, the shared rotary key's
rows of kv_a_proj, the norm gains before q and k), per layer, for both runs: where the clipped
weights end up against Muon's update, whose elements have RMS ~0.2 lr.

    python experiments/qk_clip.py --out runs/qk_clip [--tau 15] [--lr 0.02] [--steps 300]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import torch  # noqa: E402
from common import dump, run  # noqa: E402

from openk2 import load_model  # noqa: E402
from openk2.eval.report import smooth  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/qk_clip"))
    parser.add_argument("--recipe", default="recipes/speedrun.toml")
    parser.add_argument("--tau", type=float, default=15.0)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--set", dest="extra", action="append", default=[])
    args = parser.parse_args()
    base = [f"optim.lr={args.lr}", f"train.steps={args.steps}", "train.eval_every=50",
            "train.checkpoint_every=0", "optim.weight_decay=0.0", *args.extra]
    # label -> (run folder, tau); the second is the clipped run
    setups = {"Muon (no clip)": ("muon", 0.0), f"MuonClip (tau={args.tau:g})": ("muonclip", args.tau)}
    runs = {label: run(args.out / folder, args.recipe, base + [f"optim.qk_clip_tau={tau}"],
                       on_step=StepProbe())
            for label, (folder, tau) in setups.items()}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    summary = {}
    first_clip = _first_clip(runs[f"MuonClip (tau={args.tau:g})"])
    for label, records in runs.items():
        steps = [r["step"] for r in records]
        line, = left.plot(steps, [r["max_logit"] for r in records], label=label)
        if "max_logit_after_step" in records[0]:
            left.plot(steps, [r["max_logit_after_step"] for r in records], ":", color=line.get_color(),
                      label=f"{label}: same batch after the step")
        right.plot(steps, smooth([r["loss"] for r in records]), label=label)
        vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
        after_clip = [r for r in records if r["step"] > _first_clip(records)]
        summary[label] = {
            "max_logit": max(r["max_logit"] for r in records),
            "max_logit_after_first_clip": max((r["max_logit"] for r in after_clip), default=None),
            "median_max_logit_after_first_clip": _median([r["max_logit"] for r in after_clip]),
            # the same batch re-run after the step: tau x the drift of the step's own update
            "after_step_max": max((r.get("max_logit_after_step", 0.0) for r in after_clip), default=None),
            "after_step_median": _median([r["max_logit_after_step"] for r in after_clip
                                          if "max_logit_after_step" in r]),
            "clipped_steps": sum(1 for r in records if r["clipped_heads"]),
            "final_loss": records[-1]["loss"],
            "final_val_loss": vals[-1] if vals else None,
            **head_drift(records, args.tau, clipped=setups[label][1] > 0, after=first_clip),
        }
    left.axhline(args.tau, color="red", linestyle="--", label=f"tau = {args.tau:g}")
    left.set_yscale("log")
    left.set_xlabel("step")
    left.set_ylabel("max attention logit (before clipping)")
    left.legend()
    right.set_xlabel("step")
    right.set_ylabel("training loss (EMA)")
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "qk_clip.png", dpi=110)
    scales = {label: weight_scales(args.out / folder / "final") for label, (folder, _) in setups.items()}
    dump(args.out / "qk_clip.json", {"tau": args.tau, "lr": args.lr, "runs": summary, "weight_rms": scales})
    for label, values in summary.items():
        print(label, values)
    for label, layers in scales.items():
        print(f"{label}: final weight RMS per layer (mean over heads)")
        for i, parts in enumerate(layers):
            print(f"  layer {i}: " + ", ".join(f"{k} {v:.4f}" for k, v in parts.items()))


@torch.no_grad()
def weight_scales(checkpoint: Path) -> list[dict[str, float]]:
    """Per layer: RMS of the rows QK-Clip scales and of the attention weights it leaves alone."""
    model = load_model(checkpoint)
    config = model.config
    H, nope, rope, v = (config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim,
                        config.v_head_dim)
    rms = lambda t: float(t.float().pow(2).mean().sqrt())  # noqa: E731
    layers = []
    for attn in model.attention_layers():
        q = attn.query_proj.weight.view(H, nope + rope, -1)
        kv = attn.kv_b_proj.weight.view(H, nope + v, -1)
        parts = {"q_nope": rms(q[:, :nope]), "q_rope": rms(q[:, nope:]), "k_nope": rms(kv[:, :nope]),
                 "v": rms(kv[:, nope:]), "k_rope (kv_a_proj)": rms(attn.kv_a_proj_with_mqa.weight[-rope:]),
                 "kv_a_layernorm": rms(attn.kv_a_layernorm.weight)}
        if config.q_lora_rank is not None:
            parts["q_a_layernorm"] = rms(attn.q_a_layernorm.weight)
        layers.append(parts)
    return layers


class StepProbe:
    """on_step hook: the step's micro-batches again, with the weights the step left. Records the
    largest logit after the step and, per head (layers x heads, flattened), its max in the step's
    own forward (what the optimizer read, before clipping) and after the step. The optimizer
    resets the statistic once it has read it, so the probe keeps what `max_logits()` returned
    (from the second step on: the first step's read happens before the probe exists)."""

    def __init__(self) -> None:
        self.read: torch.Tensor | None = None
        self.original = None

    def _keep(self) -> torch.Tensor:
        self.read = self.original()
        return self.read

    @torch.no_grad()
    def __call__(self, model, micro_batches, record: dict) -> None:
        if self.original is None:
            self.original, model.max_logits = model.max_logits, self._keep
        elif self.read is not None:
            record["head_max_before"] = self.read.float().flatten().tolist()
        model.reset_stats()
        for tokens, _ in micro_batches:
            model.model(tokens[:, :-1])
        after = self.original().float()
        record["max_logit_after_step"] = float(after.max())
        record["head_max_after"] = after.flatten().tolist()
        model.reset_stats()


def head_drift(records: list[dict], tau: float, clipped: bool, after: int) -> dict[str, float | None]:
    """Steps after `after` (the clipped run's first clip): per head, what one update does.
    Clipped run: each clipped head's max after the step / tau, the largest over heads / tau (the
    logged drift) and heads clipped per step. Plain run: each head's max after / before the
    step, for heads above tau / 2."""
    rows = [r for r in records if r["step"] > after and "head_max_before" in r]
    pairs = [list(zip(r["head_max_after"], r["head_max_before"])) for r in rows]  # per step
    if clipped:
        per_head = [a / tau for step in pairs for a, b in step if b > tau]
        return {"clipped_head_after_over_tau_median": _median(per_head),
                "clipped_head_after_over_tau_p90": _quantile(per_head, 0.9),
                "max_over_heads_after_over_tau_median": _median([max(a for a, _ in step) / tau
                                                                 for step in pairs]),
                "heads_clipped_per_step_median": _median([sum(b > tau for _, b in step) for step in pairs])}
    growth = [a / b for step in pairs for a, b in step if b > tau / 2]
    return {"head_growth_median": _median(growth), "head_growth_p90": _quantile(growth, 0.9)}


def _quantile(values: list[float], q: float) -> float | None:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] if values else None


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _first_clip(records: list[dict]) -> int:
    return next((r["step"] for r in records if r["clipped_heads"]), 10**9)


if __name__ == "__main__":
    main()
