import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from openk2 import CheckpointError, build_model, load_model, preset, save_model
from openk2.model.moe import expert_swiglu

from attention_reference import causal_logits


def tiny(**changes):
    return preset("tiny", vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                  q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                  **changes)


def test_forward_shapes_and_stats():
    model = build_model(tiny())
    ids = torch.randint(0, 128, (2, 12))
    logits = model(ids)
    assert logits.shape == (2, 12, 128)
    assert model.max_logits().shape == (4, 4)
    counts = model.tokens_per_expert()
    assert counts.shape == (3, 8)
    assert torch.all(counts.sum(1) == 2 * 12 * 2)  # every token picks top-2
    model.reset_stats()
    assert model.tokens_per_expert().sum() == 0 and model.max_logits().abs().sum() == 0


def test_max_logit_matches_explicit_attention():
    model = build_model(tiny(), seed=1)
    ids = torch.randint(0, 128, (3, 10))
    model(ids)
    attn = model.model.layers[0].self_attn
    x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
    cos, sin = model.model.rotary_emb(torch.arange(10)[None])
    logits = causal_logits(attn, x, cos, sin)
    expected = logits.amax(dim=(0, 2, 3))
    assert torch.allclose(attn.max_logits, expected, atol=1e-5)


def test_max_logit_tracking_can_be_switched_off():
    model = build_model(tiny())
    model.set_track_max_logits(False)
    model(torch.randint(0, 128, (1, 8)))
    assert model.max_logits().abs().sum() == 0


def test_dispatch_matches_dense_reference():
    torch.manual_seed(0)
    model = build_model(tiny(), seed=2)
    moe = next(model.moe_layers())
    x = torch.randn(2, 9, 64)
    out = moe(x)
    flat = x.reshape(-1, 64)
    weights, experts, _ = moe.gate(flat)
    e = moe.experts
    ref = torch.zeros_like(flat)
    for n in range(flat.shape[0]):
        for k in range(experts.shape[1]):
            i = experts[n, k]
            h = torch.nn.functional.silu(flat[n] @ e.gate_proj[i].T) * (flat[n] @ e.up_proj[i].T)
            ref[n] += weights[n, k] * (h @ e.down_proj[i].T)
    ref += moe.shared_experts(flat)
    assert torch.allclose(out.reshape(-1, 64), ref, atol=1e-5)


def test_dispatch_runs_only_hit_experts(monkeypatch):
    model = build_model(tiny(), seed=2)
    moe = next(model.moe_layers())
    with torch.no_grad():
        moe.gate.e_score_correction_bias[:] = torch.tensor([9.0, 9.0, 0, 0, 0, 0, 0, 0])
    calls = []
    original = torch.mm

    def counting(a, b, **kwargs):
        calls.append(b.shape)
        return original(a, b, **kwargs)

    monkeypatch.setattr(torch, "mm", counting)
    with torch.no_grad():
        moe.experts(torch.randn(5, 64), *moe.gate(torch.randn(5, 64))[:2],
                    torch.tensor([5, 5, 0, 0, 0, 0, 0, 0]))
    assert len(calls) == 2 * 3  # two experts hit, three matmuls each


@pytest.mark.parametrize("sizes", [[3, 0, 5, 1, 0, 7], [0, 0, 0]], ids=["some_unused", "no_rows"])
def test_expert_swiglu_matches_a_loop_over_experts(sizes):
    """The grouped expert SwiGLU (one autograd node per layer) against the per-expert formula:
    values and every gradient in float64, zero gradients for experts without rows."""
    g = torch.Generator().manual_seed(0)
    E, I, D, P = len(sizes), 6, 5, sum(sizes)
    inputs = [torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
              for shape in ((P, D), (P, 1), (E, I, D), (E, I, D), (E, D, I))]
    xs, scale, gate, up, down = inputs

    def loop():
        out, start = [xs.new_zeros(0, D)], 0
        for e, n in enumerate(sizes):
            x = xs[start:start + n]
            h = torch.nn.functional.silu(x @ gate[e].T) * (x @ up[e].T)
            out.append((h * scale[start:start + n]) @ down[e].T)
            start += n
        return torch.cat(out)

    d_out = torch.randn(P, D, generator=g, dtype=torch.float64)
    ours = expert_swiglu(*inputs, sizes)
    ours_grads = torch.autograd.grad(ours, inputs, d_out, allow_unused=True)
    ref = loop()
    ref_grads = torch.autograd.grad(ref, inputs, d_out, allow_unused=True)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(("xs", "scale", "gate", "up", "down"), ours_grads, ref_grads):
        expected = torch.zeros_like(a) if b is None else b  # the loop leaves unused inputs out
        torch.testing.assert_close(a, expected, rtol=1e-12, atol=1e-12, msg=name)
    unused = [e for e, n in enumerate(sizes) if n == 0]
    assert all(ours_grads[k][unused].eq(0).all() for k in (2, 3, 4))
    if P:
        assert torch.autograd.gradcheck(lambda *t: expert_swiglu(*t, sizes), inputs)


def test_bias_only_affects_selection():
    model = build_model(tiny(), seed=3)
    router = next(model.moe_layers()).gate
    x = torch.randn(6, 64)
    w0, e0, _ = router(x)
    with torch.no_grad():
        router.e_score_correction_bias.fill_(0.5)  # a uniform shift selects the same experts
    w1, e1, _ = router(x)
    assert torch.equal(e0.sort(-1).values, e1.sort(-1).values)
    assert torch.allclose(w0.sort(-1).values, w1.sort(-1).values)
    assert torch.allclose(w0.sum(-1), torch.full((6,), router.routed_scaling_factor))


def test_meta_then_materialise_is_deterministic():
    a = build_model(tiny(), seed=11)
    b = build_model(tiny(), seed=11)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


def test_initial_values_depend_on_seed_not_dtype():
    """NormalInit: a bf16 build holds the float32 build's values rounded; another seed differs."""
    a = build_model(tiny(), seed=11)
    b = build_model(tiny(), dtype=torch.bfloat16, seed=11)
    c = build_model(tiny(), seed=12)
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p.to(q.dtype), q), name
        if p.ndim >= 2:
            assert not torch.equal(p, r), name


def test_fused_expert_layout_loads(tmp_path):
    model = build_model(tiny(), seed=4)
    save_model(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    fused = {}
    for layer in range(1, 4):
        prefix = f"model.layers.{layer}.mlp.experts"
        gate = torch.stack([tensors.pop(f"{prefix}.{e}.gate_proj.weight") for e in range(8)])
        up = torch.stack([tensors.pop(f"{prefix}.{e}.up_proj.weight") for e in range(8)])
        down = torch.stack([tensors.pop(f"{prefix}.{e}.down_proj.weight") for e in range(8)])
        fused[f"{prefix}.gate_up_proj"] = torch.cat([gate, up], dim=1)
        fused[f"{prefix}.down_proj"] = down
    save_file({**tensors, **fused}, tmp_path / "model.safetensors")
    again = load_model(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        assert torch.allclose(model(ids), again(ids), atol=1e-6)


def test_fp8_block_scaled_weights_are_dequantised(tmp_path):
    model = build_model(tiny(), seed=4)
    save_model(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    name = "model.layers.0.self_attn.o_proj.weight"
    w = tensors[name]  # [64, 32]
    scale = torch.tensor([[0.01]])
    tensors[name] = (w / 0.01).to(torch.float8_e4m3fn)
    tensors[name.replace("weight", "weight_scale_inv")] = scale
    save_file(tensors, tmp_path / "model.safetensors")
    again = load_model(tmp_path, dtype=torch.float32)
    got = again.model.layers[0].self_attn.o_proj.weight
    assert torch.allclose(got, w, rtol=0.07, atol=1e-4)


def test_missing_tensor_is_named(tmp_path):
    save_model(build_model(tiny()), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.2.self_attn.kv_b_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.layers.2.self_attn.kv_b_proj.weight"):
        load_model(tmp_path)


def test_missing_expert_is_named(tmp_path):
    save_model(build_model(tiny()), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"experts\.5\.up_proj"):
        load_model(tmp_path)


def test_misshaped_tensor_is_named(tmp_path):
    save_model(build_model(tiny()), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(65)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.norm.weight has shape \[65\]"):
        load_model(tmp_path)


def test_no_weights_is_reported(tmp_path):
    save_model(build_model(tiny()), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no safetensors"):
        load_model(tmp_path)


def test_truncated_weights_file_is_named(tmp_path):
    save_model(build_model(tiny()), tmp_path)
    weights = tmp_path / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_model(tmp_path)


def test_bfloat16_keeps_router_in_float32(tmp_path):
    model = build_model(tiny(), dtype=torch.bfloat16)
    router = next(model.moe_layers()).gate
    assert router.weight.dtype == torch.float32 and router.e_score_correction_bias.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16
    save_model(model, tmp_path)
    again = load_model(tmp_path)
    assert again.lm_head.weight.dtype == torch.bfloat16
    assert next(again.moe_layers()).gate.weight.dtype == torch.float32
    assert again(torch.randint(0, 128, (1, 5))).dtype == torch.bfloat16


def test_backward_reaches_every_parameter():
    model = build_model(tiny())
    model(torch.randint(0, 128, (4, 16))).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name


def test_rms_norm_backward_matches_autograd_of_the_formula():
    from openk2.model.norm import RMSNorm, _RMSNormFloat32

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.1 * torch.randn(16, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFloat32.apply(x, w, 1e-6), (x, w))

    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.copy_(w)
    xf = x.detach().float().requires_grad_()
    out = norm(xf)
    ref_x = xf.detach().clone().requires_grad_()
    ref = norm.weight * (ref_x * torch.rsqrt(ref_x.pow(2).mean(-1, keepdim=True) + norm.eps))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    upstream = torch.randn(out.shape, generator=g)
    dx, dw = torch.autograd.grad(out, (xf, norm.weight), upstream)
    ref_dx, ref_dw = torch.autograd.grad(ref, (ref_x, norm.weight), upstream)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-5, atol=1e-6)


def test_reader_reads_row_ranges(tmp_path):
    """CheckpointReader (sharded loading) returns rows a:b of a tensor as the whole read does,
    for FP8 block-scaled matrices cut inside a scale block and for stacked experts."""
    import json

    from openk2 import ModelConfig
    from openk2.model.hf import CheckpointReader

    model = build_model(tiny(), seed=4)
    save_model(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [4, 8]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = load_file(tmp_path / "model.safetensors")
    name = "model.layers.0.self_attn.o_proj.weight"  # [64, 32]: 16 x 4 scale blocks
    scale = torch.rand(16, 4, generator=torch.Generator().manual_seed(0)) + 0.5
    tensors[name] = (tensors[name]
                     / scale.repeat_interleave(4, 0).repeat_interleave(8, 1)).to(torch.float8_e4m3fn)
    tensors[name.replace("weight", "weight_scale_inv")] = scale
    save_file(tensors, tmp_path / "model.safetensors")

    reader = CheckpointReader(tmp_path, ModelConfig.from_hf(tmp_path))
    whole = reader.read(name)
    assert whole.shape == (64, 32) and whole.dtype == torch.float32
    for a, b in ((0, 64), (5, 13), (30, 31), (60, 64)):
        assert torch.equal(reader.read(name, a, b), whole[a:b])
    experts = "model.layers.1.mlp.experts.up_proj"
    assert reader.shape(experts) == (8, 32, 64)
    assert torch.equal(reader.read(experts, 2, 5), model.state_dict()[experts][2:5])


def test_onednn_linear_matches_torch_and_declines_what_it_cannot_take(monkeypatch):
    from openk2.model import linear as onednn

    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(40, 24, generator=g), torch.randn(7, 24, generator=g)
    assert not onednn.supports(x, w.double()) and not onednn.supports(x.double(), w.double())
    assert not onednn.supports(torch.empty(2, 24, device="meta"), w)
    assert onednn.pack(w.to(torch.float16)) is None
    if not onednn.AVAILABLE:
        pytest.skip("this torch build has no oneDNN linear")
    assert onednn.supports(x, w)
    trained = w.clone().requires_grad_()
    assert not onednn.supports(x, trained)  # the op has no backward
    with torch.no_grad():
        assert onednn.supports(x, trained)
    for weight in (w, onednn.pack(w)):
        torch.testing.assert_close(onednn.linear(x, weight), x @ w.T, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert not onednn.supports(x, w) and onednn.pack(w) is None


def test_importing_the_onednn_probe_leaves_the_random_generator_alone():
    code = ("import torch; torch.manual_seed(0); a = torch.rand(3); torch.manual_seed(0); "
            "import openk2.model.linear; import openk2.infer.cache; assert torch.equal(torch.rand(3), a)")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("T", [10, 200])  # one block of query rows; three uneven ones
def test_explicit_cpu_attention_matches_fused_kernel(monkeypatch, T):
    """Short CPU sequences take the explicit-probabilities path; it must agree with the fused
    kernel in output, every gradient and the max-logit statistic."""
    import openk2.model.attention as attention

    assert len(attention._row_blocks(T)) == (1 if T < 128 else 3)
    ids = torch.randint(0, 128, (2, T))
    results = []
    for budget in (attention._EXPLICIT_ATTENTION_ELEMENTS, 0):
        monkeypatch.setattr(attention, "_EXPLICIT_ATTENTION_ELEMENTS", budget)
        model = build_model(tiny(rope_interleave=True), seed=4).double()
        logits = model(ids)
        (logits.sin().sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logits.detach(), model.max_logits().clone(), grads))
    (explicit, explicit_max, explicit_grads), (fused, fused_max, fused_grads) = results
    assert torch.allclose(explicit, fused, atol=1e-10)
    assert torch.allclose(explicit_max, fused_max, atol=1e-10)
    assert explicit_max.abs().sum() > 0
    assert explicit_grads.keys() == fused_grads.keys()
    for name, grad in explicit_grads.items():
        assert torch.allclose(grad, fused_grads[name], atol=1e-10), name
