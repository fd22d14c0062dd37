"""Token efficiency of Muon vs AdamW (Moonlight; K2_SPEC §2) at equal tokens on the default corpus.

Each optimizer gets a small learning-rate sweep; the best run of each (lowest final
validation loss) is compared: how many tokens does Muon need to reach AdamW's final
validation loss?

    python experiments/muon_vs_adamw.py --out runs/muon_vs_adamw [--steps 300]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common import dump, run, tokens_to_reach, val_curve  # noqa: E402

SWEEP = {"muonclip": [1e-3, 3e-3, 1e-2], "adamw": [1e-3, 3e-3, 1e-2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/muon_vs_adamw"))
    parser.add_argument("--recipe", default="recipes/speedrun.toml")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--set", dest="extra", action="append", default=[])
    args = parser.parse_args()
    base = [f"train.steps={args.steps}", "train.eval_every=20", "train.checkpoint_every=0",
            "train.eval_batches=16", *args.extra]
    results: dict[str, dict[float, list]] = {}
    for name, lrs in SWEEP.items():
        results[name] = {}
        for lr in lrs:
            records = run(args.out / f"{name}_lr{lr:g}", args.recipe, base + [f"optim.name={name}", f"optim.lr={lr}"])
            results[name][lr] = val_curve(records)
            print(f"{name} lr={lr:g}: final val {results[name][lr][-1][1]:.4f}", flush=True)
    best = {name: min(curves, key=lambda lr: curves[lr][-1][1]) for name, curves in results.items()}
    muon, adamw = results["muonclip"][best["muonclip"]], results["adamw"][best["adamw"]]
    target = adamw[-1][1]
    reached = tokens_to_reach(muon, target)
    ratio = reached / adamw[-1][0] if reached is not None else None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curves in results.items():
        for lr, curve in curves.items():
            style = "-" if lr == best[name] else ":"
            ax.plot(*zip(*curve), style, label=f"{name} lr={lr:g}" + (" (best)" if lr == best[name] else ""))
    ax.axhline(target, color="grey", linestyle="--", label="AdamW final val loss")
    ax.set_xlabel("tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_ylim(top=min(7.0, max(c[0][1] for cs in results.values() for c in cs.values())))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "muon_vs_adamw.png", dpi=110)
    summary = {"best_lr": best, "adamw_final_val": target, "muon_final_val": muon[-1][1],
               "muon_tokens_to_adamw_final": reached, "adamw_tokens": adamw[-1][0], "ratio": ratio,
               "curves": {n: {str(lr): c for lr, c in cs.items()} for n, cs in results.items()}}
    dump(args.out / "muon_vs_adamw.json", summary)
    print(f"best lr: {best}; AdamW final val {target:.4f} at {adamw[-1][0]:,} tokens; Muon reaches it at "
          f"{reached if reached is None else f'{reached:,.0f}'} tokens -> ratio {ratio}")


if __name__ == "__main__":
    main()
