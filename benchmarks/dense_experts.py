"""Decode tokens/s with the dense few-token expert pass against the sparse dispatch (docs/LOG.md,
"Decode on oneDNN's pre-packed linear"): where the rule in infer/cache.py should switch.

For each preset (random weights, greedy, 128-token prompts) and batch size: the engine with its
rule (`_DENSE_EXPERTS_MIN_SLOTS`: dense when N·K ≥ E / 2), with the dense pass always taken, and
with the sparse dispatch always taken; the three alternate round by round, best round each.

    python benchmarks/dense_experts.py [--presets tiny small] [--batches 1 2 4 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
from common import cpu_name, decode_step_seconds, greedy

import openk2.infer.cache as cache
from openk2 import build_model, preset
from openk2.infer import Engine

TOKENS = 33
SETTINGS = {"rule": (True, cache._DENSE_EXPERTS_MIN_SLOTS), "always dense": (True, 0.0),
            "always sparse": (False, 0.0)}


def rate(model, batch: int, setting: str) -> Callable[[], float]:
    """Decode tokens/s under one setting (the engine is rebuilt: the setting shapes its weights)."""
    prompts = [[(7 * i + j) % model.config.vocab_size for j in range(128)] for i in range(batch)]

    def run() -> float:
        cache._DENSE_EXPERTS, cache._DENSE_EXPERTS_MIN_SLOTS = SETTINGS[setting]
        generate = greedy(Engine(model, max_batch=batch, max_len=192), prompts)
        generate(2)
        return batch / decode_step_seconds(generate, TOKENS)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"# dense experts  torch {torch.__version__}  {cpu_name()}  {torch.get_num_threads()} threads")
    print(f"{'preset':<8}{'batch':>6}" + "".join(f"{name:>16}" for name in SETTINGS) + "  (decode tokens/s)")
    for name in args.presets:
        model = build_model(preset(name), seed=0)
        for batch in args.batches:
            runs = {setting: rate(model, batch, setting) for setting in SETTINGS}
            samples: dict[str, list[float]] = {setting: [] for setting in SETTINGS}
            for _ in range(args.rounds):  # settings alternate within every round
                for setting, run in runs.items():
                    samples[setting].append(run())
            best = {setting: max(values) for setting, values in samples.items()}
            print(f"{name:<8}{batch:>6}" + "".join(f"{best[s]:>16,.0f}" for s in SETTINGS), flush=True)


if __name__ == "__main__":
    main()
