"""Small kernels behind two docs/LOG.md entries, timed round-robin (best round of each):

- RMSNorm forward + backward on [8 x 256, 256] float32: openk2's hand-written autograd function
  against the same formula left to autograd;
- the tiny preset's batch-8 decode matmuls: routed experts (8 experts of [256 -> 2 x 128], 2 of
  them per token) as torch._grouped_mm (what the engine runs), as a per-expert loop in both
  orientations and as a zero-padded batched matmul; and the [8,192 x 256] LM head against 8
  rows in three orientations.

    python benchmarks/kernels.py [--rounds 15]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import best_of, cpu_name

from openk2.model.norm import RMSNorm

E, D, I, N, K, V = 8, 256, 128, 8, 2, 8192
CALLS = 20  # calls per timed round: single calls of ~100 us are below the timer's noise


def repeated(fns: dict) -> dict:
    def run(fn):
        def many() -> None:
            for _ in range(CALLS):
                fn()
        return many
    return {name: run(fn) for name, fn in fns.items()}


def rms_norm_contenders() -> dict:
    norm = RMSNorm(D)
    x = torch.randn(8, 256, D, requires_grad=True)
    g = torch.randn(8, 256, D)

    def formula() -> None:
        y = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))
        y.backward(g)

    return {"rmsnorm: openk2 (hand-written backward)": lambda: norm(x).backward(g),
            "rmsnorm: formula under autograd": formula}


def decode_contenders() -> dict:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(E, 2 * I, D, generator=g)      # [E, out, in]
    w_t = w.transpose(1, 2).contiguous()            # [E, in, out]: torch._grouped_mm's layout
    x = torch.randn(N, D, generator=g)
    experts = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    flat = experts.flatten()
    order = flat.argsort(stable=True)
    xs, sorted_experts = x[order // K], flat[order]
    counts = torch.bincount(flat, minlength=E)
    offsets = counts.cumsum(0).to(torch.int32)
    sizes = counts.tolist()
    head = torch.randn(V, D, generator=g)
    head_t = head.t().contiguous()
    h = torch.randn(N, D, generator=g)

    def loop(rows_first: bool):
        def run() -> torch.Tensor:
            chunks = [c for c in xs.split(sizes)]
            return torch.cat([c @ w_t[e] if rows_first else (w[e] @ c.t()).t()
                              for e, c in enumerate(chunks) if c.shape[0]])
        return run

    def padded() -> torch.Tensor:
        slot = torch.arange(N * K) - (offsets - counts)[sorted_experts]
        buf = x.new_zeros(E, D, max(sizes))
        buf[sorted_experts, :, slot] = xs
        return torch.bmm(w, buf)[sorted_experts, :, slot]

    grouped = lambda: torch._grouped_mm(xs, w_t, offs=offsets)  # noqa: E731
    for name, fn in (("loop", loop(True)), ("loop t", loop(False)), ("padded", padded)):
        torch.testing.assert_close(fn(), grouped(), rtol=1e-4, atol=1e-4, msg=name)
    return {
        "experts: torch._grouped_mm (engine)": grouped,
        "experts: per-expert loop, x @ W": loop(True),
        "experts: per-expert loop, W @ x^T": loop(False),
        "experts: zero-padded bmm": padded,
        "lm head: W @ x^T (engine)": lambda: torch.mm(head, h.t()),
        "lm head: x @ W^T copy": lambda: torch.mm(h, head_t),
        "lm head: F.linear": lambda: F.linear(h, head),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    print(f"# kernels  torch {torch.__version__}  {cpu_name()}  {torch.get_num_threads()} threads")
    with torch.inference_mode():
        decode = best_of(repeated(decode_contenders()), args.rounds, warmup=3)
    train = best_of(repeated(rms_norm_contenders()), args.rounds, warmup=3)
    for name, seconds in {**train, **decode}.items():
        print(f"{name:<44}{seconds / CALLS * 1e6:>10,.1f} us per call")


if __name__ == "__main__":
    main()
