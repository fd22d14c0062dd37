"""Where the time goes: torch.profiler tables for openk2's tiny training step and batched decode,
at one and two threads side by side (the figures in docs/LOG.md's profiling entries).

    python benchmarks/profile_step.py [--what train decode compare] [--preset tiny] [--rows 25]

train:  benchmarks/train_step.py's step (forward + backward + AdamW, fp32, 8 x 256 tokens).
decode: Engine.generate of 8 prompts of 128 tokens, 33 greedy tokens, as benchmarks/decode.py.
For each, the step time per thread count (fastest of 3; decode steps exclude the prefill), the
time per op per step, self and with the ops it calls (decode: per generated token, the prefill
spread over them), the number of op calls per step, and the matmuls by input shapes.
compare: the training step of openk2 and of transformers (eager experts and attention, the
same weights) profiled side by side at the current thread count: every matmul call by input
shapes, then the other ops (self time per step, mean of 3 steps).
"""

from __future__ import annotations

import argparse

import torch
from common import cpu_name, decode_step_seconds, greedy, timed
from torch.profiler import ProfilerActivity, profile
from train_step import openk2_loss, step_fn

from openk2 import build_model, preset
from openk2.infer import Engine

DECODE_BATCH, DECODE_CONTEXT, DECODE_TOKENS = 8, 128, 33


def train_step(name: str):
    """(the step, a function timing one step)."""
    step = step_fn(build_model(preset(name), seed=0), openk2_loss)
    return step, lambda: timed(step)


def decode_run(name: str):
    """(generate DECODE_TOKENS for the batch, a function timing one decode step: the N-token run
    minus the 1-token run, so the prefill cancels out, as in benchmarks/decode.py)."""
    model = build_model(preset(name), seed=0).eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (DECODE_BATCH, DECODE_CONTEXT), generator=g).tolist()
    engine = Engine(model, max_batch=DECODE_BATCH, max_len=DECODE_CONTEXT + DECODE_TOKENS + 8)
    generate = greedy(engine, prompts)
    generate(2)
    return lambda: generate(DECODE_TOKENS), lambda: decode_step_seconds(generate, DECODE_TOKENS)


MATMULS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm",
           "mkldnn::_linear_pointwise")


def compare(name: str, rows: int) -> None:
    """openk2's and transformers' training steps, op by op (the module docstring's `compare`)."""
    import os
    import tempfile

    import transformers
    from train_step import transformers_loss

    from openk2 import save_model

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    model = build_model(preset(name), seed=0)
    tables = {}
    with tempfile.TemporaryDirectory() as folder:
        save_model(model, folder)
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager")
        for side, net, loss in (("openk2", model, openk2_loss), ("transformers", hf, transformers_loss)):
            step = step_fn(net, loss)
            step()
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(3):
                    step()
            tables[side] = {(e.key, str(e.input_shapes) if e.key in MATMULS else ""):
                            e.self_cpu_time_total / 3e3 for e in prof.key_averages(group_by_input_shape=True)}
    keys = sorted(set(tables["openk2"]) | set(tables["transformers"]),
                  key=lambda k: -max(tables["openk2"].get(k, 0.0), tables["transformers"].get(k, 0.0)))
    print(f"\ncompare ({torch.get_num_threads()} threads), self ms per step")
    for title, matmul in (("matmuls by input shapes", True), ("other ops", False)):
        print(f"\n{title:<90}{'openk2':>10}{'transformers':>14}")
        for key in [k for k in keys if (k[0] in MATMULS) == matmul][:rows]:
            label = f"{key[0]} {key[1]}"[:90]
            ours, theirs = tables["openk2"].get(key, 0.0), tables["transformers"].get(key, 0.0)
            print(f"{label:<90}{ours:>10.1f}{theirs:>14.1f}")
        for side in tables:
            print(f"  {title} total, {side}: "
                  f"{sum(v for k, v in tables[side].items() if (k[0] in MATMULS) == matmul):,.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", nargs="+", default=["train", "decode"],
                        choices=["train", "decode", "compare"])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    print(f"machine: {cpu_name()}, torch {torch.__version__}, preset {args.preset}")
    for what in args.what:
        if what == "compare":
            compare(args.preset, args.rows)
            continue
        fn, step_seconds = (train_step if what == "train" else decode_run)(args.preset)
        steps = 1 if what == "train" else DECODE_TOKENS  # per profiled call
        per_op: dict[int, dict[str, float]] = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            fn()
            best = min(step_seconds() for _ in range(3))
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            per_op[threads] = {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}
            if threads == 2:
                total = {e.key: e.cpu_time_total / 1e3 / steps for e in prof.key_averages()}
                calls = sum(e.count for e in prof.key_averages()) / steps
                # input shapes in a run of their own: recording them slows the ops down
                with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                    fn()
                by_shape = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in MATMULS]
            rate = "" if what == "train" else f" ({DECODE_BATCH / best:,.0f} tokens/s)"
            print(f"\n{what}: {threads} thread(s): {best * 1e3:,.2f} ms per step{rate}")
        print(f"\n{'op (self time, ms per step)':<58}{'1 thread':>10}{'2 threads':>11}{'speedup':>9}"
              f"{'2 threads, with children':>26}")
        for key in sorted(per_op[2], key=lambda k: -per_op[2][k])[: args.rows]:
            one, two = per_op[1].get(key, 0.0), per_op[2][key]
            print(f"{key[:58]:<58}{one:>10.2f}{two:>11.2f}{one / max(two, 1e-9):>8.2f}x{total[key]:>26.2f}")
        print(f"\n{calls:,.0f} op calls per step (2 threads). Matmuls by input shapes, 2 threads:")
        print(f"{'op and input shapes':<90}{'ms/step':>9}{'calls/step':>12}")
        for e in sorted(by_shape, key=lambda e: -e.self_cpu_time_total)[: args.rows]:
            label = f"{e.key} {e.input_shapes}"[:90]
            print(f"{label:<90}{e.self_cpu_time_total / 1e3 / steps:>9.3f}{e.count / steps:>12.1f}")


if __name__ == "__main__":
    main()
