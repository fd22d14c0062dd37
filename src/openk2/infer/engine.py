"""Batched generation with continuous batching over the compressed MLA cache (K2_SPEC §1).

`Engine.generate(prompts, SamplingParams(...))` is the offline path (RL rollouts); `Engine.submit`
returns a `RequestHandle` and is what the server uses: a background thread steps the engine, and
requests that arrive while others decode are prefilled and join the running batch at the next
step. Running sequences always occupy cache slots 0..B-1 (a finished sequence's slot is refilled
by moving the last one into it), so one decode step is one batched forward over views of the
cache, with no per-sequence work inside the network.

Log-probabilities: `Completion.logprobs[i]` is log p(token_i | prefix) under the raw model
distribution (log-softmax of the logits: temperature 1, no top-k/top-p, no logit bias or
constraint), which is what RL losses need for π_old. `Completion.sampling_logprobs[i]` is the log
probability under the distribution the token was actually drawn from (after temperature, top-k,
top-p, logit bias and constraint masks); it is 0.0 for greedy decoding.

Seeds: with `SamplingParams.seed`, the k-th sequence of one `generate` call (or the `index`
given to `submit`) draws its uniforms from `random.Random(f"{seed}:{k}")`, so results do not depend
on which other requests share the batch (up to floating-point differences between batch sizes).
"""

from __future__ import annotations

import asyncio
import queue
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from openk2.infer.cache import CompressedDecoder, MLACache
from openk2.model.transformer import K2ForCausalLM

FINISH_STOP, FINISH_LENGTH, FINISH_ABORT = "stop", "length", "abort"


@dataclass
class SamplingParams:
    """How to sample one sequence. temperature 0 is greedy; top_k 0 and top_p 1 are off."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False  # if True, the tokenizer's eos / <|im_end|> do not stop generation
    top_logprobs: int = 0  # also return the k most likely tokens (raw distribution) per position
    logit_bias: Mapping[int, float] | None = None  # added to the logits; -inf bans a token
    constraint: Any = None  # an openk2.infer.constrain.Grammar: output must match it

    def validate(self, vocab_size: int) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        need(isinstance(self.max_tokens, int) and self.max_tokens >= 1,
             f"max_tokens={self.max_tokens!r} must be >= 1")
        need(self.temperature >= 0, f"temperature={self.temperature} must be >= 0")
        need(0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1]")
        need(self.top_k >= 0, f"top_k={self.top_k} must be >= 0 (0 = off)")
        need(0 <= self.top_logprobs <= 20, f"top_logprobs={self.top_logprobs} must be in [0, 20]")
        need(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        for tid in list(self.stop_token_ids) + list((self.logit_bias or {}).keys()):
            need(isinstance(tid, int) and 0 <= tid < vocab_size,
                 f"token id {tid!r} is outside the vocabulary [0, {vocab_size})")


@dataclass
class Completion:
    """One generated sequence. token_ids include a final stop token; text excludes it (and a
    matched stop string and anything after it)."""

    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # raw model distribution
    sampling_logprobs: list[float] = field(default_factory=list)  # distribution sampled from
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    text: str | None = None
    error: str | None = None

    @property
    def text_token_ids(self) -> list[int]:
        """The ids behind `text`: all but a final stop token."""
        return _text_ids(self.token_ids, self.finish_reason, self.stop_reason)


@dataclass
class Delta:
    """What one engine step added to a streamed request."""

    token_ids: list[int]
    text: str
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class EngineError(RuntimeError):
    """The engine failed while running a request (the message says why)."""


class RequestHandle:
    """A submitted request: iterate it (sync or async) for `Delta`s, or wait for `result()`."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop | None):
        self._engine = engine
        self._loop = loop
        self._queue: queue.Queue | asyncio.Queue = asyncio.Queue() if loop is not None else queue.Queue()
        self._done = threading.Event()
        self.completion: Completion | None = None
        self.cancelled = False

    # engine side (engine thread)
    def _put(self, item: Delta | Completion) -> None:
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
            except RuntimeError:  # the event loop is closed: nobody is listening
                pass
        else:
            self._queue.put(item)

    def _finish(self, completion: Completion) -> None:
        self.completion = completion
        self._done.set()
        self._put(completion)

    # client side
    def cancel(self) -> None:
        """Stop generating; the completion finishes with finish_reason "abort"."""
        self.cancelled = True
        self._engine._wake()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Completion:
        """Block until the request finishes (stepping the engine here if no thread runs it)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done.is_set():
            if self._engine.running_in_background:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not self._done.wait(remaining):
                    raise TimeoutError("request did not finish in time")
            else:
                self._engine.step()
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError("request did not finish in time")
        assert self.completion is not None
        if self.completion.error:
            raise EngineError(self.completion.error)
        return self.completion

    def __iter__(self) -> Iterator[Delta]:
        if self._loop is not None:
            raise TypeError("this handle was submitted with an event loop: use `async for`")
        while True:
            if not self._engine.running_in_background and self._queue.empty() and not self._done.is_set():
                self._engine.step()
                continue
            item = self._queue.get()
            if isinstance(item, Completion):
                if item.error:
                    raise EngineError(item.error)
                return
            yield item

    async def __aiter__(self) -> AsyncIterator[Delta]:
        if self._loop is None:
            raise TypeError("submit(..., loop=asyncio.get_running_loop()) to iterate asynchronously")
        while True:
            item = await self._queue.get()
            if isinstance(item, Completion):
                if item.error:
                    raise EngineError(item.error)
                return
            yield item

    async def aresult(self) -> Completion:
        async for _ in self:
            pass
        assert self.completion is not None
        return self.completion


class _Detokenizer:
    """Incremental text of a growing token list that never splits a UTF-8 character."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.prefix = self.read = 0

    def push(self, ids: list[int]) -> str:
        decode = self.tokenizer.decode
        before = decode(ids[self.prefix : self.read])
        after = decode(ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(ids)
            return after[len(before) :]
        return ""


class _Sequence:
    __slots__ = (
        "handle", "prompt", "params", "rng", "stop_ids", "completion", "length", "pending", "matcher",
        "detok", "text", "emitted", "stream", "bias", "max_tokens",
    )

    def __init__(self, handle: RequestHandle, prompt: list[int], params: SamplingParams, rng: random.Random,
                 stop_ids: frozenset[int], stream: bool, tokenizer: Any, max_tokens: int):
        self.handle, self.prompt, self.params, self.rng = handle, prompt, params, rng
        self.stop_ids, self.stream, self.max_tokens = stop_ids, stream, max_tokens
        self.completion = Completion(prompt, top_logprobs=[] if params.top_logprobs else None)
        self.length = 0  # tokens in the cache
        self.pending = -1  # sampled token whose key/value is not cached yet
        self.matcher = params.constraint.start() if params.constraint is not None else None
        track_text = tokenizer is not None and (stream or params.stop)
        self.detok = _Detokenizer(tokenizer) if track_text else None
        self.text, self.emitted = "", 0
        self.bias = None
        if params.logit_bias:
            ids = torch.tensor(list(params.logit_bias.keys()), dtype=torch.long)
            self.bias = (ids, torch.tensor([float(v) for v in params.logit_bias.values()]))


class Engine:
    """Generation over a `K2ForCausalLM` with an MLA latent cache of `max_batch` x `max_len`.

    tokenizer (optional): a K2Tokenizer (decode, eos_id, im_end_id); needed for text, stop
    strings and constraints. Without one, stop with `stop_token_ids` or the config's eos id.
    """

    def __init__(self, model: K2ForCausalLM, tokenizer: Any = None, max_batch: int = 32,
                 max_len: int | None = None, prefill_tokens: int = 8192, seed: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.config = model.config
        self.vocab_size = self.config.vocab_size
        self.max_batch = max_batch
        self.max_len = min(max_len or 4096, self.config.max_position_embeddings)
        self.prefill_tokens = prefill_tokens
        self.cache = MLACache(model, max_batch, self.max_len)
        self.decoder = CompressedDecoder(model, self.cache)
        self.default_stop_ids = self._default_stop_ids()
        self._seed_source = random.Random(seed)
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._cv = threading.Condition()
        self._step_lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._looping = False
        self.stats = {"prefill_tokens": 0, "decode_tokens": 0, "steps": 0}

    def _default_stop_ids(self) -> frozenset[int]:
        ids = set()
        tok = self.tokenizer
        for name in ("eos_id", "im_end_id"):
            value = getattr(tok, name, None) if tok is not None else None
            if isinstance(value, int):
                ids.add(value)
        if not ids and isinstance(self.config.eos_token_id, int):
            ids.add(self.config.eos_token_id)
        return frozenset(ids)

    @property
    def cache_bytes_per_token(self) -> int:
        return self.cache.bytes_per_token

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def running_in_background(self) -> bool:
        """Whether a scheduler loop (`start`'s thread, or `run` in another thread) steps the
        engine, so that waiting on a handle must not step it itself."""
        return self._looping

    # ---- public API --------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 n: int = 1) -> list[Completion]:
        """Complete every prompt `n` times; returns prompt-major completions (p0 x n, p1 x n, ...)."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        handles = [self.submit(prompt, sp, index=i * n + k)
                   for i, (prompt, sp) in enumerate(zip(prompts, params)) for k in range(n)]
        return [h.result() for h in handles]

    def submit(self, prompt: Sequence[int], params: SamplingParams | None = None, *, index: int | None = None,
               stream: bool = False, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue one request. `index` selects the seeded random stream (see module docstring);
        `stream` asks for per-step text deltas; `loop` makes the handle async-iterable there."""
        params = params or SamplingParams()
        params.validate(self.vocab_size)
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        if any(t < 0 or t >= self.vocab_size for t in prompt):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if len(prompt) >= self.max_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens; this engine's context is {self.max_len} "
                             f"tokens, which leaves no room to generate")
        if (params.stop or params.constraint is not None) and self.tokenizer is None:
            raise ValueError("stop strings and constraints need an Engine created with a tokenizer")
        if params.seed is not None:
            rng = random.Random(f"{params.seed}:{index if index is not None else 0}")
        else:
            rng = random.Random(self._seed_source.getrandbits(64))
        stop_ids = frozenset(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.default_stop_ids
        handle = RequestHandle(self, loop)
        max_tokens = min(params.max_tokens, self.max_len - len(prompt))
        seq = _Sequence(handle, prompt, params, rng, stop_ids, stream, self.tokenizer, max_tokens)
        with self._cv:
            self._waiting.append(seq)
            self._cv.notify()
        return handle

    def start(self) -> Engine:
        """Step the engine in a background thread; `stop()` ends it. On CPU a long-running server
        should rather give `run` its main thread: OpenMP runs torch's mid-sized ops about twice as
        slowly from other threads (docs/LOG.md)."""
        if not self._looping:
            self._stopping = False
            self._looping = True
            self._thread = threading.Thread(target=self.run, name="openk2-engine", daemon=True)
            self._thread.start()
        return self

    def run(self) -> None:
        """Step the engine in the calling thread until `stop()` is called (from another thread,
        or before: then it returns at once)."""
        self._looping = True
        try:
            while not self._stopping:
                with self._cv:
                    while not self._stopping and not self._waiting and not self._running:
                        self._cv.wait()
                if not self._stopping:
                    self.step()
        finally:
            self._looping = False

    def stop(self) -> None:
        """End the scheduler loop (`start`'s thread or `run`); requests stay queued."""
        self._stopping = True
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
            self._thread = None

    def refresh_weights(self) -> bool:
        """Pick up new weights (also done automatically whenever the engine goes idle -> busy)."""
        with self._step_lock:
            return self.decoder.refresh()

    # ---- scheduling ----------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def step(self) -> bool:
        """One scheduler iteration: admit waiting requests (one batched prefill), then one decode
        step for every running sequence. Returns whether work remains."""
        with self._step_lock, torch.inference_mode():
            try:
                if self._waiting:
                    self._admit()
                if self._running:
                    self._decode()
            except Exception as e:  # fail the affected requests, keep the engine usable
                self._fail_all(f"{type(e).__name__}: {e}")
            self.stats["steps"] += 1
            return bool(self._running or self._waiting)

    def _fail_all(self, message: str) -> None:
        with self._cv:
            failed = self._running + list(self._waiting)
            self._running, self._waiting = [], deque()
        for seq in failed:
            seq.completion.error = message
            seq.completion.finish_reason = FINISH_ABORT
            seq.handle._finish(seq.completion)

    def _admit(self) -> None:
        batch: list[_Sequence] = []
        with self._cv:
            longest = 0
            while self._waiting and len(self._running) + len(batch) < self.max_batch:
                seq = self._waiting[0]
                if seq.handle.cancelled:
                    self._waiting.popleft()
                    self._finish(seq, FINISH_ABORT, None)
                    continue
                longest_next = max(longest, len(seq.prompt))
                if batch and longest_next * (len(batch) + 1) > self.prefill_tokens:
                    break
                longest = longest_next
                batch.append(self._waiting.popleft())
        if not batch:
            return
        if not self._running:
            self.decoder.refresh()
        first = len(self._running)
        logits = self.decoder.prefill([s.prompt for s in batch], first)
        for s in batch:
            s.length = len(s.prompt)
        self.stats["prefill_tokens"] += sum(len(s.prompt) for s in batch)
        self._running.extend(batch)
        self._sample_and_update(logits, batch, first)

    def _decode(self) -> None:
        running = self._running
        device = self.cache.kv.device
        tokens = torch.tensor([s.pending for s in running], dtype=torch.long, device=device)
        positions = [s.length for s in running]
        logits = self.decoder.decode(tokens, torch.tensor(positions, device=device), max(positions))
        for s in running:
            s.length += 1
        self.stats["decode_tokens"] += len(running)
        self._sample_and_update(logits, running, 0)

    # ---- sampling ------------------------------------------------------------------------------
    def _sample_and_update(self, logits: torch.Tensor, seqs: list[_Sequence], first_slot: int) -> None:
        logits = logits.float().cpu()  # sampling runs on the host (a no-op copy on CPU)
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        tokens, raw, sampled, top = sample(logits, seqs)
        tokens, raw, sampled = tokens.tolist(), raw.tolist(), sampled.tolist()
        top_list = None if top is None else (top[0].tolist(), top[1].tolist())
        finished: list[int] = []
        for i, s in enumerate(seqs):
            if not finite[i]:  # sampling from NaN would emit token 0 forever
                s.completion.error = (
                    "the model's logits are not finite (NaN or inf): its weights hold non-finite "
                    "values or its activations overflowed; check the checkpoint, or run it in float32")
            if s.handle.cancelled or not finite[i]:
                self._finish(s, FINISH_ABORT, None)
                finished.append(first_slot + i)
                continue
            tok = tokens[i]
            c = s.completion
            c.token_ids.append(tok)
            c.logprobs.append(raw[i])
            c.sampling_logprobs.append(sampled[i])
            top_i = None
            if c.top_logprobs is not None and top_list is not None:
                k = s.params.top_logprobs
                top_i = list(zip(top_list[0][i][:k], top_list[1][i][:k]))
                c.top_logprobs.append(top_i)
            if s.matcher is not None:
                s.matcher.advance(tok)
            s.pending = tok
            reason, stop_reason = None, None
            if tok in s.stop_ids:
                reason, stop_reason = FINISH_STOP, tok
            elif s.matcher is not None and s.matcher.done:
                reason = FINISH_STOP
            if s.detok is not None and reason is None:
                before = len(s.text)
                s.text += s.detok.push(c.token_ids)
                if s.params.stop:
                    hit = _find_stop(s.text, s.params.stop, before)
                    if hit is not None:
                        s.text = s.text[: hit[0]]
                        reason, stop_reason = FINISH_STOP, hit[1]
            if reason is None and len(c.token_ids) >= s.max_tokens:
                reason = FINISH_LENGTH
            if reason is not None and s.detok is not None and not isinstance(stop_reason, str):
                s.text = self.tokenizer.decode(_text_ids(c.token_ids, reason, stop_reason))  # flush
            if s.stream:
                hold = 0 if reason is not None else _stop_prefix_hold(s.text, s.params.stop)
                delta_text = s.text[s.emitted : len(s.text) - hold]
                s.emitted += len(delta_text)
                tops = [top_i] if top_i is not None else None
                s.handle._put(Delta([tok], delta_text, [raw[i]], tops, reason, stop_reason))
            if reason is not None:
                self._finish(s, reason, stop_reason)
                finished.append(first_slot + i)
        if finished:
            self._compact(finished)

    def _finish(self, s: _Sequence, reason: str, stop_reason: int | str | None) -> None:
        c = s.completion
        c.finish_reason, c.stop_reason = reason, stop_reason
        if self.tokenizer is not None:
            if s.detok is not None:
                c.text = s.text
            else:
                c.text = self.tokenizer.decode(_text_ids(c.token_ids, reason, stop_reason))
        if s.stream and reason == FINISH_ABORT:
            s.handle._put(Delta([], "", [], None, reason))
        s.handle._finish(c)

    def _compact(self, finished_slots: list[int]) -> None:
        """Remove finished sequences, moving the last running ones into their slots."""
        running = self._running
        for slot in sorted(finished_slots, reverse=True):
            last = len(running) - 1
            if slot != last:
                moved = running[last]
                self.cache.move(last, slot, moved.length)
                running[slot] = moved
            running.pop()


def _text_ids(token_ids: list[int], reason: str | None, stop_reason: int | str | None) -> list[int]:
    """The ids whose text a completion shows: all but a final stop token."""
    return token_ids[:-1] if reason == FINISH_STOP and isinstance(stop_reason, int) else token_ids


def _find_stop(text: str, stops: Sequence[str], start: int) -> tuple[int, str] | None:
    """Earliest stop string that ends after position `start` of text."""
    best = None
    for stop in stops:
        i = text.find(stop, max(0, start - len(stop) + 1))
        if i >= 0 and (best is None or i < best[0]):
            best = (i, stop)
    return best


def _stop_prefix_hold(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text that could still grow into a stop string."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return hold


def sample(logits: torch.Tensor, seqs: list[_Sequence]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                  tuple[torch.Tensor, torch.Tensor] | None]:
    """Batched sampling with per-row parameters. logits [B, V] float32.

    Returns token ids [B], raw-model log-probs [B], sampling-distribution log-probs [B] and,
    if any row asks for them, the raw top-k (ids, log-probs) [B, k]."""
    B, V = logits.shape
    lse = torch.logsumexp(logits, dim=-1)
    top = None
    k_top = max(s.params.top_logprobs for s in seqs)
    if k_top:
        values, ids = logits.topk(k_top, dim=-1)
        top = (ids, values - lse[:, None])
    adjusted = logits
    if any(s.bias is not None or s.matcher is not None for s in seqs):
        adjusted = logits.clone()
        for i, s in enumerate(seqs):
            if s.bias is not None:
                adjusted[i].index_add_(0, s.bias[0], s.bias[1])
            if s.matcher is not None:
                remaining = s.max_tokens - len(s.completion.token_ids)
                adjusted[i].masked_fill_(~s.matcher.allowed(remaining), float("-inf"))
    temps = [s.params.temperature for s in seqs]
    greedy_rows = [t == 0 for t in temps]
    if all(greedy_rows):
        tokens = adjusted.argmax(-1)
        sampled_lp = torch.zeros(B)
    else:
        temp = torch.tensor([t if t > 0 else 1.0 for t in temps])
        scaled = adjusted / temp[:, None]
        top_k = [s.params.top_k for s in seqs]
        top_p = [s.params.top_p for s in seqs]
        uniforms = torch.tensor([s.rng.random() for s in seqs], dtype=torch.float64)
        if any(top_k) or any(p < 1 for p in top_p):
            scaled, order = scaled.sort(dim=-1, descending=True)
            if any(top_k):
                k = torch.tensor([k if k > 0 else V for k in top_k])
                scaled.masked_fill_(torch.arange(V)[None] >= k[:, None], float("-inf"))
            if any(p < 1 for p in top_p):
                probs = scaled.softmax(-1)
                before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
                scaled.masked_fill_(before > torch.tensor(top_p)[:, None], float("-inf"))
        else:
            order = None
        logp = scaled.log_softmax(-1)
        cdf = logp.double().exp().cumsum(-1)
        pos = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True).clamp_(max=V - 1)
        sampled_lp = logp.gather(1, pos).squeeze(1)
        tokens = pos.squeeze(1) if order is None else order.gather(1, pos).squeeze(1)
        if any(greedy_rows):
            greedy = torch.tensor(greedy_rows)
            tokens = torch.where(greedy, adjusted.argmax(-1), tokens)
            sampled_lp = torch.where(greedy, torch.zeros(()), sampled_lp)
    raw = logits.gather(1, tokens[:, None]).squeeze(1) - lse
    return tokens, raw, sampled_lp, top
