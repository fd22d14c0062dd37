"""What the benchmark scripts share: the CPU's name, timing contenders round-robin, and the
square-matmul ceiling the achieved GFLOP/s are compared with.

Contenders always run alternately, round by round, and each reports its fastest round: load
from other processes then hits every contender alike, and the minimum is the least disturbed.
"""

from __future__ import annotations

import contextlib
import platform
import subprocess
import time
from typing import Callable

import torch

CEILING_N = 2048  # the square matmul that sets the ceiling


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rounds(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of every round of each contender, the contenders run round-robin."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return times


def best_of(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Fastest round of each contender (see `rounds`)."""
    return {name: min(t) for name, t in rounds(fns, repeats, warmup).items()}


def greedy(engine, prompts: list[list[int]]) -> Callable[[int], list]:
    """`generate(n)`: the engine's greedy completions of `prompts`, n tokens each (EOS ignored)."""
    from openk2.infer import SamplingParams

    return lambda n: engine.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))


def decode_step_seconds(generate: Callable[[int], object], tokens: int) -> float:
    """Seconds per decode step of `generate(n)`: an n = `tokens` run minus a 1-token run, so the
    prefill cancels out."""
    return (timed(lambda: generate(tokens)) - timed(lambda: generate(1))) / (tokens - 1)


def matmul(dtype: torch.dtype = torch.float32) -> Callable[[], torch.Tensor]:
    """A CEILING_N^3 matmul, to time beside the contenders."""
    a, b = torch.randn(CEILING_N, CEILING_N, dtype=dtype), torch.randn(CEILING_N, CEILING_N, dtype=dtype)
    out = torch.empty(CEILING_N, CEILING_N, dtype=dtype)
    return lambda: torch.mm(a, b, out=out)


def gflops_of_matmul(seconds: float) -> float:
    return 2 * CEILING_N**3 / seconds / 1e9


@contextlib.contextmanager
def patched(module, name: str, value):
    """Set module.name to value for the duration of the block (an A/B contender's variant)."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)
