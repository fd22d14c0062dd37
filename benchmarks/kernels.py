"""Small kernels behind docs/LOG.md entries, timed round-robin (best round of each):

- RMSNorm forward + backward on [8 x 256, 256] float32: openk2's hand-written autograd function
  against the same formula left to autograd;
- the tiny preset's batch-8 decode matmuls: routed experts (8 experts of [256 -> 2 x 128], 2 of
  them per token) as torch._grouped_mm (the engine's sparse path), as a per-expert loop in both
  orientations, as a zero-padded batched matmul, and every expert on every token through
  oneDNN's linear on a pre-packed weight (the engine's path when the tokens touch >= E
  experts); and the [8,192 x 256] LM head against 8 rows in three MKL orientations and
  through oneDNN's pre-packed linear (the engine's);
- float32 GEMMs of the training step, MKL (torch.mm) against oneDNN's linear on the plain
  weight: a 1,024^3 product and the tiny LM-head loss's three products for one 512-row chunk;
- one tiny layer's attention core, forward + backward with the max-logit statistic (8 x 4 heads
  x 256 tokens): the explicit CPU path against the fused kernel (v padded, statistic in its own
  pass, q/k concatenated); and the softmax of its last row block ([32 x 64 x 256]) into a new
  tensor against in place (the core's, since 2026-12-01);
- one tiny MoE layer, forward + backward: the routed outputs added in place into the shared
  expert's output (model/moe.py, since 2026-12-01) against summed into zeros and then added to it;
- the fused LM-head loss (train/loss.py), forward + backward over 2,048 rows, by rows per chunk:
  the small preset's shape ([2,048 x 512] against a 32,768-token head) at 128 and 512 rows,
  the tiny preset's at 256 and 512 (timed per call, fewer rounds);
- that loss's element-wise work on one 512-row chunk of float32 logits (tiny's 8,192 and
  small's 32,768 columns): amax, shift, exp, sum and scale as five passes over the chunk (the
  loss until 2026-12-01) against one in-place softmax (`torch.softmax(out=)`, now), each
  after the same copy that restores its input;
- Muon's bf16 passes on the small preset's shapes (per call): b A + c A^2 over the expert
  class's [336 x 256 x 256] Gram matrices as one baddbmm against a product plus an add, and the
  Nesterov input G + mu M of 14 expert tensors [16 x 256 x 512] written by an add straight into
  the bf16 batch against one through a kept float32 buffer;
- Newton-Schulz numerics (not a timing): relative error against a float64 plain iteration of
  the plain form, the Gram form, and the Gram form without its midway restart, on Gaussian
  matrices and on matrices whose singular values fall from 1 to 1e-4, float32 and bfloat16.

    python benchmarks/kernels.py [--rounds 15]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import best_of, cpu_name, patched

import openk2.optim.muon as muon
import openk2.train.loss as loss_module
from openk2 import preset
from openk2.model import attention
from openk2.model.moe import MoE
from openk2.model import linear as onednn
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
    all_experts = onednn.pack(w.reshape(E * 2 * I, D))
    dense = lambda: onednn.linear(x, all_experts)  # noqa: E731  [N, E * 2I]: every expert, every token
    chosen = dense().view(N, E, 2 * I)[torch.arange(N)[:, None], experts].flatten(0, 1)[order]
    torch.testing.assert_close(chosen, grouped(), rtol=1e-4, atol=1e-4, msg="dense")
    packed_head = onednn.pack(head)
    return {
        "experts: torch._grouped_mm (sparse)": grouped,
        "experts: per-expert loop, x @ W": loop(True),
        "experts: per-expert loop, W @ x^T": loop(False),
        "experts: zero-padded bmm": padded,
        "experts: all on all tokens, packed (engine)": dense,
        "lm head: W @ x^T": lambda: torch.mm(head, h.t()),
        "lm head: x @ W^T copy": lambda: torch.mm(h, head_t),
        "lm head: F.linear": lambda: F.linear(h, head),
        "lm head: oneDNN packed (engine)": lambda: onednn.linear(h, packed_head),
    }


def gemm_contenders() -> dict:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1024, 1024, generator=g), torch.randn(1024, 1024, generator=g)
    rows = 512  # one chunk of the fused LM-head loss at the tiny vocabulary (train/loss.py)
    h, head = torch.randn(rows, D, generator=g), torch.randn(V, D, generator=g)
    d_logits, grad_head = torch.randn(rows, V, generator=g), torch.zeros(V, D)
    head_t = head.t().contiguous()
    torch.testing.assert_close(onednn.linear(h, head), h @ head.T, rtol=1e-4, atol=1e-3)
    return {
        "gemm 1024^3: torch.mm (MKL)": lambda: torch.mm(a, b.T),
        "gemm 1024^3: oneDNN linear": lambda: onednn.linear(a, b),
        "loss chunk logits: h @ W^T (MKL)": lambda: h @ head.T,
        "loss chunk logits: oneDNN linear": lambda: onednn.linear(h, head),
        "loss chunk dh: dlogits @ W (MKL)": lambda: d_logits @ head,
        "loss chunk dh: oneDNN, W^T copied": lambda: onednn.linear(d_logits, head.t().contiguous()),
        "loss chunk dh: oneDNN, W^T kept": lambda: onednn.linear(d_logits, head_t),
        "loss chunk dW: addmm_ (MKL)": lambda: grad_head.addmm_(d_logits.T, h),
        "loss chunk dW: oneDNN on views": lambda: grad_head.add_(onednn.linear(d_logits.t(), h.t())),
    }


def attention_contenders() -> dict:
    config = preset("tiny")
    attn = attention.MLAttention(config, layer_idx=0)
    B, T, H = 8, 256, config.num_attention_heads
    g = torch.Generator().manual_seed(0)
    shapes = {"q_nope": (B, H, T, attn.nope_dim), "q_rope": (B, H, T, attn.rope_dim),
              "k_nope": (B, H, T, attn.nope_dim), "k_rope": (B, 1, T, attn.rope_dim),
              "v": (B, H, T, attn.v_dim)}
    inputs = {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}
    grad = torch.randn(B, H, T, attn.v_dim, generator=g)

    def step(explicit: bool):
        def run() -> None:
            leaves = {name: t.clone().requires_grad_() for name, t in inputs.items()}
            if explicit:
                out, _ = attention._ExplicitMLAttention.apply(*leaves.values(), attn.softmax_scale)
            else:
                out = attn._fused_attention(*leaves.values())
            out.backward(grad)
        return run

    return {"attention core: explicit (CPU path)": step(True),
            "attention core: fused kernel + statistic": step(False)}


def block_softmax_contenders() -> dict:
    source = torch.randn(32, 64, 256, generator=torch.Generator().manual_seed(0))
    work = torch.empty_like(source)
    return {"attention block softmax: new tensor": lambda: torch.softmax(work.copy_(source), dim=-1),
            "attention block softmax: in place (core)": lambda: torch.softmax(work.copy_(source), dim=-1,
                                                                              out=work)}


def moe_combine_contenders() -> dict:
    torch.manual_seed(0)
    moe = MoE(preset("tiny"))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(8, 256, D, requires_grad=True)
    grad = torch.randn(8, 256, D)

    def into_zeros() -> None:  # the layer's forward as it was: zeros + index_add_, then + shared
        flat = x.reshape(-1, D)
        weights, experts, _ = moe.gate(flat)
        counts = torch.bincount(experts.flatten(), minlength=E)
        (moe.experts(flat, weights, experts, counts) + moe.shared_experts(flat)).view_as(x).backward(grad)

    return {"moe layer fwd+bwd: routed into zeros, + shared": into_zeros,
            "moe layer fwd+bwd: routed into shared (moe.py)": lambda: moe(x).backward(grad)}


def loss_chunk_contenders() -> dict:
    g = torch.Generator().manual_seed(0)

    def step(vocab: int, hidden: int, rows: int):
        h = torch.randn(2048, hidden, generator=g, requires_grad=True)
        head = (torch.randn(vocab, hidden, generator=g) * 0.02).requires_grad_()
        targets = torch.randint(0, vocab, (2048,), generator=g)

        def run() -> None:
            h.grad = head.grad = None
            with patched(loss_module, "chunk_rows", lambda vocab, device_type: rows):
                loss_module.linear_cross_entropy(h, head, targets, recompute=False).backward()
        return run

    return {f"loss fwd+bwd, V {vocab:,} D {hidden}: {rows} rows/chunk": step(vocab, hidden, rows)
            for vocab, hidden, rows in ((32768, 512, 128), (32768, 512, 512), (8192, 256, 256),
                                        (8192, 256, 512))}


def softmax_contenders() -> dict:
    g = torch.Generator().manual_seed(0)
    contenders = {}
    for vocab in (8192, 32768):
        source = torch.randn(512, vocab, generator=g) * 3
        work = torch.empty_like(source)

        def five_passes(source=source, work=work) -> None:
            logits = work.copy_(source)
            top = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(top).exp_()
            probs.mul_(probs.sum(dim=-1, keepdim=True).reciprocal_())

        def in_place(source=source, work=work) -> None:
            torch.softmax(work.copy_(source), dim=-1, out=work)

        contenders[f"softmax [512 x {vocab:,}]: five passes (before)"] = five_passes
        contenders[f"softmax [512 x {vocab:,}]: in place (loss.py)"] = in_place
    return contenders


def muon_pass_contenders() -> dict:
    g = torch.Generator().manual_seed(0)
    a, b, c = muon.NS_COEFFICIENTS
    A = torch.randn(336, 256, 256, generator=g).bfloat16()
    out = torch.empty_like(A)
    grads = [torch.randn(16, 256, 512, generator=g) for _ in range(14)]
    momenta = [torch.randn(16, 256, 512, generator=g) for _ in range(14)]
    batch = torch.empty(14 * 16, 256, 512, dtype=torch.bfloat16)
    kept = torch.empty(16, 256, 512)

    def fill_direct() -> None:
        for k, (grad, m) in enumerate(zip(grads, momenta)):
            torch.add(grad, m, alpha=0.95, out=batch[16 * k : 16 * (k + 1)])

    def fill_kept() -> None:
        for k, (grad, m) in enumerate(zip(grads, momenta)):
            batch[16 * k : 16 * (k + 1)].copy_(torch.add(grad, m, alpha=0.95, out=kept))

    return {
        "bA + cA^2 bf16: baddbmm(beta=b)": lambda: torch.baddbmm(A, A, A, beta=b, alpha=c, out=out),
        "bA + cA^2 bf16: product + add (muon.py)": lambda: muon._quadratic(A, b, c, out),
        "G + mu M into bf16: add straight in": fill_direct,
        "G + mu M into bf16: via a kept fp32 buffer": fill_kept,
    }


def newton_schulz_errors() -> list[str]:
    """Rows of relative errors against a float64 plain iteration (see the module docstring)."""
    g = torch.Generator().manual_seed(0)

    def decaying(n: int, m: int, k: int) -> torch.Tensor:
        u = torch.linalg.qr(torch.randn(n, m, m, generator=g))[0]
        v = torch.linalg.qr(torch.randn(n, k, m, generator=g))[0]
        return u @ torch.diag_embed(torch.logspace(0, -4, m).expand(n, m)) @ v.mT

    def ns(x: torch.Tensor, gram: bool, restart: bool = True) -> torch.Tensor:
        with (patched(muon, "_gram_is_cheaper", muon._gram_is_cheaper if gram else lambda *shape: False),
              patched(muon, "_gram_restart", muon._gram_restart if restart else lambda steps: steps)):
            return muon.zeropower_via_newtonschulz(x.clone()).double()

    rows = []
    for kind, (m, k) in (("gaussian", (256, 512)), ("decaying", (256, 512)), ("decaying", (128, 1024))):
        x = torch.randn(8, m, k, generator=g) if kind == "gaussian" else decaying(8, m, k)
        exact = ns(x.double(), gram=False)
        for dtype in (torch.float32, torch.bfloat16):
            cells = []
            for label, out in (("plain", ns(x.to(dtype), gram=False)), ("gram", ns(x.to(dtype), gram=True)),
                               ("gram, no restart", ns(x.to(dtype), gram=True, restart=False))):
                error = float((out - exact).norm() / exact.norm())
                cells.append(f"{label} {error:.1e} (sigma_max {float(torch.linalg.svdvals(out).max()):.2f})")
            rows.append(f"newton-schulz {kind} {m}x{k} {str(dtype)[6:]:<9}" + ", ".join(cells))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    if not onednn.AVAILABLE:
        raise SystemExit("benchmarks/kernels.py compares against oneDNN: this torch build has none")
    print(f"# kernels  torch {torch.__version__}  {cpu_name()}  {torch.get_num_threads()} threads")
    with torch.inference_mode():
        decode = best_of(repeated(decode_contenders()), args.rounds, warmup=3)
    train = best_of(repeated(rms_norm_contenders()), args.rounds, warmup=3)
    with torch.no_grad():
        gemm = best_of(repeated(gemm_contenders()), args.rounds)
    core = best_of(repeated(attention_contenders()), max(3, args.rounds // 3))
    blocks = best_of(repeated(block_softmax_contenders()), args.rounds)
    for name, seconds in {**train, **decode, **gemm, **core, **blocks}.items():
        print(f"{name:<44}{seconds / CALLS * 1e6:>10,.1f} us per call")
    with torch.no_grad():
        passes = best_of({**softmax_contenders(), **muon_pass_contenders()}, args.rounds)
    losses = best_of(loss_chunk_contenders(), max(5, args.rounds // 2))
    combine = best_of(moe_combine_contenders(), 2 * args.rounds)
    for name, seconds in {**passes, **losses, **combine}.items():
        print(f"{name:<52}{seconds * 1e3:>10,.1f} ms per call")
    print("\n".join(newton_schulz_errors()))


if __name__ == "__main__":
    main()
