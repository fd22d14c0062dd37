"""Distributed training step: time, communication volume and the cost of distributed Muon,
for one process and for 2-process FSDP / EP / FSDP+EP layouts (gloo on CPU, or NCCL on GPUs).

    python benchmarks/distributed.py [--preset tiny] [--seq-len 256] [--batch-size 8] [--steps 5]

Every layout trains the same model on the same global batch (train.batch_size sequences per
step, split over the ranks) with MuonClip, as `openk2 pretrain` does (train/distributed.py).
Communication is counted by wrapping the torch.distributed collectives that FSDP2, the
expert-parallel all-to-all and distributed Muon call; a rank's bytes per step are the sizes of
the buffers it passes in (all-reduce: the tensor; all-gather: its shard; reduce-scatter: the
unsharded input; all-to-all: what it sends). Newton–Schulz time is measured around
`zeropower_via_newtonschulz`; "matrices" counts the matrices this rank orthogonalised.

Each process runs --threads-per-process threads (default 1: an OpenMP team that shares a core
with another busy process stalls badly). On a 2-core machine 2 processes cannot beat one by
much, and not at all when a core is busy elsewhere: the 2-process rows measure overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import openk2
from openk2.optim import OptimConfig, build_optimizer, newton_schulz_flops
from openk2.train.trainer import next_token_loss

LAYOUTS = {  # name: (processes, dp_shard, ep)
    "single": (1, 1, 1),
    "fsdp": (2, 2, 1),
    "ep": (2, 1, 2),
    "fsdp+ep": (2, 2, 2),
}
COLLECTIVES = {  # torch.distributed function -> reported kind, index of the buffer counted
    "all_reduce": ("all-reduce", 0),
    "all_gather_single": ("all-gather", 1),
    "all_gather_into_tensor": ("all-gather", 1),
    "reduce_scatter_single": ("reduce-scatter", 1),
    "reduce_scatter_tensor": ("reduce-scatter", 1),
    "all_to_all_single": ("all-to-all", 1),
    "broadcast": ("broadcast", 0),
}


class Counter:
    """Wraps the collectives and Newton–Schulz; `phase` attributes bytes to a part of the step."""

    def __init__(self):
        self.bytes = defaultdict(int)
        self.phase = "model"
        self.ns_seconds = 0.0
        self.ns_matrices = 0
        self.ns_flops = 0

    def install(self) -> None:
        import openk2.optim.muon as muon

        for name, (kind, index) in COLLECTIVES.items():
            original = getattr(dist, name)

            def wrapped(*args, _original=original, _kind=kind, _index=index, **kwargs):
                tensor = args[_index] if len(args) > _index else next(iter(kwargs.values()))
                self.bytes[(self.phase, _kind)] += tensor.numel() * tensor.element_size()
                return _original(*args, **kwargs)

            setattr(dist, name, wrapped)
        original_ns = muon.zeropower_via_newtonschulz

        def timed(X, *args, **kwargs):
            start = time.perf_counter()
            out = original_ns(X, *args, **kwargs)
            self.ns_seconds += time.perf_counter() - start
            self.ns_matrices += X.shape[0]
            self.ns_flops += newton_schulz_flops(X.shape, args[0] if args else kwargs.get("steps", 5))
            return out

        muon.zeropower_via_newtonschulz = timed

    def reset(self) -> None:
        self.bytes.clear()
        self.ns_seconds, self.ns_matrices, self.ns_flops = 0.0, 0, 0


def worker(rank: int, layout: str, args: argparse.Namespace, init_file: str, out_file: str) -> None:
    from openk2.train.distributed import Mesh, ParallelConfig, init_distributed, parallelize

    world, dp_shard, ep = LAYOUTS[layout]
    torch.set_num_threads(args.threads_per_process)
    counter = Counter()
    counter.install()
    mesh: Mesh | None = None
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        mesh = init_distributed(ParallelConfig(dp_shard=dp_shard, ep=ep))
    config = openk2.preset(args.preset, vocab_size=args.vocab_size)
    model = openk2.build_model(config, seed=0)
    parallelize(model, mesh)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=0))
    tokens = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1),
                           generator=torch.Generator().manual_seed(0))
    per_rank = args.batch_size // world
    mine = tokens[rank * per_rank : (rank + 1) * per_rank]
    micro = mine.split(min(args.micro_batch_size, per_rank))
    targets = args.batch_size * args.seq_len
    records = []
    for step in range(args.warmup + args.steps):
        counter.reset()
        if mesh is not None:
            dist.barrier()
        start = time.perf_counter()
        counter.phase = "model"
        for batch in micro:
            loss, _ = next_token_loss(model, batch, None)
            (loss / targets).backward()
        counter.phase = "optimizer"
        optimizer_start = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        if step >= args.warmup:
            records.append({"step": end - start, "optimizer": end - optimizer_start, "ns": counter.ns_seconds,
                            "ns_matrices": counter.ns_matrices, "ns_flops": counter.ns_flops,
                            "bytes": {f"{p}/{k}": v for (p, k), v in counter.bytes.items()}})
    summary = {
        "step": statistics.median(r["step"] for r in records),
        "optimizer": statistics.median(r["optimizer"] for r in records),
        "ns": statistics.median(r["ns"] for r in records),
        "ns_matrices": records[-1]["ns_matrices"],
        "ns_flops": records[-1]["ns_flops"],
        "bytes": records[-1]["bytes"],
        "parameters": sum(p.numel() for p in model.parameters()) if mesh is None else None,
    }
    per_rank_results = [summary]
    if mesh is not None:
        gathered = [None] * world
        dist.all_gather_object(gathered, summary)
        per_rank_results = gathered
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        Path(out_file).write_text(json.dumps(per_rank_results))


def run(layout: str, args: argparse.Namespace) -> list[dict]:
    world = LAYOUTS[layout][0]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        if world == 1:
            worker(0, layout, args, "", out)
        else:
            mp.spawn(worker, args=(layout, args, os.path.join(tmp, "pg"), out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def megabytes(results: list[dict], kind: str, phase: str | None = None) -> float:
    """Bytes per rank per step (mean over ranks) of one collective kind, in MB."""
    total = 0
    for r in results:
        total += sum(v for k, v in r["bytes"].items()
                     if k.endswith("/" + kind) and (phase is None or k.startswith(phase + "/")))
    return total / len(results) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads-per-process", type=int, default=1)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    args = parser.parse_args()

    results = {layout: run(layout, args) for layout in args.layouts}
    params = results["single"][0]["parameters"] if "single" in results else None
    print(f"# distributed training step: preset {args.preset} (vocab {args.vocab_size}"
          + (f", {params / 1e6:.1f}M parameters" if params else "") + f"), batch {args.batch_size} x "
          f"{args.seq_len} tokens, micro-batch {args.micro_batch_size} per rank, MuonClip")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {platform.machine()}, {os.cpu_count()} cores (load average {load:.1f} at the end), "
          f"{args.threads_per_process} thread(s) per process, torch {torch.__version__}, gloo; "
          f"median of {args.steps} steps after {args.warmup} warm-up\n")
    print("| layout | procs | step s | tokens/s | all-reduce MB | all-gather MB | reduce-scatter MB "
          "| all-to-all MB |")
    print("|---|---|---|---|---|---|---|---|")
    tokens = args.batch_size * args.seq_len
    for layout, res in results.items():
        step = max(r["step"] for r in res)
        kinds = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all")
        cells = " | ".join(f"{megabytes(res, k):.2f}" for k in kinds)
        print(f"| {layout} | {LAYOUTS[layout][0]} | {step:.3f} | {tokens / step:,.0f} | {cells} |")
    print("\nMB per rank per step, the buffers each rank passes to the collective (module docstring).\n")
    print("| layout | procs | optimizer s | Newton–Schulz s | NS share of step | NS matrices per rank | "
          "NS GFLOP per rank | Muon all-to-all MB | stats all-reduce KB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for layout, res in results.items():
        step = max(r["step"] for r in res)
        ns = statistics.mean(r["ns"] for r in res)
        optimizer = statistics.mean(r["optimizer"] for r in res)
        matrices = "/".join(str(r["ns_matrices"]) for r in res)
        gflops = "/".join(f"{r['ns_flops'] / 1e9:.2f}" for r in res)
        muon_mb = megabytes(res, "all-to-all", "optimizer")
        stats_kb = 1e3 * megabytes(res, "all-reduce", "optimizer")
        print(f"| {layout} | {LAYOUTS[layout][0]} | {optimizer:.3f} | {ns:.3f} | {100 * ns / step:.1f}% "
              f"| {matrices} | {gflops} | {muon_mb:.2f} | {stats_kb:.1f} |")
    print("\nNewton–Schulz s: mean over ranks of the time one rank spends orthogonalising; the matrices "
          "column lists every rank's share (2-D matrices go to one owner each; experts stay where they are).")


if __name__ == "__main__":
    sys.exit(main())
