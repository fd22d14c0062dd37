"""Inference engine: compressed-cache decode parity with the full forward, cache size, sampling,
log-probabilities, stop conditions, continuous batching, weight refresh."""

import json
import random
import threading

import pytest
import torch

import openk2.infer.cache as cache_module
from openk2 import build_model, preset
from openk2.data.tokenizer import train_tokenizer
from openk2.infer import CompressedDecoder, Engine, MLACache, SamplingParams

VOCAB = 640




def small_config(**changes):
    sizes = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=12,
        num_hidden_layers=3,
    )
    sizes.update(changes)
    return preset("tiny", **sizes)


def corpus() -> list[str]:
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog weather city paris london value name items".split()
    out = []
    for _ in range(60):
        obj = {
            rng.choice(words): rng.choice([rng.choice(words), rng.randint(0, 999), True, None])
            for _ in range(3)
        }
        out.append(" ".join(rng.choices(words, k=20)) + ". " + json.dumps(obj))
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(corpus(), VOCAB, num_special=64)


@pytest.fixture(scope="module")
def model():
    return build_model(small_config(), seed=0)


def full_logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids]))[0]


# ---- the compressed cache ---------------------------------------------------------------------------
CONFIGS = {
    "k2": {},
    "no-q-lora": dict(q_lora_rank=None),
    "yarn-bias-halfsplit": dict(
        rope_interleave=False,
        attention_bias=True,
        max_position_embeddings=256,
        rope_scaling={
            "type": "yarn",
            "factor": 4.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "dense-first-2": dict(first_k_dense_replace=2, n_shared_experts=2),
}
PATHS = ["auto", "loop", "tall-skinny", "linear", "packed", "sparse-experts"]


CASES = [(name, "auto", fold) for name in CONFIGS for fold in (True, False)]
CASES += [("k2", path, True) for path in PATHS[1:]]


@pytest.mark.parametrize("name,path,fold", CASES)
def test_incremental_decode_matches_full_forward(name, path, fold, monkeypatch):
    if path == "loop":  # experts one by one instead of torch._grouped_mm
        monkeypatch.setattr(cache_module, "_GROUPED_MM", False)
    elif path == "tall-skinny":  # every projection as W @ xᵀ
        monkeypatch.setattr(cache_module, "_TALL_SKINNY_MAX_ROWS", 1 << 30)
        monkeypatch.setattr(cache_module, "_TRANSPOSE_COPIES", False)
        monkeypatch.setattr(cache_module, "_PACKED_LINEAR", False)
    elif path == "linear":
        monkeypatch.setattr(cache_module, "_TALL_SKINNY_MAX_ROWS", 0)
        monkeypatch.setattr(cache_module, "_PACKED_LINEAR", False)
    elif path == "packed":  # every projection through oneDNN's pre-packed linear, even one row
        if not cache_module._PACKED_LINEAR:
            pytest.skip("this torch build has no oneDNN packed linear")
        for knob in ("_PACK_MIN_ELEMENTS", "_PACK_FEW_ROWS_MIN_ELEMENTS", "_PACK_ONE_ROW_MIN_ELEMENTS"):
            monkeypatch.setattr(cache_module, knob, 0)
    elif path == "sparse-experts":  # routed experts never run densely for a few tokens
        monkeypatch.setattr(cache_module, "_DENSE_EXPERTS", False)
    if not fold:
        monkeypatch.setattr(cache_module, "_FOLD_MAX_ELEMENTS", 0)
    model = build_model(small_config(**CONFIGS[name]), seed=1)
    with torch.no_grad():  # non-zero biases and norm gains, so nothing is trivially absent
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname:
                p.add_(torch.randn_like(p) * 0.1)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (9, 23, 4, 15)]
    prompt_lens = [3, 11, 1, 7]
    full = [full_logits(model, s) for s in seqs]
    cache = MLACache(model, slots=5, max_len=32)
    dec = CompressedDecoder(model, cache)
    # three or more live sequences fill >= E / 2 routing slots (top-2 of 8): the dense expert path
    dense_calls = []
    for ffn in dec.weights.ffn:
        if ffn.all_up is not None:
            ffn.all_up = _Counted(ffn.all_up, dense_calls)
    errors = []
    # first three prompts prefill together; the fourth joins later at slot 3 (continuous batching)
    first = dec.prefill([s[:p] for s, p in zip(seqs[:3], prompt_lens[:3])], 0, all_logits=True)
    for b in range(3):
        errors.append((first[b, : prompt_lens[b]] - full[b][: prompt_lens[b]]).abs().max())
    positions = prompt_lens[:3]
    for step in range(20):
        if step == 4:
            last = dec.prefill([seqs[3][: prompt_lens[3]]], 3)
            errors.append((last[0] - full[3][prompt_lens[3] - 1]).abs().max())
            positions = positions + [prompt_lens[3]]
        live = [b for b in range(len(positions)) if positions[b] < len(seqs[b])]
        if not live:
            break
        tokens = torch.tensor(
            [seqs[b][positions[b]] if positions[b] < len(seqs[b]) else 0 for b in range(len(positions))]
        )
        logits = dec.decode(tokens, torch.tensor(positions))
        for b in live:
            errors.append((logits[b] - full[b][positions[b]]).abs().max())
        positions = [p + 1 for p in positions]
    assert max(errors) < 1e-4, max(errors)
    assert bool(dense_calls) == (cache_module._PACKED_LINEAR and path in ("auto", "loop", "packed"))


class _Counted:
    """A decode matrix that records its calls."""

    def __init__(self, matrix, calls: list):
        self.matrix, self.calls = matrix, calls

    def __call__(self, x):
        self.calls.append(x.shape[0])
        return self.matrix(x)


@pytest.mark.skipif(not cache_module._PACKED_LINEAR, reason="this torch build has no oneDNN packed linear")
@pytest.mark.parametrize("rows", [1, 2, 5, 16, 17, 200])
def test_decode_matrix_paths_agree(rows, monkeypatch):
    monkeypatch.setattr(cache_module, "_PACK_MIN_ELEMENTS", 0)
    monkeypatch.setattr(cache_module, "_PACK_FEW_ROWS_MIN_ELEMENTS", 0)
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 40, generator=g), torch.randn(48, generator=g)
    x = torch.randn(rows, 60, generator=g)[:, 10:50]  # a strided view, as decode's slices are
    expected = torch.nn.functional.linear(x, w, b)
    for one_row in (0, 1 << 30):  # one row through the packed copy, or through the transposed one
        monkeypatch.setattr(cache_module, "_PACK_ONE_ROW_MIN_ELEMENTS", one_row)
        matrix = cache_module._Matrix(w, b)
        assert matrix.packed is not None and (matrix.wt is None) == (one_row == 0)
        torch.testing.assert_close(matrix(x), expected, rtol=1e-5, atol=1e-5)


def test_cache_holds_only_latent_and_rotary_key(model):
    c = model.config
    cache = MLACache(model, slots=3, max_len=20)
    assert cache.kv.shape == (c.num_hidden_layers, 3, 20, c.kv_lora_rank + c.qk_rope_head_dim)
    assert cache.bytes_per_token == (c.kv_lora_rank + c.qk_rope_head_dim) * c.num_hidden_layers * 4
    assert cache.nbytes == cache.bytes_per_token * 3 * 20
    bf16 = build_model(small_config(), dtype=torch.bfloat16)
    assert (
        MLACache(bf16, 1, 4).bytes_per_token
        == (c.kv_lora_rank + c.qk_rope_head_dim) * c.num_hidden_layers * 2
    )
    assert Engine(model, max_batch=3, max_len=20).cache_bytes_per_token == cache.bytes_per_token
    # what decode writes is the normalised latent c_KV and the rotated shared key k^R
    dec = CompressedDecoder(model, cache)
    ids = [5, 17, 99, 3]
    dec.prefill([ids[:3]], 0)
    dec.decode(torch.tensor([ids[3]]), torch.tensor([3]))
    with torch.inference_mode():
        x = model.model.embed_tokens(torch.tensor([ids]))
        attn = model.model.layers[0].self_attn
        latent, k_rope = attn.compress_kv(model.model.layers[0].input_layernorm(x))
        cos, sin = model.model.rotary_emb(torch.arange(4)[None])
        from openk2.model.rope import apply_rotary

        k_rope = apply_rotary(k_rope, cos, sin, c.rope_interleave)
    expected = torch.cat((latent, k_rope), -1)[0]
    assert torch.allclose(cache.kv[0, 0, :4], expected, atol=1e-5)


# ---- generation ---------------------------------------------------------------------------------------
def assert_greedy(model, prompt, tokens):
    """Each token is the argmax of the full forward over everything before it (ties within 1e-4)."""
    logits = full_logits(model, list(prompt) + list(tokens))[len(prompt) - 1 : -1]
    chosen = logits.gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
    assert len(tokens) and torch.all(chosen >= logits.max(-1).values - 1e-4)


def test_greedy_generate_matches_full_forward(model):
    engine = Engine(model, max_batch=4, max_len=64)
    prompts = [[1, 2, 3], list(range(10, 30)), [7], list(range(50, 58))]
    outs = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert_greedy(model, prompt, out.token_ids)
        assert out.finish_reason == "length" and out.prompt_token_ids == prompt
        assert out.sampling_logprobs == [0.0] * 12
        # raw log-probabilities are the model's log-softmax at each position
        logp = torch.log_softmax(full_logits(model, prompt + out.token_ids)[len(prompt) - 1 : -1], -1)
        expected = logp.gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1)
        assert torch.allclose(torch.tensor(out.logprobs), expected, atol=1e-4)


def test_more_prompts_than_slots_and_n(model):
    engine = Engine(model, max_batch=3, max_len=48)
    prompts = [[i + 1] * (i % 5 + 1) for i in range(7)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), n=2)
    assert len(outs) == 14
    for i, prompt in enumerate(prompts):
        assert_greedy(model, prompt, outs[2 * i].token_ids)
        assert_greedy(model, prompt, outs[2 * i + 1].token_ids)


def test_sampling_logprobs_and_seeds(model):
    engine = Engine(model, max_batch=8, max_len=64)
    prompt = list(range(3, 12))
    plain = SamplingParams(max_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
    a = engine.generate([prompt], plain)[0]
    # the same seed and index give the same tokens, whatever else shares the batch
    crowd = engine.generate(
        [prompt] + [[5, 6, 7]] * 5, [plain] + [SamplingParams(max_tokens=30, ignore_eos=True)] * 5
    )
    assert crowd[0].token_ids == a.token_ids
    # at temperature 1 without filters, the sampling distribution is the model's
    assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(a.sampling_logprobs), atol=1e-5)
    hot = engine.generate(
        [prompt],
        SamplingParams(
            max_tokens=10, temperature=0.5, top_k=20, top_p=0.8, seed=7, ignore_eos=True, top_logprobs=3
        ),
    )[0]
    logp = torch.log_softmax(full_logits(model, prompt + hot.token_ids)[len(prompt) - 1 : -1], -1)
    for i, tid in enumerate(hot.token_ids):
        assert abs(hot.logprobs[i] - float(logp[i, tid])) < 1e-4
        assert hot.sampling_logprobs[i] >= hot.logprobs[i]  # sharper and renormalised
        assert logp[i].topk(20).indices.tolist().count(tid) == 1  # top-k respected
        ids = [t for t, _ in hot.top_logprobs[i]]
        assert ids == logp[i].topk(3).indices.tolist()
    # n samples of one prompt differ; top_k=1 is greedy
    many = engine.generate([prompt], SamplingParams(max_tokens=8, seed=1, ignore_eos=True), n=4)
    assert len({tuple(c.token_ids) for c in many}) > 1
    one = engine.generate([prompt], SamplingParams(max_tokens=6, top_k=1, seed=3, ignore_eos=True))[0]
    assert_greedy(model, prompt, one.token_ids)


def test_logit_bias_bans_tokens(model):
    engine = Engine(model, max_batch=2, max_len=32)
    prompt = [1, 2, 3]
    greedy = int(full_logits(model, prompt)[-1].argmax())
    out = engine.generate(
        [prompt], SamplingParams(max_tokens=1, temperature=0, logit_bias={greedy: float("-inf")})
    )[0]
    assert out.token_ids[0] != greedy


def test_stop_tokens_strings_and_text(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=4, max_len=96)
    prompt = tokenizer.encode("the quick brown fox")
    free = engine.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    stop_token = free.token_ids[5]
    out = engine.generate(
        [prompt], SamplingParams(max_tokens=40, temperature=0, stop_token_ids=[stop_token], ignore_eos=True)
    )[0]
    first = free.token_ids.index(stop_token)
    assert out.finish_reason == "stop" and out.stop_reason == stop_token
    assert out.token_ids == free.token_ids[: first + 1]  # the stop token is kept in the ids...
    assert out.text == tokenizer.decode(free.token_ids[:first])  # ...but not in the text
    text = free.text
    assert text == tokenizer.decode(free.token_ids)
    target = text[len(text) // 2 : len(text) // 2 + 2]
    if target and "\ufffd" not in text:
        out = engine.generate(
            [prompt], SamplingParams(max_tokens=40, temperature=0, stop=[target], ignore_eos=True)
        )[0]
        assert out.finish_reason == "stop" and out.stop_reason == target
        assert out.text == text[: text.index(target)]
    # <|im_end|> stops by default
    assert tokenizer.im_end_id in engine.default_stop_ids and tokenizer.eos_id in engine.default_stop_ids


def test_streaming_deltas_add_up(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=4, max_len=96)
    prompt = tokenizer.encode("weather in paris")
    params = SamplingParams(max_tokens=30, temperature=1.0, seed=5, stop=["e"])
    handle = engine.submit(prompt, params, stream=True)
    deltas = list(handle)
    final = handle.result()
    assert "".join(d.text for d in deltas) == final.text
    assert [t for d in deltas for t in d.token_ids] == final.token_ids
    assert deltas[-1].finish_reason == final.finish_reason
    assert final == engine.generate([prompt], params)[0]


def test_limits_and_errors(model):
    engine = Engine(model, max_batch=2, max_len=16)
    out = engine.generate(
        [list(range(1, 13))], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
    )[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4  # the context is full
    with pytest.raises(ValueError, match="16"):
        engine.submit(list(range(1, 17)))
    with pytest.raises(ValueError):
        engine.submit([])
    with pytest.raises(ValueError):
        engine.submit([VOCAB])
    with pytest.raises(ValueError):
        engine.submit([1], SamplingParams(top_p=0))
    with pytest.raises(ValueError, match="tokenizer"):
        engine.submit([1], SamplingParams(stop=["x"]))


def test_continuous_batching_joins_running_batch(model):
    engine = Engine(model, max_batch=4, max_len=200).start()
    try:
        long = engine.submit(
            [1, 2, 3], SamplingParams(max_tokens=150, temperature=0, ignore_eos=True), stream=True
        )
        seen = 0
        for _delta in long:  # wait until the long request is decoding
            seen += 1
            if seen == 5:
                break
        short = engine.submit([4, 5], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
        done_short = short.result(timeout=60)
        progress = len(long.completion.token_ids) if long.completion else None
        assert progress is None, "the short request waited for the long one to finish"
        assert_greedy(model, [4, 5], done_short.token_ids)
        assert_greedy(model, [1, 2, 3], long.result(timeout=120).token_ids)
    finally:
        engine.stop()


def test_cancel_and_many_concurrent_submitters(model):
    engine = Engine(model, max_batch=3, max_len=64).start()
    try:
        handle = engine.submit([1, 2], SamplingParams(max_tokens=60, ignore_eos=True))
        handle.cancel()
        assert handle.result(timeout=30).finish_reason == "abort"
        results = {}

        def client(i):
            results[i] = engine.submit(
                [i + 1, i + 2], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
            ).result(timeout=60)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(8):
            assert_greedy(model, [i + 1, i + 2], results[i].token_ids)
    finally:
        engine.stop()


@pytest.mark.parametrize("packed", [False, True])
def test_weights_refresh_and_no_training_statistics(model, packed, monkeypatch):
    if packed:  # every decode weight through a packed copy, which the refresh must rebuild
        for knob in ("_PACK_MIN_ELEMENTS", "_PACK_FEW_ROWS_MIN_ELEMENTS", "_PACK_ONE_ROW_MIN_ELEMENTS"):
            monkeypatch.setattr(cache_module, knob, 0)
    model = build_model(small_config(), seed=3)
    engine = Engine(model, max_batch=2, max_len=32)
    prompt = [3, 1, 4, 1, 5]
    model.reset_stats()
    engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0))
    assert model.tokens_per_expert().sum() == 0 and model.max_logits().abs().sum() == 0
    with torch.no_grad():  # an optimizer step, in place
        for p in model.parameters():
            p.mul_(1.5)
    out = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    assert_greedy(model, prompt, out.token_ids)


def test_non_finite_logits_fail_the_request_not_the_engine():
    """NaN weights make NaN logits: the request fails naming them instead of emitting token 0
    forever, and the engine serves again once the weights are fixed."""
    from openk2.infer import EngineError

    model = build_model(small_config(), seed=3)
    engine = Engine(model, max_batch=2, max_len=32)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    good = model.lm_head.weight[7].clone()
    with torch.no_grad():
        model.lm_head.weight[7] = float("nan")
    with pytest.raises(EngineError, match="not finite"):
        engine.generate([[3, 1, 4]], params)
    with torch.no_grad():
        model.lm_head.weight[7] = good
    assert len(engine.generate([[3, 1, 4]], params)[0].token_ids) == 4


def test_bfloat16_model_generates(tokenizer):
    model = build_model(small_config(), dtype=torch.bfloat16, seed=0)
    engine = Engine(model, tokenizer, max_batch=2, max_len=48)
    out = engine.generate(
        [tokenizer.encode("the fox")], SamplingParams(max_tokens=8, seed=0, ignore_eos=True)
    )[0]
    assert len(out.token_ids) == 8 and all(lp <= 0 for lp in out.logprobs)


@pytest.mark.parametrize("dense", [True, False])
def test_bfloat16_decode_of_a_full_batch_tracks_float32(dense, monkeypatch):
    """Eight sequences fill every routing slot twice over: the dense expert pass (and the packed
    weights) in bfloat16 stay as close to the float32 model as the sparse dispatch does."""
    monkeypatch.setattr(cache_module, "_PACK_FEW_ROWS_MIN_ELEMENTS", 0)  # packed even at this size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (5,), generator=g).tolist() for _ in range(8)]
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):  # the reference: float32, sparse dispatch
        monkeypatch.setattr(cache_module, "_DENSE_EXPERTS", dense and dtype == torch.bfloat16)
        model = build_model(small_config(), dtype=dtype, seed=1)  # the same values in both dtypes
        dec = CompressedDecoder(model, MLACache(model, slots=8, max_len=16))
        dec.prefill(prompts, 0)
        logits[dtype] = dec.decode(torch.arange(8), torch.full((8,), 5)).float()
        if dtype == torch.bfloat16:
            packs_bf16 = cache_module._pack(torch.zeros(4, 4, dtype=torch.bfloat16)) is not None
            assert any(f.all_up is not None for f in dec.weights.ffn) == (dense and packs_bf16)
    scale = logits[torch.float32].abs().max()
    assert (logits[torch.bfloat16] - logits[torch.float32]).abs().max() < 0.03 * scale


def test_one_forward_per_step_for_the_whole_batch(model, monkeypatch):
    """Eight sequences advance together: one prefill and one batched decode per token position."""
    engine = Engine(model, max_batch=8, max_len=80)
    prefills, decodes = [], []
    prefill, decode = engine.decoder.prefill, engine.decoder.decode

    def counting_prefill(prompts, *args, **kwargs):
        prefills.append(len(prompts))
        return prefill(prompts, *args, **kwargs)

    def counting_decode(tokens, *args, **kwargs):
        decodes.append(len(tokens))
        return decode(tokens, *args, **kwargs)

    monkeypatch.setattr(engine.decoder, "prefill", counting_prefill)
    monkeypatch.setattr(engine.decoder, "decode", counting_decode)
    prompts = [[i + 1] * (i + 3) for i in range(8)]
    engine.generate(prompts, SamplingParams(max_tokens=33, temperature=0, ignore_eos=True))
    assert prefills == [8] and decodes == [8] * 32
