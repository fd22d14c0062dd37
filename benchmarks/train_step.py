"""Training-step throughput: openk2 vs transformers' DeepseekV3, same weights, one run.

A step is forward + backward + AdamW (torch's fused kernel, both sides) on a batch of 8 x 256
tokens in float32, with each side's own training loss (openk2: the trainer's LM head fused with
the cross-entropy; transformers: logits then F.cross_entropy). For transformers every experts/attention
implementation that runs on CPU is timed for one step after a warm-up one, and the fastest is
the reference (`batched_mm`, which gathers a weight copy per routed token, is skipped where that
copy would not fit in a few GiB). openk2 and the reference then run alternately, step by step,
and each side's fastest step is reported (its median beside it), so both see the same machine
load; a 2048^3 fp32 matmul runs in the same rounds, and its fastest round is the ceiling the
achieved GFLOP/s are compared with. The number of rounds defaults per preset (tiny 30, small
10): the fastest of few rounds of a short step still carries the host's load. Also printed:
and the cost of openk2's MoE dispatch (routing, sort, gather, scatter; forward + backward, all
MoE layers) on its own. `--mkl-logits` adds openk2 with the fused loss's logits product on MKL
instead of oneDNN (docs/LOG.md) as a further contender in the same rounds, and `--flash-attention`
openk2 with PyTorch's fused (flash) attention kernel instead of its explicit CPU attention
for short sequences.

    python benchmarks/train_step.py [--presets tiny small] [--steps N] [--mkl-logits] [--flash-attention]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from common import cpu_name, gflops_of_matmul, matmul, patched, rounds, timed

import openk2.model.attention as attention_module
import openk2.model.moe as moe_module
import openk2.train.loss as loss_module
from openk2 import build_model, param_counts, preset, save_model
from openk2.train.trainer import next_token_loss

BATCH, SEQ = 8, 256


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


def step_fn(model, loss_fn):
    """A forward + backward + AdamW step on a fixed batch, warmed up once. AdamW is torch's
    fused kernel (what openk2's trainer runs for its AdamW parameters), the same for both sides."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ + 1), generator=g)

    def one() -> None:
        loss_fn(model, ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    one()
    return one


def dispatch_step(model):
    """One pass of every MoE layer's routing, sort, gather and scatter, forward and backward: the
    layer's own code (`Experts.forward`) with each expert SwiGLU replaced by its gate weight
    times the identity."""
    layers = list(model.moe_layers())
    D = model.config.hidden_size
    x = torch.randn(BATCH * SEQ, D, requires_grad=True)

    def scaled_identity(xs, scale, *weights_and_sizes):
        return xs * scale

    def one() -> None:
        total = 0
        with patched(moe_module, "expert_swiglu", scaled_identity):
            for moe in layers:
                weights, experts, _ = moe.gate(x)
                counts = torch.bincount(experts.flatten(), minlength=moe.experts.num_experts)
                total = total + moe.experts(x, weights, experts, counts).sum()
        if layers:
            total.backward()

    one()
    return one


def batched_mm_bytes(config) -> int:
    """Memory of the per-token expert weight copies transformers' batched_mm gathers (forward
    copy and its gradient)."""
    pairs = BATCH * SEQ * config.num_experts_per_tok
    return 2 * pairs * 3 * config.moe_intermediate_size * config.hidden_size * 4


def pick_transformers(folder: str, config):
    """The fastest of transformers' experts/attention implementations, by one step each after a warm-up."""
    import transformers

    best = None
    for experts_impl in ("eager", "grouped_mm", "batched_mm"):
        if experts_impl == "batched_mm" and batched_mm_bytes(config) > 4 << 30:
            print(f"  transformers experts=batched_mm: skipped, its per-token weight copies need "
                  f"{batched_mm_bytes(config) / 2**30:,.0f} GiB")
            continue
        for attn_impl in ("sdpa", "eager"):
            try:
                hf = transformers.DeepseekV3ForCausalLM.from_pretrained(
                    folder, dtype=torch.float32, attn_implementation=attn_impl,
                    experts_implementation=experts_impl)
            except (TypeError, ValueError) as e:
                print(f"  transformers {experts_impl}/{attn_impl}: unavailable ({e})")
                continue
            step = step_fn(hf, transformers_loss)
            seconds = timed(step)
            print(f"  transformers experts={experts_impl} attention={attn_impl}: "
                  f"{seconds * 1e3:,.0f} ms/step")
            if best is None or seconds < best[0]:
                best = (seconds, f"transformers ({experts_impl}, {attn_impl})", step)
            del hf, step
    return best[1], best[2]


def openk2_loss_mkl_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """openk2's loss with the fused loss's logits on torch's own product (MKL) instead of oneDNN."""
    with patched(loss_module, "onednn_supports", lambda *tensors: False):
        return openk2_loss(model, ids)


def openk2_loss_flash_attention(model, ids: torch.Tensor) -> torch.Tensor:
    """openk2's loss with every layer on PyTorch's fused attention kernel (and the max-logit
    statistic in its own pass), as before the explicit CPU attention."""
    with patched(attention_module, "_EXPLICIT_ATTENTION_ELEMENTS", 0):
        return openk2_loss(model, ids)


DEFAULT_ROUNDS = {"tiny": 30, "small": 10}  # --steps when not given; 10 for other presets
CEILING = "fp32 matmul ceiling"


def bench_preset(name: str, steps: int, mkl_logits: bool = False,
                 flash_attention: bool = False) -> list[dict]:
    config = preset(name)
    model = build_model(config, seed=0)
    flops = step_flops(config)
    with tempfile.TemporaryDirectory() as folder:
        save_model(model, folder)
        label, reference = pick_transformers(folder, config)
        contenders = {"openk2": step_fn(model, openk2_loss), label: reference}
        if mkl_logits:
            contenders["openk2, loss logits on MKL"] = step_fn(model, openk2_loss_mkl_logits)
        if flash_attention:
            contenders["openk2, flash attention"] = step_fn(model, openk2_loss_flash_attention)
        contenders[CEILING] = matmul()
        times = rounds(contenders, steps)
    ceiling = gflops_of_matmul(min(times.pop(CEILING)))
    rows = [{"impl": impl, "seconds": min(t), "median": statistics.median(t)} for impl, t in times.items()]
    one_dispatch = dispatch_step(model)
    dispatch = min(timed(one_dispatch) for _ in range(steps))
    tokens = BATCH * SEQ
    print(f"\n{name}: {param_counts(config)['total'] / 1e6:.1f}M parameters, "
          f"{flops / 1e9:.1f} GFLOP/step, batch {BATCH} x {SEQ}, {steps} alternating steps each")
    print(f"fp32 matmul ceiling (2048^3, fastest of the same rounds): {ceiling:,.1f} GFLOP/s")
    print(f"{'implementation':<36}{'ms/step':>9}{'(median)':>10}{'tokens/s':>10}"
          f"{'GFLOP/s':>9}{'% ceiling':>11}")
    for row in rows:
        gflops = flops / row["seconds"] / 1e9
        print(f"{row['impl']:<36}{row['seconds'] * 1e3:>9,.0f}{row['median'] * 1e3:>10,.0f}"
              f"{tokens / row['seconds']:>10,.0f}{gflops:>9,.1f}{100 * gflops / ceiling:>10.0f}%")
    print(f"openk2 / transformers tokens/s: {rows[1]['seconds'] / rows[0]['seconds']:.2f}x "
          f"(medians: {rows[1]['median'] / rows[0]['median']:.2f}x)")
    print(f"openk2 MoE dispatch (route, sort, gather, scatter; fwd+bwd): {dispatch * 1e3:,.1f} ms/step "
          f"= {100 * dispatch / rows[0]['seconds']:.0f}% of the step")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=None,
                        help="alternating steps per side (default: tiny 30, small 10); the best and the "
                             "median are reported")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--mkl-logits", action="store_true",
                        help="also time openk2 with the loss's logits on MKL instead of oneDNN")
    parser.add_argument("--flash-attention", action="store_true",
                        help="also time openk2 with PyTorch's fused attention kernel in every layer")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    for name in args.presets:
        steps = args.steps or DEFAULT_ROUNDS.get(name, 10)
        bench_preset(name, steps, args.mkl_logits, args.flash_attention)


if __name__ == "__main__":
    main()
