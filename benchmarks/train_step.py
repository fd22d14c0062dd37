"""Training-step throughput: openk2 vs transformers' DeepseekV3, same weights, one run.

A step is forward + backward + AdamW on a batch of 8 x 256 tokens in float32, with each
side's own training loss (openk2: the trainer's LM head fused with the cross-entropy;
transformers: logits then F.cross_entropy). For
transformers every experts/attention implementation that runs on CPU is timed and the
fastest is the reference. Also printed: achieved GFLOP/s against an fp32 matmul ceiling
measured in the same run, and the cost of openk2's MoE dispatch (routing, sort, gather,
scatter; forward + backward, all MoE layers) on its own.

    python benchmarks/train_step.py [--presets tiny small] [--steps 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from openk2 import build_model, param_counts, preset, save_model
from openk2.train.trainer import next_token_loss

BATCH, SEQ = 8, 256


def ceiling_gflops(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_flops(config) -> float:
    """Matmul FLOPs of one training step (3x forward): weights a token touches, excluding the
    embedding lookup, plus causal attention scores and values."""
    counts = param_counts(config)
    matmul_params = counts["activated"] - counts["embedding"]
    tokens = BATCH * SEQ
    attention = config.num_hidden_layers * BATCH * config.num_attention_heads * SEQ * SEQ
    attention *= (config.qk_head_dim + config.v_head_dim)  # 2 FLOPs x half the pairs (causal)
    return 3 * (2 * matmul_params * tokens + attention)


def openk2_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """openk2's training loss (train.trainer.next_token_loss: LM head fused with the loss)."""
    loss, count = next_token_loss(model, ids, None)
    return loss / count


def transformers_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def time_steps(model, loss_fn, steps: int) -> float:
    """Median seconds of a forward + backward + AdamW step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ + 1), generator=g)

    def one() -> None:
        loss_fn(model, ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    one()
    return statistics.median(_timed(one) for _ in range(steps))


def dispatch_seconds(model, steps: int) -> float:
    """Routing + sort + gather + scatter of every MoE layer, forward and backward, with the
    expert SwiGLUs replaced by the identity."""
    layers = list(model.moe_layers())
    if not layers:
        return 0.0
    D = model.config.hidden_size
    x = torch.randn(BATCH * SEQ, D, requires_grad=True)

    def one() -> None:
        total = 0
        for moe in layers:
            weights, experts, _ = moe.gate(x)
            K = experts.shape[1]
            order = experts.flatten().argsort(stable=True)
            token = order // K
            ys = x[token] * weights.flatten()[order, None]
            total = total + torch.zeros_like(x).index_add_(0, token, ys).sum()
        total.backward()

    one()
    return statistics.median(_timed(one) for _ in range(steps))


def bench_preset(name: str, steps: int, ceiling: float) -> list[dict]:
    import transformers

    config = preset(name)
    model = build_model(config, seed=0)
    rows = []
    ours = time_steps(model, openk2_loss, steps)
    flops = step_flops(config)
    rows.append({"preset": name, "impl": "openk2", "seconds": ours, "flops": flops})
    dispatch = dispatch_seconds(model, steps)
    with tempfile.TemporaryDirectory() as folder:
        save_model(model, folder)
        best = None
        for experts_impl in ("eager", "grouped_mm", "batched_mm"):
            for attn_impl in ("sdpa", "eager"):
                try:
                    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(
                        folder, dtype=torch.float32, attn_implementation=attn_impl,
                        experts_implementation=experts_impl)
                except (TypeError, ValueError) as e:
                    print(f"  transformers {experts_impl}/{attn_impl}: unavailable ({e})")
                    continue
                seconds = time_steps(hf, transformers_loss, max(2, steps // 2))
                print(f"  transformers experts={experts_impl} attention={attn_impl}: {seconds * 1e3:,.0f} ms/step")
                if best is None or seconds < best["seconds"]:
                    best = {"preset": name, "impl": f"transformers ({experts_impl}, {attn_impl})",
                            "seconds": seconds, "flops": flops}
    rows.append(best)
    tokens = BATCH * SEQ
    print(f"\n{name}: {param_counts(config)['total'] / 1e6:.1f}M parameters, "
          f"{flops / 1e9:.1f} GFLOP/step, batch {BATCH} x {SEQ}")
    print(f"{'implementation':<42}{'ms/step':>10}{'tokens/s':>11}{'GFLOP/s':>10}{'% ceiling':>11}")
    for row in rows:
        gflops = row["flops"] / row["seconds"] / 1e9
        print(f"{row['impl']:<42}{row['seconds'] * 1e3:>10,.0f}{tokens / row['seconds']:>11,.0f}"
              f"{gflops:>10,.1f}{100 * gflops / ceiling:>10.0f}%")
    print(f"openk2 / transformers tokens/s: {rows[1]['seconds'] / rows[0]['seconds']:.2f}x")
    print(f"openk2 MoE dispatch (route, sort, gather, scatter; fwd+bwd): {dispatch * 1e3:,.1f} ms/step "
          f"= {100 * dispatch / ours:.0f}% of the step")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    ceiling = ceiling_gflops()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"fp32 matmul ceiling (2048^3): {ceiling:,.1f} GFLOP/s")
    for name in args.presets:
        bench_preset(name, args.steps, ceiling)


if __name__ == "__main__":
    main()
