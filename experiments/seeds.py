"""Stability of the speedrun recipe across seeds (pre-training issue: "no loss spikes").

Runs `recipes/speedrun.toml` once per seed (reusing finished runs in OUT/seed{S}) and prints,
per seed: the validation loss at every eval point, the largest rise of the smoothed training
loss over its running minimum (the size of the worst spike), the largest max logit, and the
final validation loss against the unigram baseline.

    python experiments/seeds.py --out runs/seeds [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import dump, run  # noqa: E402

from openk2.eval.report import training_summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/seeds"))
    parser.add_argument("--recipe", default="recipes/speedrun.toml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="extra", action="append", default=[])
    args = parser.parse_args()
    rows = {}
    for seed in args.seeds:
        folder = args.out / f"seed{seed}"
        summary = training_summary(run(folder, args.recipe, [f"train.seed={seed}", *args.extra]))
        summary["unigram_val_loss"] = json.loads((folder / "summary.json").read_text())["unigram_val_loss"]
        rows[seed] = summary
    steps = [step for step, _ in rows[args.seeds[0]]["val_losses"]]
    print("| seed | " + " | ".join(f"val @ {s}" for s in steps)
          + " | largest smoothed rise | max logit | unigram |")
    print("|---" * (len(steps) + 4) + "|")
    for seed, s in rows.items():
        vals = " | ".join(f"{v:.3f}" for _, v in s["val_losses"])
        print(f"| {seed} | {vals} | {s['largest_smoothed_rise']:.3f} | {s['max_logit']:.1f} | "
              f"{s['unigram_val_loss']:.3f} |")
    finals = [s["final_val_loss"] for s in rows.values()]
    print(f"final validation loss: mean {sum(finals) / len(finals):.3f}, "
          f"spread {max(finals) - min(finals):.3f}")
    dump(args.out / "seeds.json", {str(k): v for k, v in rows.items()})


if __name__ == "__main__":
    main()
