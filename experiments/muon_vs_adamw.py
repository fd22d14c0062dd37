"""Token efficiency of Muon vs AdamW (Moonlight; K2_SPEC §2) at equal tokens on the default corpus.

Each optimizer gets a small learning-rate sweep; the best run of each (lowest final
validation loss) is compared: how many tokens does Muon need to reach AdamW's final
validation loss? Two answers:

- mid-run: where Muon's validation curve first crosses AdamW's final value. Conservative with
  a decaying schedule, since Muon is read before its own decay while AdamW's value is after it.
- complete runs: Muon at its best lr rerun with the whole schedule (warm-up, stable, decay)
  squeezed into a fraction of the steps (--fractions); the answer is the fewest tokens whose
  complete run ends at or below AdamW's final value (linear between the fractions run). This is
  how optimizers are compared at a token budget (each run gets its own schedule).

    python experiments/muon_vs_adamw.py --out runs/muon_vs_adamw [--steps 300]
        [--muon-lrs 1e-3 3e-3 1e-2] [--adamw-lrs 1e-3 3e-3 1e-2] [--fractions 0.5 0.6 0.7]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common import dump, run, tokens_to_reach, val_curve  # noqa: E402

LRS = [1e-3, 3e-3, 1e-2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/muon_vs_adamw"))
    parser.add_argument("--recipe", default="recipes/speedrun.toml")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--muon-lrs", type=float, nargs="+", default=LRS)
    parser.add_argument("--adamw-lrs", type=float, nargs="+", default=LRS)
    parser.add_argument("--fractions", type=float, nargs="*", default=[0.5, 0.6, 0.7],
                        help="step fractions for Muon's complete shorter runs (none: skip them)")
    parser.add_argument("--set", dest="extra", action="append", default=[])
    args = parser.parse_args()
    common = ["train.eval_every=20", "train.checkpoint_every=0", "train.eval_batches=16", *args.extra]
    base = [f"train.steps={args.steps}", *common]
    results: dict[str, dict[float, list]] = {}
    for name, lrs in (("muonclip", args.muon_lrs), ("adamw", args.adamw_lrs)):
        results[name] = {}
        for lr in lrs:
            records = run(args.out / f"{name}_lr{lr:g}", args.recipe,
                          base + [f"optim.name={name}", f"optim.lr={lr}"])
            results[name][lr] = val_curve(records)
            print(f"{name} lr={lr:g}: final val {results[name][lr][-1][1]:.4f}", flush=True)
    best = {name: min(curves, key=lambda lr: curves[lr][-1][1]) for name, curves in results.items()}
    muon, adamw = results["muonclip"][best["muonclip"]], results["adamw"][best["adamw"]]
    target = adamw[-1][1]
    reached = tokens_to_reach(muon, target)
    ratio = reached / adamw[-1][0] if reached is not None else None

    complete = {1.0: muon[-1]}  # fraction -> (tokens, final val) of a complete Muon run
    for fraction in sorted(args.fractions):
        steps = round(fraction * args.steps)
        overrides = [f"train.steps={steps}", *common, "optim.name=muonclip", f"optim.lr={best['muonclip']}"]
        records = run(args.out / f"muonclip_lr{best['muonclip']:g}_steps{steps}", args.recipe, overrides)
        complete[fraction] = val_curve(records)[-1]
        print(f"muonclip lr={best['muonclip']:g}, complete run of {steps} steps: final val "
              f"{complete[fraction][1]:.4f}", flush=True)
    # Without shorter runs there is nothing to read: the full run alone says only "at most 1.0x".
    complete_reached = (tokens_to_reach([complete[f] for f in sorted(complete)], target)
                        if len(complete) > 1 else None)
    complete_ratio = complete_reached / adamw[-1][0] if complete_reached is not None else None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curves in results.items():
        for lr, curve in curves.items():
            style = "-" if lr == best[name] else ":"
            ax.plot(*zip(*curve), style, label=f"{name} lr={lr:g}" + (" (best)" if lr == best[name] else ""))
    if len(complete) > 1:
        ax.plot(*zip(*[complete[f] for f in sorted(complete)]), "k*", markersize=9,
                label=f"muonclip lr={best['muonclip']:g}, ends of complete shorter runs")
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
               "complete_runs": {str(f): v for f, v in sorted(complete.items())},
               "complete_tokens_to_adamw_final": complete_reached, "complete_ratio": complete_ratio,
               "curves": {n: {str(lr): c for lr, c in cs.items()} for n, cs in results.items()}}
    dump(args.out / "muon_vs_adamw.json", summary)
    print(f"best lr: {best}; AdamW final val {target:.4f} at {adamw[-1][0]:,} tokens; Muon reaches it at "
          f"{reached if reached is None else f'{reached:,.0f}'} tokens mid-run -> ratio {ratio}; "
          f"complete runs reach it at "
          f"{complete_reached if complete_reached is None else f'{complete_reached:,.0f}'} "
          f"tokens -> ratio {complete_ratio}")


if __name__ == "__main__":
    main()
