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

With `--parts-every N`, the clipped steps whose number N divides also split that drift by
parameter group: the step's batch once more per group, with the weights from before the step
except that group's, taken from after it (`PartsProbe`). The groups are the rows QK-Clip scales (q_b_proj and
kv_b_proj, clip included), the low-rank projections before them (q_a_proj, kv_a_proj_with_mqa,
which holds the shared rotary key), the norm gains before q and k, and everything else (the
layers below, embeddings). The growths multiply to about the whole step's.

At the end, the RMS of the final weights by the parts QK-Clip scales (each head's q-nope and
q-rope rows, its k-nope rows) and the parts it leaves alone (v rows, the shared rotary key's
rows of kv_a_proj, the norm gains before q and k), per layer, for both runs: where the clipped
weights end up against Muon's update, whose elements have RMS ~0.2 lr.

    python experiments/qk_clip.py --out runs/qk_clip [--tau 100] [--lr 0.01] [--steps 1000]
        [--batch-size 4] [--parts-every 0] [--plain runs/other/muon] [--summarise]

`--plain` reuses a finished plain-Muon run of this script (another tau on the same recipe needs
only the MuonClip run); it must have been trained with the recipe this one would train.

`--summarise` trains nothing: it reads the two runs' metrics.jsonl as they stand, finished or
stopped part-way, and writes the plot and qk_clip.json from them (each run's `last_step`; the
weight RMS only for finished runs). Pass the options the runs were trained with: each run's
recipe.json must match them. The validation loss of both runs is compared at the last
step both evaluated (`val_at_common_step`), so that runs stopped at different steps compare.

The defaults are the recipe of docs/LOG.md's QK-Clip result: the speedrun's tiny model at
K2's tau = 100, a learning rate ~3x the speedrun's and no weight decay, so that plain Muon's
max logit runs past 5 tau, over enough steps that the clip starts once the weights have grown
(the update's drift shrinks with the weights it is measured against).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import torch  # noqa: E402
from common import dump, run  # noqa: E402

from openk2 import load_model  # noqa: E402
from openk2.eval.report import smooth  # noqa: E402
from openk2.recipe import load_recipe, recipe_changes  # noqa: E402
from openk2.train.metrics import read_metrics  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/qk_clip"))
    parser.add_argument("--recipe", default="recipes/speedrun.toml")
    parser.add_argument("--tau", type=float, default=100.0)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step (one micro-batch)")
    parser.add_argument("--parts-every", type=int, default=0,
                        help="split the drift by parameter group on clipped steps whose number N divides")
    parser.add_argument("--plain", type=Path, default=None,
                        help="a finished plain-Muon run of this script to reuse instead of training one")
    parser.add_argument("--summarise", action="store_true",
                        help="train nothing; report on the runs in --out as they stand (finished or stopped)")
    parser.add_argument("--set", dest="extra", action="append", default=[])
    args = parser.parse_args()
    base = [f"optim.lr={args.lr}", f"train.steps={args.steps}", f"train.batch_size={args.batch_size}",
            f"train.micro_batch_size={args.batch_size}", "train.eval_every=50",
            "train.checkpoint_every=0", "optim.weight_decay=0.0", *args.extra]

    def overrides(tau: float) -> list[str]:
        return base + [f"optim.qk_clip_tau={tau}"]

    # label -> (run folder, tau); the second is the clipped run
    setups = {"Muon (no clip)": (args.plain or args.out / "muon", 0.0),
              f"MuonClip (tau={args.tau:g})": (args.out / "muonclip", args.tau)}
    if args.summarise:
        runs = {label: check_run(folder, load_recipe(args.recipe, overrides(tau)), "--summarise")
                for label, (folder, tau) in setups.items()}
    else:
        if args.plain is not None:
            check_run(args.plain, load_recipe(args.recipe, overrides(0.0)), "--plain")
        runs = {label: run(folder, args.recipe, overrides(tau),
                           on_step=PartsProbe(args.parts_every) if tau and args.parts_every else StepProbe())
                for label, (folder, tau) in setups.items()}
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(18, 4.5))
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
            **after_step_quantiles(after_clip, args.tau),
            "first_step_past_5_tau": _step_at(records, _first_past(records, 5 * args.tau)),
            "runaway_lr2": runaway_lr2(records, args.tau),
            "steps_past_1.05_tau": tail_steps(after_clip, args.tau),
            "clipped_steps": sum(1 for r in records if r["clipped_heads"]),
            "last_step": records[-1]["step"],
            "final_loss": records[-1]["loss"],
            "final_val_loss": vals[-1] if vals else None,
            **head_drift(records, args.tau, clipped=setups[label][1] > 0, after=first_clip),
            **drift_parts(records, args.tau),
        }
    left.axhline(args.tau, color="red", linestyle="--", label=f"tau = {args.tau:g}")
    clipped = [r for r in runs[f"MuonClip (tau={args.tau:g})"] if r["step"] > first_clip]
    steps = [r["step"] for r in clipped]
    middle.plot(steps, [r["max_logit"] / args.tau for r in clipped], color="C1", alpha=0.5,
                label="in the step's forward (a new batch), before its clip")
    middle.plot(steps, [r["max_logit_after_step"] / args.tau for r in clipped], color="C3",
                label="after the step (same batch): the update's drift")
    middle.axhline(1.05, color="red", linestyle=":", label="1.05 tau")
    middle.set_title(f"MuonClip after its first clip (step {first_clip})" if clipped
                     else "MuonClip never clipped")
    middle.set_xlabel("step")
    middle.set_ylabel("max attention logit / tau")
    middle.legend()
    left.set_yscale("log")
    left.set_xlabel("step")
    left.set_ylabel("max attention logit (before clipping)")
    left.legend()
    right.set_xlabel("step")
    right.set_ylabel("training loss (EMA)")
    right.legend()
    for ax in (left, middle, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "qk_clip.png", dpi=110)
    # a stopped run (--summarise) has no final weights
    scales = {label: weight_scales(folder / "final") for label, (folder, _) in setups.items()
              if (folder / "final").is_dir()}
    dump(args.out / "qk_clip.json", {"tau": args.tau, "lr": args.lr, "runs": summary,
                                     "val_at_common_step": val_at_common_step(runs), "weight_rms": scales})
    for label, values in summary.items():
        print(label, values)
    for label, layers in scales.items():
        print(f"{label}: final weight RMS per layer (mean over heads)")
        for i, parts in enumerate(layers):
            print(f"  layer {i}: " + ", ".join(f"{k} {v:.4f}" for k, v in parts.items()))


def check_run(folder: Path, recipe: dict, flag: str) -> list[dict]:
    """A run of this script in `folder`, trained with `recipe`, and its metrics: `--plain` reuses
    a finished plain-Muon run (its curves compare with the MuonClip run's); `--summarise` reads
    a run finished or stopped part-way (so the summary's tau and lr are the run's own). Anything
    else stops with what differs and what to do."""
    plain = flag == "--plain"
    fix = ("drop --plain to train plain Muon here" if plain
           else "point --out (or --plain) at the folders this script trained into")
    if not (folder / "recipe.json").is_file():
        raise SystemExit(f"{flag} {folder}: no run of this script there (recipe.json is missing); {fix}")
    if plain and not (folder / "summary.json").is_file():
        raise SystemExit(f"--plain {folder}: that run has not finished (summary.json is missing); let it "
                         f"finish, or {fix}")
    saved = json.loads((folder / "recipe.json").read_text())
    # compared in the types recipe.json holds (lists, not tuples)
    changed = recipe_changes(saved, json.loads(json.dumps(recipe)))
    if changed:
        options = "--tau, --lr, --steps, --batch-size, --set"
        raise SystemExit(f"{flag} {folder}: trained with {', '.join(changed)}; pass the options it ran with "
                         f"({options})" + (" or drop --plain" if plain else ""))
    records = recorded_run(folder, flag)
    if not any("max_logit_after_step" in record for record in records):
        raise SystemExit(f"{flag} {folder}: its metrics hold no after-step probe (not a run of this "
                         f"script); {fix}")
    return records


def recorded_run(folder: Path, flag: str) -> list[dict]:
    """A run's metrics as they stand, finished or stopped part-way (a last line cut off by the
    stop is left out)."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{flag} {folder}: {path.name} is missing; the run has logged no step yet")
    try:
        records = read_metrics(path)
    except ValueError as error:
        raise SystemExit(f"{flag} {error}") from None
    if not records:
        raise SystemExit(f"{flag} {path}: no step logged yet; let the run go on")
    return records


def val_at_common_step(runs: dict[str, list[dict]]) -> dict | None:
    """The last step at which every run has a validation loss, and each run's loss there."""
    evaluated = [{r["step"]: r["val_loss"] for r in records if r.get("val_loss") is not None}
                 for records in runs.values()]
    common = set.intersection(*(set(losses) for losses in evaluated)) if evaluated else set()
    if not common:
        return None
    step = max(common)
    return {"step": step, **{label: losses[step] for label, losses in zip(runs, evaluated)}}


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
        after = self.rerun(model, micro_batches)
        record["max_logit_after_step"] = float(after.max())
        record["head_max_after"] = after.flatten().tolist()

    def rerun(self, model, micro_batches) -> torch.Tensor:
        """Each head's max logit on the step's micro-batches with the model's current weights."""
        model.reset_stats()
        for tokens, _ in micro_batches:
            model.model(tokens[:, :-1])
        maxima = self.original().float()
        model.reset_stats()
        return maxima


class PartsProbe(StepProbe):
    """StepProbe that, on each step with a clip whose number `every` divides, also re-runs the
    step's batch once per parameter group (PARTS) with the weights from before the step except
    that group's, taken from after it, and records each head's max as `head_max_<group>`. The
    weights from before a step are kept only when that step's number `every` divides."""

    def __init__(self, every: int) -> None:
        super().__init__()
        self.every = every
        self.before: list[torch.Tensor] | None = None

    @torch.no_grad()
    def __call__(self, model, micro_batches, record: dict) -> None:
        super().__call__(model, micro_batches, record)
        params = list(model.parameters())
        if (self.before is not None and record["clipped_heads"] and "head_max_before" in record
                and record["step"] % self.every == 0):
            after = [p.detach().clone() for p in params]
            for part, members in parts(model).items():
                for p, old, new in zip(params, self.before, after):
                    p.copy_(new if id(p) in members else old)
                record[f"head_max_{part}"] = self.rerun(model, micro_batches).flatten().tolist()
            for p, new in zip(params, after):
                p.copy_(new)
        split_next = (record["step"] + 1) % self.every == 0
        self.before = [p.detach().clone() for p in params] if split_next else None


PARTS = ("clipped_rows", "a_proj", "norm_gains", "rest")


def parts(model) -> dict[str, set[int]]:
    """Parameter ids by group: the rows QK-Clip scales live in the query and kv_b projections; the
    low-rank projections before them; the norm gains before q and k; everything else."""
    groups: dict[str, set[int]] = {part: set() for part in PARTS}
    for attn in model.attention_layers():
        groups["clipped_rows"] |= {id(attn.query_proj.weight), id(attn.kv_b_proj.weight)}
        a_proj = [attn.kv_a_proj_with_mqa] + ([attn.q_a_proj] if hasattr(attn, "q_a_proj") else [])
        groups["a_proj"] |= {id(p) for m in a_proj for p in m.parameters()}
        norms = [attn.kv_a_layernorm] + ([attn.q_a_layernorm] if hasattr(attn, "q_a_layernorm") else [])
        groups["norm_gains"] |= {id(p) for m in norms for p in m.parameters()}
    owned = set().union(*groups.values())
    groups["rest"] = {id(p) for p in model.parameters() if id(p) not in owned}
    return groups


def drift_parts(records: list[dict], tau: float) -> dict[str, float | None]:
    """Median growth of a clipped head from each group's update alone (PartsProbe's steps): the
    clipped rows' max / tau (their update and the clip), the other groups' max / the max before."""
    rows = [r for r in records if "head_max_rest" in r]
    if not rows:
        return {}
    out = {}
    for part in PARTS:
        growth = [new / (tau if part == "clipped_rows" else before) for r in rows
                  for new, before in zip(r[f"head_max_{part}"], r["head_max_before"]) if before > tau]
        out[f"part_growth_{part}_median"] = _median(growth)
    return out


def after_step_quantiles(after_clip: list[dict], tau: float) -> dict[str, float | None]:
    """After the first clip: the same-batch max over heads after each step, by quantile over
    steps, the share of steps on which it stays within 1.05 tau, how many pass 1.03 tau, and how
    many of the steps ran at the peak lr (where the tail comes from)."""
    probed = [r for r in after_clip if "max_logit_after_step" in r]
    if not probed:
        return {}
    values = [r["max_logit_after_step"] / tau for r in probed]
    peak = max(r["lr"] for r in probed)
    return {"after_step_over_tau_p90": _quantile(values, 0.9),
            "after_step_over_tau_p99": _quantile(values, 0.99),
            "steps_within_1.05_tau": sum(v <= 1.05 for v in values) / len(values),
            "steps_past_1.03_tau": sum(v > 1.03 for v in values),
            "steps_at_peak_lr": sum(r["lr"] >= peak * (1 - 1e-6) for r in probed)}


def tail_steps(after_clip: list[dict], tau: float, limit: float = 1.05) -> list[dict]:
    """The steps whose same-batch max after the step passes `limit` tau: the head that does, its
    max in the step's own forward (what the clip read) and after the step, over tau, and the
    growth its update gave it (after / tau for a clipped head, after / before for one that was not)."""
    out = []
    for r in after_clip:
        after, before = r.get("head_max_after"), r.get("head_max_before")
        if after is None or before is None:
            continue
        head = max(range(len(after)), key=after.__getitem__)
        if after[head] > limit * tau:
            out.append({"step": r["step"], "lr": r["lr"], "head": head, "before_over_tau": before[head] / tau,
                        "after_over_tau": after[head] / tau, "growth": after[head] / min(before[head], tau)})
    return out


def runaway_lr2(records: list[dict], tau: float) -> float | None:
    """The sum of lr^2 over the steps from the first whose max logit passes tau to the first that
    passes 5 tau (None if none does): how much training the runaway takes. It came out about the
    same at lr 0.007-0.01 (docs/LOG.md), so the runaway's length in steps goes as 1/lr^2 there;
    at lr 0.005 it takes more."""
    start, end = _first_past(records, tau), _first_past(records, 5 * tau)
    if start is None or end is None:
        return None
    return sum(r["lr"] ** 2 for r in records[start:end + 1])


def _first_past(records: list[dict], level: float) -> int | None:
    """Index of the first record whose max logit (before clipping) passes `level`."""
    return next((i for i, r in enumerate(records) if r["max_logit"] > level), None)


def _step_at(records: list[dict], index: int | None) -> int | None:
    return None if index is None else records[index]["step"]


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
