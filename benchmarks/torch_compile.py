"""Would torch.compile (inductor, CPU) speed openk2 up? Eager against compiled, same process.

- train: the tiny training step of benchmarks/train_step.py (forward + backward + fused AdamW,
  8 x 256 tokens), eager against regional compilation (each decoder layer compiled on its own,
  as torchtitan does; the routed experts stay eager because their per-expert split depends on
  the routing).
- decode: the engine's batch-8 decode step at 128 cached tokens (benchmarks/decode.py's
  measure), eager against `torch.compile(decoder.decode, dynamic=True)`; torch._grouped_mm has
  no CPU float32 compile path, so it runs behind `torch.compiler.disable` (a graph break; the
  wrapper is process-wide, a no-op Python call for the eager side).

Prints each side's best and median over alternating rounds, the compile time, whether the
compiled decode produced the same tokens, and the graphs its graph breaks leave. Needs a C++
compiler (inductor's CPU backend).

    python benchmarks/torch_compile.py [--what train decode] [--rounds 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch._dynamo.utils import counters
from common import cpu_name, decode_step_seconds, greedy, rounds
from train_step import openk2_loss, step_fn

from openk2 import build_model, preset
from openk2.infer import Engine

BATCH, CONTEXT, TOKENS = 8, 128, 33


def train_contenders() -> dict:
    eager = build_model(preset("tiny"), seed=0)
    compiled = build_model(preset("tiny"), seed=0)
    for moe in compiled.moe_layers():  # this model's routed experts only
        moe.experts.forward = torch.compiler.disable(moe.experts.forward)
    for layer in compiled.model.layers:
        layer.compile()
    start = time.perf_counter()
    compiled_step = step_fn(compiled, openk2_loss)  # warms up: compiles
    print(f"train: compiled in {time.perf_counter() - start:.0f} s")
    return {"train eager": step_fn(eager, openk2_loss), "train compiled": compiled_step}


def decode_contenders() -> dict:
    counters.clear()  # count the decode's graphs alone
    model = build_model(preset("tiny"), seed=0).eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (BATCH, CONTEXT), generator=g).tolist()
    grouped_mm = torch._grouped_mm
    torch._grouped_mm = torch.compiler.disable(lambda *a, **k: grouped_mm(*a, **k))
    contenders, tokens = {}, {}
    for name in ("decode eager", "decode compiled"):
        engine = Engine(model, max_batch=BATCH, max_len=CONTEXT + TOKENS + 8)
        if name.endswith("compiled"):
            engine.decoder.decode = torch.compile(engine.decoder.decode, dynamic=True)

        generate = greedy(engine, prompts)
        start = time.perf_counter()
        tokens[name] = [c.token_ids for c in generate(TOKENS)]
        print(f"{name}: first generate {time.perf_counter() - start:.1f} s")
        contenders[name] = lambda generate=generate: decode_step_seconds(generate, TOKENS)
    print("decode: compiled tokens equal eager tokens: "
          f"{tokens['decode eager'] == tokens['decode compiled']}; "
          f"{counters['stats']['unique_graphs']} graphs; graph breaks: "
          f"{ {reason.splitlines()[0]: n for reason, n in counters['graph_break'].items()} }")
    return contenders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", nargs="+", default=["train", "decode"], choices=["train", "decode"])
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    for what in args.what:
        fns = train_contenders() if what == "train" else decode_contenders()
        if what == "train":
            times = rounds(fns, args.rounds)
        else:  # each call returns the seconds of one decode step
            times = {name: [] for name in fns}
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    times[name].append(fn())
        for name, t in times.items():
            print(f"{name:<18} {min(t) * 1e3:8.2f} ms best {statistics.median(t) * 1e3:8.2f} ms median")
        names = list(times)
        print(f"{what}: eager / compiled time: {min(times[names[0]]) / min(times[names[1]]):.2f}x (best), "
              f"{statistics.median(times[names[0]]) / statistics.median(times[names[1]]):.2f}x (median)")


if __name__ == "__main__":
    main()
