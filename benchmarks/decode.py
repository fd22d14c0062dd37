"""Decode throughput: openk2's engine (compressed MLA cache + weight absorption) against
transformers' `generate` on the same checkpoint folder, in one run.

For each preset (random init, float32, greedy): decode tokens/s at batch 1 and 8 and at cached
contexts of about 128 and 1,024 tokens, for openk2 (`Engine.generate`) and for transformers
(`DeepseekV3ForCausalLM.from_pretrained(folder).generate`), measured as

    batch x (N - 1) / (time to generate N tokens - time to generate 1 token)

so the prefill cancels out. The four timings of a row are interleaved and repeated, and the best
of each is kept, so both sides see the same machine load. Then the throughput of 32 concurrent
chat requests through `openk2 serve` (a server subprocess on a loopback port, driven by the
official `openai` client). Also printed: the cache bytes per token of both.

    python benchmarks/decode.py [--presets tiny small] [--tokens 33] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
from common import cpu_name, timed

from openk2 import build_model, param_counts, preset, save_model
from openk2.infer import Engine, SamplingParams
from openk2.infer.server import wait_until_serving


def decode_rates(ours, theirs, batch: int, tokens: int, repeats: int) -> tuple[float, float]:
    """Tokens/s of the decode steps alone for both generate functions, interleaved runs."""
    ours(2), theirs(2)  # warm-up
    best = {"ours_n": [], "ours_1": [], "theirs_n": [], "theirs_1": []}
    for _ in range(repeats):
        best["ours_n"].append(timed(lambda: ours(tokens)))
        best["theirs_n"].append(timed(lambda: theirs(tokens)))
        best["ours_1"].append(timed(lambda: ours(1)))
        best["theirs_1"].append(timed(lambda: theirs(1)))
    t = {k: min(v) for k, v in best.items()}
    steps = batch * (tokens - 1)
    return steps / max(t["ours_n"] - t["ours_1"], 1e-9), steps / max(t["theirs_n"] - t["theirs_1"], 1e-9)


def bench_decode(
    name: str, folder: Path, model, tokens: int, repeats: int, contexts: list[int]
) -> list[dict]:
    import transformers

    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rows = []
    print(
        f"{'preset':<7}{'batch':>6}{'context':>9}{'openk2 tok/s':>14}{'transformers tok/s':>20}{'ratio':>8}"
    )
    for ctx in contexts:
        for batch in (1, 8):
            g = torch.Generator().manual_seed(ctx + batch)
            ids = torch.randint(0, model.config.vocab_size, (batch, ctx), generator=g)
            engine = Engine(model, max_batch=batch, max_len=ctx + tokens + 8)
            prompts = ids.tolist()

            def ours(n: int, engine=engine, prompts=prompts) -> None:
                engine.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))

            def theirs(n: int, ids=ids) -> None:
                with torch.inference_mode():
                    hf.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=n,
                        min_new_tokens=n,
                        do_sample=False,
                        pad_token_id=0,
                        eos_token_id=None,
                    )

            a, b = decode_rates(ours, theirs, batch, tokens, repeats)
            rows.append({"preset": name, "batch": batch, "context": ctx, "openk2": a, "transformers": b})
            print(f"{name:<7}{batch:>6}{ctx:>9}{a:>14,.0f}{b:>20,.0f}{a / b:>7.2f}x", flush=True)
    return rows


def hf_cache_bytes_per_token(folder: Path) -> int:
    """Bytes transformers' cache grows by per token (batch 1), from its tensors after 16 and 32 tokens."""
    import transformers

    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    sizes = []
    for length in (16, 32):
        with torch.inference_mode():
            cache = hf(torch.zeros(1, length, dtype=torch.long), use_cache=True).past_key_values
        sizes.append(
            sum(
                t.numel() * t.element_size()
                for layer in cache.layers
                for t in vars(layer).values()
                if isinstance(t, torch.Tensor) and t.dim() >= 3
            )
        )
    return (sizes[1] - sizes[0]) // 16


# ---- server throughput ------------------------------------------------------------------------
WORDS = (
    "the quick brown fox jumps over a lazy dog while weather in paris and london stays mild numbers "
    'like 12 and 345 appear with json such as {"city": "paris", "days": 3}'
).split()


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A tokenizer trained on a few KB of text, with the model's vocabulary size."""
    from openk2.data.tokenizer import train_tokenizer

    rng = random.Random(0)
    train_tokenizer([" ".join(rng.choices(WORDS, k=200)) for _ in range(40)], vocab_size).save(folder)


def bench_server(name: str, folder: Path, requests: int, max_tokens: int) -> float:
    import openai

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = (
        f"from openk2.infer.server import serve; serve({str(folder)!r}, host='127.0.0.1', port={port}, "
        f"model_name='m', max_batch={requests}, max_len=512, log_level='warning')"
    )
    server = subprocess.Popen([sys.executable, "-c", code])
    try:
        wait_until_serving(f"http://127.0.0.1:{port}", server)
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600
        )
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        counts = [0] * requests

        def one(i: int) -> None:
            messages = [{"role": "user", "content": f"request {i}: hello"}]
            reply = client.chat.completions.create(
                model="m", messages=messages, max_tokens=max_tokens, temperature=1.0, seed=i
            )
            counts[i] = reply.usage.completion_tokens

        threads = [threading.Thread(target=one, args=(i,)) for i in range(requests)]
        elapsed = timed(lambda: ([t.start() for t in threads], [t.join() for t in threads]))
        rate = sum(counts) / elapsed
        print(
            f"{name}: {requests} concurrent chat requests (max_tokens {max_tokens}) through openk2 serve: "
            f"{sum(counts)} tokens in {elapsed:.2f} s = {rate:,.0f} tokens/s",
            flush=True,
        )
        return rate
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--tokens", type=int, default=33, help="tokens generated per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--skip-server", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}"
    )
    for name in args.presets:
        config = preset(name)
        model = build_model(config, seed=0)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            save_model(model, folder)
            ours = Engine(model, max_batch=1, max_len=16).cache_bytes_per_token
            print(
                f"\n{name}: {param_counts(config)['total'] / 1e6:.1f}M parameters. Cache per token: openk2 "
                f"(kv_lora_rank {config.kv_lora_rank} + qk_rope_head_dim {config.qk_rope_head_dim}) x "
                f"{config.num_hidden_layers} layers x 4 bytes = {ours:,} bytes; transformers "
                f"{hf_cache_bytes_per_token(folder):,} bytes",
                flush=True,
            )
            bench_decode(name, folder, model, args.tokens, args.repeats, args.contexts)
            if not args.skip_server:
                write_tokenizer(folder, config.vocab_size)
                bench_server(name, folder, args.requests, 64)


if __name__ == "__main__":
    main()
