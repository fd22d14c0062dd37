"""QK-Clip's exact invariant, the aux-loss-free router bias, and both under torch.distributed (gloo)."""

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
import pytest

import openk2
from openk2.optim import OptimConfig, build_optimizer, scale_rows_, update_router_bias

from attention_reference import causal_logits

TAU = 100.0


def one_layer_model(q_lora: bool):
    extra = {} if q_lora else {"q_lora_rank": None}
    config = openk2.preset("tiny", num_hidden_layers=1, first_k_dense_replace=1, vocab_size=512, **extra)
    return openk2.build_model(config, seed=0)


def capture_logits(attn):
    """Keep the full causal logits [B, H, T, T] of the module's every forward, recomputed from its weights."""
    seen = {}

    def hook(module, args):
        seen["logits"] = causal_logits(module, *args)

    attn.register_forward_pre_hook(hook)
    return seen


def boost_heads(attn, targets: dict[int, float], current: torch.Tensor) -> None:
    """Scale head h's whole query (nope and rope rows) so that its max logit becomes targets[h]."""
    H, d = attn.num_heads, attn.nope_dim + attn.rope_dim
    with torch.no_grad():
        rows = attn.query_proj.weight.view(H, d, -1)
        for h, target in targets.items():
            rows[h] *= target / current[h]


def loss_of(model, ids):
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


@pytest.mark.parametrize("q_lora", [True, False], ids=["q_lora", "no_q_lora"])
def test_clipped_head_logits_scale_by_exactly_gamma(q_lora):
    model = one_layer_model(q_lora)
    attn = next(model.attention_layers())
    seen = capture_logits(attn)
    ids = torch.randint(0, 512, (2, 32))
    model(ids)
    boost_heads(attn, {0: 400.0, 2: 150.0}, model.max_logits()[0])
    model.reset_stats()
    opt = build_optimizer(model, OptimConfig(lr=0.0, qk_clip_tau=TAU))

    loss_of(model, ids).backward()
    old = seen["logits"].clone()                              # [B, H, T, T]
    max_before = model.max_logits()[0].clone()
    assert max_before[0] == pytest.approx(400.0, rel=1e-4) and max_before[2] == pytest.approx(150.0, rel=1e-4)
    assert max_before[1] < TAU and max_before[3] < TAU
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    stats = opt.step()
    assert stats["clipped_heads"] == 2 and stats["max_logit"] == pytest.approx(400.0, rel=1e-4)

    model(ids)
    new = seen["logits"]
    valid = old.isfinite()
    for h in range(attn.num_heads):
        if h in (0, 2):
            gamma = TAU / max_before[h]
            expect = gamma * old[:, h][valid[:, h]]
            error = (new[:, h][valid[:, h]] - expect).abs().max() / expect.abs().max()
            assert error < 1e-5, (h, error)
            assert model.max_logits()[0, h] == pytest.approx(TAU, rel=1e-5)
        else:
            assert torch.equal(new[:, h], old[:, h])  # unclipped heads: bitwise the same logits

    # Weights: only the clipped heads' q rows and k-nope rows changed; v rows, the rotary key
    # (kv_a_proj_with_mqa), q_a_proj and norms are bitwise unchanged (lr = 0).
    H, N, R, V = attn.num_heads, attn.nope_dim, attn.rope_dim, attn.v_dim
    q_name = "model.layers.0.self_attn." + ("q_b_proj" if q_lora else "q_proj") + ".weight"
    q_old = weights[q_name].view(H, N + R, -1)
    q_new = attn.query_proj.weight.detach().view(H, N + R, -1)
    kv_old = weights["model.layers.0.self_attn.kv_b_proj.weight"].view(H, N + V, -1)
    kv_new = attn.kv_b_proj.weight.detach().view(H, N + V, -1)
    for h in range(H):
        assert torch.equal(kv_new[h, N:], kv_old[h, N:])  # v rows
        if h in (1, 3):
            assert torch.equal(q_new[h], q_old[h]) and torch.equal(kv_new[h], kv_old[h])
        else:
            gamma = TAU / max_before[h]
            torch.testing.assert_close(q_new[h, :N], q_old[h, :N] * gamma.sqrt(), rtol=1e-6, atol=0)
            torch.testing.assert_close(q_new[h, N:], q_old[h, N:] * gamma, rtol=1e-6, atol=0)
            torch.testing.assert_close(kv_new[h, :N], kv_old[h, :N] * gamma.sqrt(), rtol=1e-6, atol=0)
    changed = {q_name, "model.layers.0.self_attn.kv_b_proj.weight"}
    for name, p in model.named_parameters():
        if name not in changed:
            assert torch.equal(p.detach(), weights[name]), name


def test_qk_clip_disabled_and_adamw():
    model = one_layer_model(True)
    attn = next(model.attention_layers())
    ids = torch.randint(0, 512, (1, 16))
    model(ids)
    boost_heads(attn, {1: 300.0}, model.max_logits()[0])
    for tau, name, clipped in [(0.0, "muonclip", 0), (TAU, "adamw", 1)]:
        model.reset_stats()
        opt = build_optimizer(model, OptimConfig(name=name, lr=0.0, qk_clip_tau=tau))
        loss_of(model, ids).backward()
        assert opt.step()["clipped_heads"] == clipped
        opt.zero_grad()


# ---- router bias --------------------------------------------------------------------------

def test_router_bias_direction_and_magnitude():
    model = openk2.build_model(openk2.preset("tiny", vocab_size=512), seed=0)
    layers = list(model.moe_layers())
    counts = torch.tensor([[10.0, 2, 6, 6, 6, 6, 6, 6]] * len(layers))  # mean 6
    delta = update_router_bias(layers, counts, rate=1e-3)
    bias = layers[0].gate.e_score_correction_bias
    assert torch.equal(bias, torch.tensor([-1e-3, 1e-3, 0, 0, 0, 0, 0, 0]))  # overloaded down, underloaded up
    assert torch.equal(delta[0], bias)
    counts = torch.tensor([[10.0, 2, 2, 2, 6, 6, 6, 14]] * len(layers))  # mean 6
    centered = update_router_bias(layers, counts, 1e-3, centered=True)
    assert centered[0].sum().abs() < 1e-9
    torch.testing.assert_close(centered[0], torch.tensor([-1.0, 1, 1, 1, 0, 0, 0, -1]) * 1e-3 - 1e-3 / 8)


def test_router_bias_follows_step_counts():
    model = openk2.build_model(openk2.preset("tiny", vocab_size=512), seed=0)
    opt = build_optimizer(model, OptimConfig(lr=0.0, router_bias_rate=1e-3))
    loss_of(model, torch.randint(0, 512, (2, 32))).backward()
    load = model.tokens_per_expert().double()
    expected = (1e-3 * torch.sign(load.mean(-1, keepdim=True) - load)).float()
    opt.step()
    for moe, e in zip(model.moe_layers(), expected):
        assert torch.equal(moe.gate.e_score_correction_bias, e)


# ---- distributed ---------------------------------------------------------------------------

def _worker(rank: int, world: int, init_file: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from openk2.optim import Muon

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # Same weights everywhere, different data per rank: local statistics differ.
        model = openk2.build_model(openk2.preset("tiny", num_hidden_layers=2, vocab_size=512), seed=0)
        attn = next(model.attention_layers())
        torch.manual_seed(0)
        model(torch.randint(0, 512, (1, 16)))
        boost_heads(attn, {0: 250.0, 3: 90.0}, model.max_logits()[0])
        model.reset_stats()
        opt = build_optimizer(model, OptimConfig(lr=1e-3, qk_clip_tau=TAU, router_bias_rate=1e-3))
        torch.manual_seed(100 + rank)
        loss_of(model, torch.randint(0, 512, (2, 24))).backward()
        for p in model.parameters():  # what DDP does: average the gradients
            dist.all_reduce(p.grad)
            p.grad /= world
        local_max, local_counts = model.max_logits().clone(), model.tokens_per_expert().clone()
        every_max = [torch.zeros_like(local_max) for _ in range(world)]
        every_count = [torch.zeros_like(local_counts) for _ in range(world)]
        dist.all_gather(every_max, local_max)
        dist.all_gather(every_count, local_counts)
        global_max = torch.stack(every_max).amax(0)
        global_counts = torch.stack(every_count).sum(0).double()
        assert not torch.equal(every_max[0], every_max[1])  # the test means something
        stats = opt.step()
        assert stats["max_logit"] == pytest.approx(global_max.max().item())
        assert stats["clipped_heads"] == int((global_max > TAU).sum())
        expected_bias = (1e-3 * torch.sign(global_counts.mean(-1, keepdim=True) - global_counts)).float()
        for moe, e in zip(model.moe_layers(), expected_bias):
            assert torch.equal(moe.gate.e_score_correction_bias, e)
        flat = torch.cat([t.detach().flatten() for t in model.state_dict().values()])
        other = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(other, flat)
        assert torch.equal(other[0], other[1])  # identical clipped weights and bias on every rank

        # DTensor (FSDP2-style Shard(0), uneven rows): row scaling and Muon on the local shard.
        mesh = init_device_mesh("cpu", (world,))
        g = torch.Generator().manual_seed(7)
        full, row_scale = torch.randn(7, 5, generator=g), torch.rand(7, generator=g) + 0.5
        sharded = distribute_tensor(full, mesh, [Shard(0)])
        scale_rows_(sharded, row_scale)
        assert torch.equal(sharded.full_tensor(), full * row_scale[:, None])
        grad = torch.randn(7, 5, generator=g)
        plain = torch.nn.Parameter(full.clone())
        dt = torch.nn.Parameter(distribute_tensor(full.clone(), mesh, [Shard(0)]))
        plain.grad, dt.grad = grad.clone(), distribute_tensor(grad, mesh, [Shard(0)])
        Muon([plain], lr=0.1).step()
        Muon([dt], lr=0.1).step()
        torch.testing.assert_close(dt.full_tensor(), plain.detach(), rtol=0, atol=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_distributed_statistics_are_all_reduced(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "pg")), nprocs=2, join=True)


def qk_clip_experiment():
    """experiments/qk_clip.py as a module (experiments/ is not a package)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    try:
        import qk_clip
    finally:
        sys.path.pop(0)
    return qk_clip


def test_experiment_head_drift_reads_clipped_heads_after_the_first_clip():
    head_drift = qk_clip_experiment().head_drift
    records = [
        {"step": 1, "head_max_before": [20.0, 1.0], "head_max_after": [30.0, 1.0]},  # before `after`
        {"step": 3, "head_max_before": [12.0, 4.0], "head_max_after": [11.0, 4.4]},
        {"step": 4, "head_max_before": [15.0, 11.0], "head_max_after": [10.5, 12.0]},
        {"step": 5},  # no per-head record (the probe's first step)
    ]
    clipped = head_drift(records, tau=10.0, clipped=True, after=2)
    assert clipped["clipped_head_after_over_tau_median"] == pytest.approx(1.1)  # 1.1, 1.05, 1.2
    assert clipped["clipped_head_after_over_tau_p90"] == pytest.approx(1.2)
    assert clipped["max_over_heads_after_over_tau_median"] == pytest.approx((1.1 + 1.2) / 2)
    assert clipped["heads_clipped_per_step_median"] == pytest.approx(1.5)
    plain = head_drift(records, tau=10.0, clipped=False, after=2)  # heads above tau / 2 only
    assert plain["head_growth_median"] == pytest.approx(11 / 12)  # of 11/12, 10.5/15, 12/11


def test_experiment_weight_scales_split_the_rows_qk_clip_owns(tmp_path):
    """experiments/qk_clip.py's weight table reads each part from the right rows."""
    weight_scales = qk_clip_experiment().weight_scales
    model = one_layer_model(q_lora=True)
    attn = next(model.attention_layers())
    H, nope, rope, v = attn.num_heads, attn.nope_dim, attn.rope_dim, attn.v_dim
    with torch.no_grad():
        q = attn.q_b_proj.weight.view(H, nope + rope, -1)
        q[:, :nope], q[:, nope:] = 1.0, -2.0
        kv = attn.kv_b_proj.weight.view(H, nope + v, -1)
        kv[:, :nope], kv[:, nope:] = 3.0, 4.0
        attn.kv_a_proj_with_mqa.weight[:-rope] = 9.0
        attn.kv_a_proj_with_mqa.weight[-rope:] = 5.0
        attn.q_a_layernorm.weight.fill_(6.0)
        attn.kv_a_layernorm.weight.fill_(7.0)
    openk2.save_model(model, tmp_path)
    (parts,) = weight_scales(tmp_path)
    assert parts == pytest.approx({"q_nope": 1.0, "q_rope": 2.0, "k_nope": 3.0, "v": 4.0,
                                   "k_rope (kv_a_proj)": 5.0, "q_a_layernorm": 6.0, "kv_a_layernorm": 7.0})


def test_experiment_parts_cover_every_parameter_once():
    parts = qk_clip_experiment().parts
    for q_lora in (True, False):
        model = one_layer_model(q_lora=q_lora)
        groups = parts(model)
        attn = next(model.attention_layers())
        ids = [i for members in groups.values() for i in members]
        assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each parameter in one group
        assert id(attn.query_proj.weight) in groups["clipped_rows"]
        assert id(attn.kv_a_proj_with_mqa.weight) in groups["a_proj"]
        assert id(attn.kv_a_layernorm.weight) in groups["norm_gains"]
        assert id(model.model.embed_tokens.weight) in groups["rest"]


def test_experiment_parts_probe_puts_one_group_from_after_the_step():
    """Between two calls, the query rows double: with only that group from after the step every
    logit doubles, with any other group alone the maxima are the pre-step ones; the model keeps
    the post-step weights."""
    experiment = qk_clip_experiment()
    model = one_layer_model(q_lora=True)
    attn = next(model.attention_layers())
    tokens = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(0))
    micro = [(tokens, None)]
    probe = experiment.PartsProbe(every=1)
    model.reset_stats()
    model.model(tokens[:, :-1])  # the first step's forward
    first = {"step": 1, "clipped_heads": 1}
    probe(model, micro, first)  # takes over max_logits; no per-head record on the first step
    before = torch.tensor(first["head_max_after"])
    model.reset_stats()
    model.model(tokens[:, :-1])  # the second step's forward reads the pre-step maxima
    model.max_logits()
    with torch.no_grad():
        attn.query_proj.weight.mul_(2.0)  # the "update"
    doubled = attn.query_proj.weight.detach().clone()
    record = {"step": 2, "clipped_heads": 1}
    probe(model, micro, record)
    assert torch.tensor(record["head_max_before"]) == pytest.approx(before, rel=1e-5)
    assert torch.tensor(record["head_max_after"]) == pytest.approx(2 * before, rel=1e-5)
    assert torch.tensor(record["head_max_clipped_rows"]) == pytest.approx(2 * before, rel=1e-5)
    for part in ("a_proj", "norm_gains", "rest"):
        assert torch.tensor(record[f"head_max_{part}"]) == pytest.approx(before, rel=1e-5)
    assert torch.equal(attn.query_proj.weight, doubled)
    skipped = {"step": 3, "clipped_heads": 0}  # no clip on this step: no split
    probe(model, micro, skipped)
    assert "head_max_rest" not in skipped


def test_experiment_drift_parts_and_after_step_quantiles():
    experiment = qk_clip_experiment()
    records = [{"step": 2, "head_max_before": [12.0, 5.0], "head_max_clipped_rows": [10.2, 5.0],
                "head_max_a_proj": [12.6, 9.0], "head_max_norm_gains": [12.0, 5.0],
                "head_max_rest": [11.4, 5.0], "max_logit_after_step": 10.4, "lr": 0.01},
               {"step": 3, "max_logit_after_step": 10.6, "lr": 0.008}]
    parts = experiment.drift_parts(records, tau=10.0)
    assert parts["part_growth_clipped_rows_median"] == pytest.approx(1.02)  # head 0 only: 10.2 / tau
    assert parts["part_growth_a_proj_median"] == pytest.approx(1.05)  # 12.6 / 12
    assert parts["part_growth_rest_median"] == pytest.approx(0.95)
    assert experiment.drift_parts([{"step": 2}], tau=10.0) == {}
    within = experiment.after_step_quantiles(records, tau=10.0)
    assert within["steps_within_1.05_tau"] == 0.5
    assert within["after_step_over_tau_p99"] == pytest.approx(1.06)
    assert (within["steps_past_1.03_tau"], within["steps_at_peak_lr"]) == (2, 1)


def test_experiment_runs_are_reused_only_when_they_match(tmp_path):
    """experiments/qk_clip.py --plain (a finished run of the same recipe) and --summarise (a run of
    the same recipe, stopped part-way too): anything else is a clear stop."""
    import json
    from pathlib import Path

    from openk2.recipe import load_recipe

    check_run = qk_clip_experiment().check_run
    speedrun = Path(__file__).resolve().parents[1] / "recipes" / "speedrun.toml"
    recipe = load_recipe(speedrun, ["optim.lr=0.01", "optim.qk_clip_tau=0"])
    for flag in ("--plain", "--summarise"):
        with pytest.raises(SystemExit, match=f"{flag} .*no run of this script there"):
            check_run(tmp_path, recipe, flag)
    (tmp_path / "recipe.json").write_text(json.dumps(load_recipe(speedrun, ["optim.lr=0.02"])))
    with pytest.raises(SystemExit, match="has not finished"):
        check_run(tmp_path, recipe, "--plain")  # no summary.json: stopped part-way
    (tmp_path / "summary.json").write_text("{}")
    for flag in ("--plain", "--summarise"):
        with pytest.raises(SystemExit, match=r"optim\.lr=0\.02 \(now 0\.01\)"):
            check_run(tmp_path, recipe, flag)
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0, "max_logit": 9.0}) + "\n")
    with pytest.raises(SystemExit, match="no after-step probe"):
        check_run(tmp_path, recipe, "--plain")
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 2, "loss": 4.9, "max_logit": 9.5, "max_logit_after_step": 9.6}) + "\n")
    assert [r["step"] for r in check_run(tmp_path, recipe, "--plain")] == [1, 2]
    (tmp_path / "summary.json").unlink()
    assert [r["step"] for r in check_run(tmp_path, recipe, "--summarise")] == [1, 2]


def test_experiment_tail_steps_name_the_head_and_its_update():
    tail_steps = qk_clip_experiment().tail_steps
    records = [{"step": 5, "lr": 0.01, "head_max_before": [10.2, 3.0], "head_max_after": [10.4, 3.0]},
               {"step": 6, "lr": 0.01, "head_max_before": [10.1, 9.0], "head_max_after": [10.6, 10.8]},
               {"step": 7, "lr": 0.01, "head_max_before": [11.0, 3.0], "head_max_after": [10.7, 3.0]},
               {"step": 8, "lr": 0.01, "max_logit_after_step": 12.0}]  # no per-head record
    unclipped, clipped = tail_steps(records, tau=10.0)
    assert (unclipped["step"], unclipped["head"]) == (6, 1)
    assert unclipped["growth"] == pytest.approx(1.2)  # not clipped: after / before
    assert (clipped["step"], clipped["head"]) == (7, 0)
    assert clipped["growth"] == pytest.approx(1.07)  # clipped: after / tau
    assert clipped["before_over_tau"] == pytest.approx(1.1)


def test_experiment_runaway_lr2_sums_from_tau_to_five_tau():
    runaway_lr2 = qk_clip_experiment().runaway_lr2
    logits = [5.0, 11.0, 30.0, 49.0, 51.0, 60.0]
    records = [{"step": i + 1, "lr": 0.1 * (i + 1), "max_logit": m} for i, m in enumerate(logits)]
    assert runaway_lr2(records, tau=10.0) == pytest.approx(0.2 ** 2 + 0.3 ** 2 + 0.4 ** 2 + 0.5 ** 2)
    assert runaway_lr2(records[:4], tau=10.0) is None  # never past 5 tau
    assert runaway_lr2(records[:1], tau=10.0) is None  # never past tau


def test_experiment_summarise_reads_stopped_runs(tmp_path):
    """experiments/qk_clip.py --summarise: a stopped run's metrics as they stand (a last line cut
    off mid-write is left out; damage elsewhere or no step stops with what to do), and validation
    compared at the last step both runs evaluated."""
    import json

    experiment = qk_clip_experiment()
    with pytest.raises(SystemExit, match="metrics.jsonl is missing"):
        experiment.recorded_run(tmp_path, "--summarise")
    rows = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.9, "val_loss": 4.95}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lo')
    assert experiment.recorded_run(tmp_path, "--summarise") == rows
    (tmp_path / "metrics.jsonl").write_text('{"step": 1\n' + json.dumps(rows[1]) + "\n")
    with pytest.raises(SystemExit, match="line 1 is not JSON"):
        experiment.recorded_run(tmp_path, "--summarise")
    (tmp_path / "metrics.jsonl").write_text("\n")
    with pytest.raises(SystemExit, match="no step logged yet"):
        experiment.recorded_run(tmp_path, "--summarise")
    plain = [{"step": s, "val_loss": 5.0 - s / 100} for s in (50, 100, 150)]
    clipped = [{"step": s, "val_loss": 4.0 - s / 100} for s in (50, 100)] + [{"step": 120}]
    assert experiment.val_at_common_step({"plain": plain, "clip": clipped}) == {
        "step": 100, "plain": 4.0, "clip": 3.0}
    assert experiment.val_at_common_step({"plain": plain, "clip": [{"step": 1}]}) is None
