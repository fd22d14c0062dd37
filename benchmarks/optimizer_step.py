"""One optimizer step on the tiny and small presets: fused AdamW, openk2 MuonClip, and a
per-matrix Muon reference, side by side in one run.

    python benchmarks/optimizer_step.py [--presets tiny small] [--repeats 5] [--threads 2]

- adamw (fused): torch.optim.AdamW(fused=True) over every parameter (foreach where fused is
  unavailable). The cost floor of any optimizer step.
- reference: what one would write with torch alone for a transformers-shaped model.
  torch.optim.Muon (bf16 Newton–Schulz, match_rms_adamw) on the 2-D hidden matrices, the same
  torch code looped over every routed-expert matrix in transformers 5.x's layout (fused
  gate_up [2I, D] per expert, as `DeepseekV3Experts` stores it, and down [D, I]), fused AdamW
  for embedding, LM head, norms and router. openk2 keeps gate and up separate (the released
  checkpoint's layout), which is also fewer Newton–Schulz FLOPs.
- reference with float32 NS: the same step with torch's Newton–Schulz written out in float32, the
  reference's algorithm without its dtype; the last row of each preset compares MuonClip's
  float32 step with it.
- muonclip fp32 / bf16: openk2's step (build_optimizer defaults: Muon + AdamW + QK-Clip + router
  bias + non-finite check) with Newton–Schulz in float32 (the default) or bfloat16.

Newton–Schulz FLOPs are counted per matrix in the form it runs (`newton_schulz_flops`: 5 steps x
(4 m^2 n + 2 m^3), m <= n, for the plain iteration, fewer for the Gram form); achieved
GFLOP/s time Newton–Schulz alone on the batches MuonClip builds, against a large square matmul
of the same dtype, measured in the same rounds. All contenders run round-robin and each
reports its best round (--repeats rounds for small, twice that for tiny, after warm-up), since
the machine may be shared: compare ratios within one run.

On a CPU without a fast bf16 path (AVX2 only, no AVX-512: torch then runs a bf16 product tens
of times slower than float32), the bf16 contenders would take hours, so the script measures
that first. There it skips MuonClip with bf16 Newton–Schulz and projects the reference, whose
bf16 Newton–Schulz is torch's own: its step is timed with the Newton–Schulz calls stubbed out
(the momentum, casts and updates still run), and each distinct matrix shape's real torch
Newton–Schulz is timed once and counted as often as the step calls it. `--project-reference`
times the reference and prints the projection beside it, on any CPU, to check one against the
other (on such a CPU, affordable on tiny only).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch
import torch.optim._muon as torch_muon
from common import CEILING_N, best_of, cpu_name, gflops_of_matmul, matmul, patched, timed

import openk2
from openk2.optim import OptimConfig, build_optimizer, classify_parameters, newton_schulz_flops
from openk2.optim import zeropower_via_newtonschulz


def make_model(name: str):
    model = openk2.build_model(openk2.preset(name), seed=0)
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return model


def fill_stats(model, generator: torch.Generator) -> None:
    """Statistics a forward would leave: a few heads above tau, random expert loads."""
    for attn in model.attention_layers():
        attn.max_logits.copy_(torch.rand(attn.num_heads, generator=generator) * 150)
    for moe in model.moe_layers():
        moe.tokens_per_expert.copy_(torch.randint(0, 100, moe.tokens_per_expert.shape, generator=generator))


class Reference:
    """What one writes with torch alone on a transformers-shaped model: torch.optim.Muon on the
    2-D matrices, the same torch code looped over every routed-expert matrix in transformers
    5.x's layout (fused gate_up [E, 2I, D] and down [E, D, I]), fused AdamW for the rest."""

    def __init__(self, model, lr=2e-4, wd=0.1):
        roles = classify_parameters(model)
        self.matrices = [r.param for r in roles if r.algorithm == "muon" and r.role != "expert"]
        others = [r.param for r in roles if r.algorithm == "adamw"]
        self.stacked = []
        for experts in (m for m in model.modules() if isinstance(m, openk2.model.Experts)):
            gate_up = torch.cat([experts.gate_proj.detach(), experts.up_proj.detach()], dim=1)
            gate_up.grad = torch.cat([experts.gate_proj.grad, experts.up_proj.grad], dim=1)
            down = experts.down_proj.detach().clone()
            down.grad = experts.down_proj.grad.clone()
            self.stacked += [gate_up, down]
        self.muon = torch.optim.Muon(self.matrices, lr=lr, weight_decay=wd, adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW(others, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd,
                                       fused=True)
        self.expert_momenta = [torch.zeros_like(p) for p in self.stacked]
        self.lr, self.wd = lr, wd

    @torch.no_grad()
    def step(self):
        self.muon.step()
        self.adamw.step()
        for p, buf in zip(self.stacked, self.expert_momenta):
            torch_muon._single_tensor_muon(
                list(p.unbind(0)), list(p.grad.unbind(0)), list(buf.unbind(0)), lr=self.lr,
                weight_decay=self.wd, momentum=0.95, nesterov=True,
                ns_coefficients=(torch_muon.DEFAULT_A, torch_muon.DEFAULT_B, torch_muon.DEFAULT_C),
                ns_steps=5, eps=torch_muon.EPS, adjust_lr_fn="match_rms_adamw", has_complex=False)


def float32_newton_schulz(grad, ns_coefficients, ns_steps, eps):
    """torch.optim.Muon's Newton–Schulz as torch writes it, in float32 instead of bf16: the
    reference's algorithm without its dtype, for CPUs where bf16 matmuls are slow."""
    a, b, c = ns_coefficients
    tall = grad.size(0) > grad.size(1)
    x = grad.float().T if tall else grad.float()
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def project_reference(ref: Reference, repeats: int) -> tuple[float, str]:
    """Seconds of one reference step, projected: the step with torch's Newton–Schulz stubbed out
    (best of `repeats`), plus each distinct shape's real Newton–Schulz (best of 2) times the
    number of calls of that shape. Returns the seconds and a note for the table."""
    calls: Counter[tuple[int, ...]] = Counter()
    real = torch_muon._zeropower_via_newtonschulz

    def stub(grad, ns_coefficients, ns_steps, eps):
        calls[tuple(grad.shape)] += 1
        return grad.bfloat16()  # what the real one returns: a bf16 matrix of the same shape

    with patched(torch_muon, "_zeropower_via_newtonschulz", stub):
        ref.step()
        per_step = Counter(calls)  # the shapes of one step's calls (the timed steps count on)
        rest = min(timed(ref.step) for _ in range(repeats))
    g = torch.Generator().manual_seed(3)
    args = ((torch_muon.DEFAULT_A, torch_muon.DEFAULT_B, torch_muon.DEFAULT_C), 5, torch_muon.EPS)
    ns = 0.0
    for shape, n in per_step.items():
        grad = torch.randn(shape, generator=g)
        ns += n * min(timed(lambda: real(grad, *args)) for _ in range(2))
    note = (f"projected: {rest * 1e3:,.0f} ms without NS + {sum(per_step.values())} NS calls "
            f"of {len(per_step)} shapes timed one each")
    return rest + ns, note


def bf16_matmul_ratio(n: int = 256) -> float:
    """How many times slower a bf16 [n, n] product runs than a float32 one (best of 3)."""
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(n, n).to(dtype)
        a @ a
        seconds[dtype] = min(timed(lambda: a @ a) for _ in range(3))
    return seconds[torch.bfloat16] / seconds[torch.float32]


def muon_shape_classes(model) -> dict[tuple[int, int], int]:
    """(rows, cols) -> number of matrices, as MuonClip batches them (tall and wide apart)."""
    classes: dict[tuple[int, int], int] = {}
    for r in classify_parameters(model):
        if r.algorithm == "muon":
            key = tuple(r.param.shape[-2:])
            classes[key] = classes.get(key, 0) + (r.param.shape[0] if r.param.ndim == 3 else 1)
    return classes


def bench_preset(name: str, repeats: int, ceilings: dict[str, float], bf16: bool,
                 project: bool) -> list[list[str]]:
    """Rows of the table for one preset; updates `ceilings` (GFLOP/s per dtype) with the best
    square matmul seen in this preset's rounds. Without `bf16` the bf16 contenders are skipped
    and the reference is projected (see the module docstring); `project` adds the projection
    beside a timed reference."""
    timed_reference = bf16 or project
    g = torch.Generator().manual_seed(2)
    classes = muon_shape_classes(make_model(name))
    ns_flops = sum(newton_schulz_flops((count, rows, cols)) for (rows, cols), count in classes.items())
    dtypes = ("float32", "bfloat16") if bf16 else ("float32",)

    contenders = {f"mm {dtype}": matmul(getattr(torch, dtype)) for dtype in dtypes}
    model = make_model(name)
    adamw = torch.optim.AdamW(model.parameters(), lr=2e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                              fused=True)
    contenders["adamw"] = adamw.step
    if timed_reference:
        contenders["reference"] = Reference(make_model(name)).step
    fp32_reference = Reference(make_model(name))

    def fp32_reference_step(ref=fp32_reference):
        with patched(torch_muon, "_zeropower_via_newtonschulz", float32_newton_schulz):
            ref.step()

    contenders["reference fp32"] = fp32_reference_step
    ns_inputs = {}
    for ns_dtype in dtypes:
        model = make_model(name)
        opt = build_optimizer(model, OptimConfig(ns_dtype=ns_dtype))

        def step(model=model, opt=opt):
            fill_stats(model, g)
            opt.step()

        contenders[f"muonclip {ns_dtype}"] = step
        dtype = getattr(torch, ns_dtype)
        inputs = [torch.randn(count, rows, cols, dtype=dtype) for (rows, cols), count in classes.items()]
        buffers = [torch.empty_like(x) for x in inputs]
        ns_inputs[ns_dtype] = inputs

        def newton_schulz(inputs=inputs, buffers=buffers, workspace={}):
            for x, buf in zip(inputs, buffers):
                zeropower_via_newtonschulz(buf.copy_(x), workspace=workspace)

        def copy_only(inputs=inputs, buffers=buffers):
            for x, buf in zip(inputs, buffers):
                buf.copy_(x)

        contenders[f"ns {ns_dtype}"] = newton_schulz
        contenders[f"copy {ns_dtype}"] = copy_only
    rounds = 2 * repeats if name == "tiny" else repeats
    best = best_of(contenders, rounds, warmup=1 if name != "tiny" else 2)
    for dtype in dtypes:
        ceilings[dtype] = max(ceilings.get(dtype, 0.0), gflops_of_matmul(best[f"mm {dtype}"]))

    def ms(seconds: float) -> str:
        return f"{seconds * 1e3:,.1f}"

    reference = "reference: torch Muon per matrix (bf16 NS)"
    extra = []
    if timed_reference:
        t_ref = best["reference"]
    if not bf16 or project:
        t_proj, note = project_reference(Reference(make_model(name)), rounds)
        if timed_reference:  # the timed reference sets the ratios; the projection is shown beside it
            extra = [[name, f"{reference}, {note}", ms(t_proj), f"{t_ref / t_proj:.2f}x", "", "", ""]]
        else:
            t_ref, reference = t_proj, f"{reference}, {note}"
    t_fp32 = best["reference fp32"]
    rows = [[name, "adamw (fused)", ms(best["adamw"]), f"{t_ref / best['adamw']:.1f}x", "", "", ""],
            [name, reference, ms(t_ref), "1.0x", "", "", ""], *extra,
            [name, "reference with float32 NS (torch's code in float32)", ms(t_fp32),
             f"{t_ref / t_fp32:.2f}x", "", "", ""]]
    for ns_dtype in dtypes:
        t_ns = max(best[f"ns {ns_dtype}"] - best[f"copy {ns_dtype}"], 1e-9)
        gflops = ns_flops / t_ns / 1e9
        t_step = best[f"muonclip {ns_dtype}"]
        rows.append([name, f"muonclip ({ns_dtype} NS)", ms(t_step), f"{t_ref / t_step:.2f}x",
                     f"{ns_flops / 1e9:,.1f} ({sum(classes.values())} matrices, {len(classes)} batches)",
                     f"{gflops:,.0f} in {ms(t_ns)} ms",
                     f"{100 * gflops / ceilings[ns_dtype]:.0f}% of {ceilings[ns_dtype]:,.0f}"])
    if not bf16:
        rows.append([name, "muonclip (bfloat16 NS)", "skipped: no fast bf16 matmul", "", "", "", ""])
    rows.append([name, "muonclip (float32 NS) vs the float32-NS reference", "",
                 f"{t_fp32 / best['muonclip float32']:.2f}x", "", "", ""])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--project-reference", action="store_true",
                        help="also project the reference from per-shape Newton–Schulz timings")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# optimizer step  torch {torch.__version__}  {cpu_name()}  {torch.get_num_threads()} threads  "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    slowdown = bf16_matmul_ratio()
    bf16 = slowdown < 4.0  # bf16 took 0.43x float32's time on an AVX-512 BF16 EPYC, 56-70x on AVX2
    if not bf16:
        print(f"# a bf16 matmul runs {slowdown:,.0f}x slower than float32 on this CPU (no fast bf16 path): "
              "MuonClip with bf16 Newton–Schulz is skipped and the reference is projected")
    ceilings: dict[str, float] = {}
    header = ["preset", "optimizer", "ms/step (best)", "reference ÷ this", "NS GFLOP/step", "NS GFLOP/s",
              "vs matmul ceiling"]
    rows = []
    for name in args.presets:
        rows += bench_preset(name, args.repeats, ceilings, bf16, args.project_reference)
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    print(f"# matmul ceiling ({CEILING_N}^2 mm, best round): "
          + ", ".join(f"{dtype} {gflops:,.0f} GFLOP/s" for dtype, gflops in ceilings.items()))
    print("# goals: muonclip step >= 2x faster than the reference; "
          "Newton–Schulz >= 60% of the matmul ceiling")


if __name__ == "__main__":
    main()
