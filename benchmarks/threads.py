"""The same work from the main thread and from a `threading.Thread` (docs/LOG.md, "The engine in a
non-main thread"): why `openk2 serve` steps the engine in its main thread.

For each contender, rounds alternate between the main thread and a fresh thread (the main thread
waiting in `join`), and each side reports its fastest round:

- a few mid-sized ops, 200 calls per round: a 64 x 256 x 256 matmul, a 32 x 8,192 softmax, and an
  8,192 x 256 LM head against 32 rows through oneDNN's pre-packed linear;
- `Engine.generate` of 32 prompts x 64 tokens on the tiny preset (random weights, greedy).

    python benchmarks/threads.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Callable

import torch
from common import cpu_name, greedy, timed

from openk2 import build_model, preset
from openk2.infer import Engine
from openk2.model import linear as onednn

CALLS = 200


def in_thread(fn: Callable[[], float]) -> float:
    out: list[float] = []
    worker = threading.Thread(target=lambda: out.append(fn()))
    worker.start()
    worker.join()
    return out[0]


def op_contenders() -> dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 256, generator=g), torch.randn(256, 256, generator=g)
    logits = torch.randn(32, 8192, generator=g)
    head, rows = torch.randn(8192, 256, generator=g), torch.randn(32, 256, generator=g)
    fns: dict[str, Callable[[], object]] = {
        "mm 64 x 256 x 256": lambda: x @ w,
        "softmax 32 x 8,192": lambda: logits.softmax(-1),
    }
    packed = onednn.pack(head)
    if packed is not None:
        fns["LM head 8,192 x 256, 32 rows (oneDNN packed)"] = lambda: onednn.linear(rows, packed)
    return fns


def per_call(fn: Callable[[], object]) -> Callable[[], float]:
    def run() -> float:
        for _ in range(10):
            fn()
        start = time.perf_counter()
        for _ in range(CALLS):
            fn()
        return (time.perf_counter() - start) / CALLS
    return run


def generate_rate() -> Callable[[], float]:
    model = build_model(preset("tiny"), seed=0)
    prompts = [[5 + i, 17, 33, 2, 9, 41, 7, 8] * 8 for i in range(32)]
    generate = greedy(Engine(model, max_batch=32, max_len=256), prompts)
    generate(2)
    return lambda: 32 * 64 / timed(lambda: generate(64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"# threads  torch {torch.__version__}  {cpu_name()}  {torch.get_num_threads()} threads")
    print(f"{'contender':<48}{'main thread':>14}{'other thread':>14}")
    for name, fn in op_contenders().items():
        run = per_call(fn)
        main_s, other_s = zip(*[(run(), in_thread(run)) for _ in range(args.rounds)])
        print(f"{name:<48}{min(main_s) * 1e6:>11,.1f} us{min(other_s) * 1e6:>11,.1f} us")
    run = generate_rate()
    main_r, other_r = zip(*[(run(), in_thread(run)) for _ in range(args.rounds)])
    print(f"{'Engine.generate, tiny, 32 x 64 tokens':<48}{max(main_r):>8,.0f} tok/s"
          f"{max(other_r):>8,.0f} tok/s")


if __name__ == "__main__":
    main()
