"""The MuonClip object: config, parameter roles, step statistics, exact resume, non-finite handling,
schedules."""

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import openk2
from openk2.config import ConfigError
from openk2.optim import NonFiniteError, OptimConfig, build_optimizer, classify_parameters, lr_at
from openk2.optim.schedule import cosine_lr, wsd_lr




def tiny_model(**overrides):
    return openk2.build_model(openk2.preset("tiny", num_hidden_layers=2, vocab_size=512, **overrides), seed=0)


def backward(model, ids):
    logits = model(ids)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (2, 24), generator=g) for _ in range(n)]


# ---- config ------------------------------------------------------------------------------

def test_config_from_dict_rejects_unknown_keys_by_name():
    cfg = OptimConfig.from_dict({"name": "muonclip", "lr": 1e-3, "betas": [0.9, 0.95], "nesterov": True})
    assert cfg.betas == (0.9, 0.95) and cfg.lr == 1e-3
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        OptimConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ConfigError, match="router_gate"):
        OptimConfig(router_gate="sgd")
    with pytest.raises(ConfigError, match="ns_dtype"):
        OptimConfig(ns_dtype="float17")
    assert OptimConfig.from_dict(OptimConfig().to_dict()) == OptimConfig()


def test_roles_are_not_ndim():
    model = tiny_model()
    roles = {r.name: r for r in classify_parameters(model)}
    assert roles["model.embed_tokens.weight"].algorithm == "adamw"      # 2-D, AdamW
    assert roles["lm_head.weight"].algorithm == "adamw"                  # 2-D, AdamW
    assert roles["model.layers.1.mlp.experts.gate_proj"].algorithm == "muon"  # 3-D, Muon
    assert roles["model.layers.1.mlp.experts.down_proj"].role == "expert"
    assert roles["model.layers.0.self_attn.q_b_proj.weight"].algorithm == "muon"
    assert roles["model.layers.0.input_layernorm.weight"].algorithm == "adamw"
    assert roles["model.layers.1.mlp.gate.weight"].algorithm == "adamw"
    as_muon = {r.name: r for r in classify_parameters(model, router_gate="muon")}
    assert as_muon["model.layers.1.mlp.gate.weight"].algorithm == "muon"
    assert len(roles) == len(list(model.parameters()))

    opt = build_optimizer(model, OptimConfig(router_gate="muon", aux_loss_alpha=1e-3))
    assert all(moe.aux_loss_alpha == 1e-3 for moe in model.moe_layers())
    muon_ids = {id(p) for p in opt.muon.param_groups[0]["params"]}
    assert id(model.model.layers[1].mlp.gate.weight) in muon_ids
    assert id(model.lm_head.weight) not in muon_ids
    adamw_only = build_optimizer(model, OptimConfig(name="adamw"))
    assert adamw_only.muon is None and len(adamw_only.param_groups[0]["params"]) == len(roles)


# ---- step --------------------------------------------------------------------------------

def test_step_returns_stats_and_resets_model():
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig(lr=1e-3, qk_clip_tau=0.0))
    for ids in batches(2):  # two micro-batches
        backward(model, ids)
    max_logit = model.max_logits().max().item()
    counts = model.tokens_per_expert().double()
    assert counts.sum() == 2 * 2 * 24 * 2  # micro-batches x tokens x top-2, summed by the model
    stats = opt.step()
    assert set(stats) >= {"max_logit", "clipped_heads", "expert_imbalance", "skipped"}
    assert stats["max_logit"] == pytest.approx(max_logit) and stats["clipped_heads"] == 0
    assert stats["expert_imbalance"] == pytest.approx((counts.amax(-1) / counts.mean(-1)).mean().item())
    assert stats["skipped"] is False
    assert model.max_logits().abs().sum() == 0 and model.tokens_per_expert().sum() == 0


def test_state_dict_resume_is_bitwise():
    cfg = OptimConfig(lr=2e-2, qk_clip_tau=0.2, router_bias_rate=1e-2, warmup_steps=2, decay_fraction=0.5)
    data, total = batches(6), 6
    model_a = tiny_model()
    opt_a = build_optimizer(model_a, cfg)

    def run(model, opt, steps):
        clipped = 0
        for step in steps:
            opt.set_lr(lr_at(cfg, step, total))
            backward(model, data[step])
            clipped += opt.step()["clipped_heads"]
            opt.zero_grad(set_to_none=True)
        return clipped

    run(model_a, opt_a, range(3))
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "optim": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model_b = tiny_model()
    model_b.load_state_dict(saved["model"])
    opt_b = build_optimizer(model_b, cfg)
    opt_b.load_state_dict(saved["optim"])
    clipped_a = run(model_a, opt_a, range(3, 6))
    clipped_b = run(model_b, opt_b, range(3, 6))
    assert clipped_a == clipped_b > 0  # QK-Clip was exercised
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    assert opt_a.steps == opt_b.steps == 6
    with pytest.raises(ValueError, match="name='muonclip'"):
        build_optimizer(tiny_model(), OptimConfig(name="adamw")).load_state_dict(saved["optim"])


def _snapshot(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def _assert_tree_equal(a, b, where="state"):
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_tree_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_tree_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _assert_same(before, after):
    """Weights, buffers and the Muon/AdamW state are bitwise what they were."""
    (model_a, opt_a), (model_b, opt_b) = before, after
    _assert_tree_equal(model_a, model_b, "model")
    _assert_tree_equal(opt_a["muon"], opt_b["muon"], "muon")
    _assert_tree_equal(opt_a["adamw"], opt_b["adamw"], "adamw")


def test_nonfinite_gradient_raises_and_changes_nothing():
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig(lr=1e-2))
    backward(model, batches(1)[0])
    opt.step()
    opt.zero_grad()
    backward(model, batches(1, seed=2)[0])
    model.model.layers[1].mlp.experts.up_proj.grad[0, 0, 0] = float("nan")
    before = _snapshot(model, opt)
    with pytest.raises(NonFiniteError, match=r"gradient of model\.layers\.1\.mlp\.experts\.up_proj"):
        opt.step()
    _assert_same(before, _snapshot(model, opt))
    model.model.layers[1].mlp.experts.up_proj.grad[0, 0, 0] = 0.0
    next(model.attention_layers()).max_logits[1] = float("inf")
    with pytest.raises(NonFiniteError, match="max-logit of layer 0"):
        opt.step()


def test_nonfinite_skip_leaves_weights_and_state():
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig(lr=1e-2, nonfinite="skip"))
    backward(model, batches(1)[0])
    opt.step()
    opt.zero_grad()
    backward(model, batches(1, seed=2)[0])
    model.lm_head.weight.grad[3, 4] = float("inf")
    before = _snapshot(model, opt)
    stats = opt.step()
    assert stats["skipped"] is True and stats["clipped_heads"] == 0
    _assert_same(before, _snapshot(model, opt))
    assert opt.skipped_steps == 1 and opt.steps == 1
    assert model.tokens_per_expert().sum() == 0  # statistics of the skipped step are dropped


# ---- schedules ---------------------------------------------------------------------------

def test_wsd_schedule_key_points():
    peak = 2e-4
    def lr(step, **kw):
        return wsd_lr(step, 1000, peak, warmup=100, decay_fraction=0.3, final_ratio=0.1, **kw)

    assert lr(0) == pytest.approx(peak / 100)
    assert lr(49) == pytest.approx(peak / 2)
    assert lr(99) == pytest.approx(peak)
    assert lr(100) == lr(500) == lr(700) == peak  # stable until the decay starts at step 700
    assert lr(850) == pytest.approx(peak * (0.1 + 0.9 * 0.5))  # cosine half-way
    assert lr(850, decay="linear") == pytest.approx(peak * (0.1 + 0.9 * 0.5))
    assert lr(775, decay="linear") == pytest.approx(peak * (0.1 + 0.9 * 0.75))
    assert lr(775) == pytest.approx(peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))))
    assert lr(1000) == pytest.approx(peak * 0.1) and lr(5000) == pytest.approx(peak * 0.1)
    assert all(lr(s) >= lr(s + 1) for s in range(100, 1000))


def test_cosine_and_constant_schedules():
    assert cosine_lr(0, 100, 1.0, warmup=10) == pytest.approx(0.1)
    assert cosine_lr(10, 100, 1.0, warmup=10) == pytest.approx(1.0)
    assert cosine_lr(55, 100, 1.0, warmup=10, final_ratio=0.0) == pytest.approx(0.5)
    assert cosine_lr(100, 100, 1.0, warmup=10, final_ratio=0.1) == pytest.approx(0.1)
    cfg = OptimConfig(lr=1.0, schedule="constant", warmup_steps=4)
    assert [lr_at(cfg, s, 10) for s in (0, 3, 9)] == [0.25, 1.0, 1.0]
    k2 = OptimConfig()  # K2: 500 warm-up steps, flat 2e-4, cosine to 2e-5 over the last 35 %
    assert lr_at(k2, 499, 10_000) == pytest.approx(2e-4) and lr_at(k2, 10_000, 10_000) == pytest.approx(2e-5)


@pytest.mark.parametrize("fast", [True, False])
def test_bf16_on_a_cpu_without_fast_bf16_warns_and_names_the_fix(fast, monkeypatch):
    """bf16 Newton–Schulz or a bf16 forward on a CPU that multiplies bf16 through torch's slow
    fallback: a warning naming the setting and the float32 fix; none where bf16 is fast."""
    from openk2.model import linear
    from openk2.train.trainer import TrainSettings

    monkeypatch.setattr(linear, "fast_bf16", lambda: fast)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_optimizer(tiny_model(), OptimConfig(ns_dtype="bfloat16"))
        sizes = dict(steps=1, batch_size=1, micro_batch_size=1, seq_len=8)
        TrainSettings(**sizes, dtype="bfloat16")
        build_optimizer(tiny_model(), OptimConfig())  # float32: never warns
        TrainSettings(**sizes)
    messages = [str(w.message) for w in caught if "slow fallback" in str(w.message)]
    if fast:
        assert messages == []
    else:
        assert len(messages) == 2
        assert "optim.ns_dtype='bfloat16'" in messages[0] and "train.dtype='bfloat16'" in messages[1]
        assert all("use 'float32'" in m for m in messages)
