"""Scale-out: FSDP2, expert parallelism, distributed MuonClip, DCP checkpoints, activation
checkpointing and the memory planner, against single-process runs of the same recipe.

Multi-process tests use gloo on CPU with 2 processes (marked distributed + slow): a
torch.multiprocessing worker for the parts (expert-parallel module, distributed Muon, gradient
clipping), and `torchrun -m openk2 pretrain` for whole runs.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import openk2
from openk2.config import ConfigError
from openk2.data.corpus import PackedLoader
from openk2.recipe import load_recipe
from openk2.train.distributed import ParallelConfig, apply_activation_checkpointing
from openk2.train.loss import chunk_rows
from openk2.train.metrics import read_metrics
from openk2.train.plan import activation_bytes_per_token, plan_memory
from openk2.train.pretrain import LoaderBatches

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "model.num_hidden_layers=2", "model.hidden_size=64", "model.intermediate_size=128",
    "model.moe_intermediate_size=32", "model.q_lora_rank=32", "model.kv_lora_rank=16",
    "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8", "model.vocab_size=512",
    "train.seq_len=32", "train.batch_size=4", "train.micro_batch_size=2", "train.eval_every=5",
    "train.eval_batches=2", "train.threads=1", "train.steps=5", "train.checkpoint_every=3",
    "train.keep_checkpoints=3", "optim.lr=0.01", "optim.warmup_steps=2",
    "optim.qk_clip_tau=0.05",  # small enough that heads clip at this size
]


# ---- mesh rules, single process ---------------------------------------------------------------

def _recipe(*overrides: str) -> dict:
    return load_recipe(None, list(overrides))


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.ep=3"], 1, "parallel.ep=3 does not divide model.n_routed_experts=8"),
    (["parallel.ep=4", "parallel.dp_shard=6"], 24, "one must divide the other"),
    (["parallel.dp_shard=3"], 2, "parallel.dp_shard=3 does not divide the world size 2"),
    (["parallel.ep=4", "parallel.dp_shard=2"], 2, "parallel.ep=4 does not divide the world size 2"),
    (["train.batch_size=6", "train.micro_batch_size=2"], 4, "train.batch_size=6"),
    (["train.batch_size=24", "train.micro_batch_size=4"], 4, "not a multiple of train.micro_batch_size=4"),
    (["parallel.activation_checkpointing=some"], 1, "none, selective, full"),
    (["parallel.dp_shard=0"], 2, "parallel.dp_shard=0 must be a positive integer"),
])
def test_mesh_errors_name_the_keys(overrides, world, message):
    with pytest.raises(ConfigError, match=message):
        ParallelConfig.from_recipe(_recipe(*overrides), world, 8)


def test_mesh_rules_accept_both_nestings():
    assert ParallelConfig.from_recipe(_recipe("parallel.dp_shard=4", "parallel.ep=2"), 8, 8).ep == 2
    assert ParallelConfig.from_recipe(_recipe("parallel.dp_shard=2", "parallel.ep=4"), 8, 8).dp_shard == 2
    # One process: the mesh does not apply (a note is logged), checkpointing does.
    recipe = _recipe("parallel.dp_shard=2", "parallel.activation_checkpointing=full")
    one = ParallelConfig.from_recipe(recipe, 1, 8)
    assert (one.dp_shard, one.ep, one.activation_checkpointing) == (1, 1, "full")


def test_cli_exits_nonzero_on_a_bad_mesh(tmp_path):
    result = subprocess.run([sys.executable, "-m", "openk2", "pretrain", "--out", str(tmp_path / "r"),
                             "--set", "parallel.ep=3"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "parallel.ep=3 does not divide model.n_routed_experts=8" in result.stdout + result.stderr


# ---- data: a global position, resumable on another number of ranks ----------------------------

def test_loader_batches_are_global_and_resume_on_other_world_sizes():
    rows = torch.arange(40 * 5).view(40, 5)
    one = LoaderBatches(PackedLoader(rows, 8, seed=3), 2)
    two = [LoaderBatches(PackedLoader(rows, 4, seed=3, rank=r, world_size=2), 2) for r in range(2)]
    streams = [iter(one)] + [iter(b) for b in two]
    for _ in range(3):  # a step: 4 micro-batches on one rank, 2 on each of two ranks
        single = torch.cat([next(streams[0])[0] for _ in range(4)])
        split = torch.cat([next(s)[0] for s in streams[1:] for _ in range(2)])
        assert sorted(single[:, 0].tolist()) == sorted(split[:, 0].tolist())
    state = two[0].state_dict()
    assert state == two[1].state_dict() == one.state_dict()  # the global position
    resumed = LoaderBatches(PackedLoader(rows, 8, seed=0), 2)
    resumed.load_state_dict(state)
    assert torch.equal(next(iter(resumed))[0], next(streams[0])[0])


# ---- activation checkpointing ----------------------------------------------------------------

def _tiny(**overrides):
    kw = dict(num_hidden_layers=3, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
              q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
              vocab_size=256, n_routed_experts=8, num_experts_per_tok=2)
    return openk2.preset("tiny", **{**kw, **overrides})


@pytest.mark.parametrize("shape", [(8, 128, 256), (8192, 256), (33, 3), (35, 7), (7, 5), (1, 1)])
def test_initial_rows_drawn_alone_equal_whole_tensor(shape, monkeypatch):
    """NormalInit draws any rows of any tensor alone (what a rank does in materialize) with the
    values a whole-tensor fill gives, whatever the cut, device-side dtype or block size."""
    from openk2.model import init

    for block in (init.BLOCK_ELEMENTS, 64):  # one block per tensor here, and many
        monkeypatch.setattr(init, "BLOCK_ELEMENTS", block)
        whole = init.NormalInit(3, 0.02)
        before, expected = torch.empty(5, 9), torch.empty(shape)
        whole.fill(before, before.shape)  # a tensor drawn first moves the block counter on
        whole.fill(expected, shape)
        rows = shape[0]
        for cuts in ([0, rows], [0, rows // 3, rows], sorted({0, 1, rows // 2, rows})):
            for a, b in zip(cuts, cuts[1:]):
                part = init.NormalInit(3, 0.02)
                part.fill(torch.empty(0, 9), before.shape)
                local = torch.full((b - a, *shape[1:]), float("nan"), dtype=torch.float64)
                part.fill(local, shape, a)
                assert torch.equal(local.float(), expected[a:b])


def test_initial_blocks_are_distinct(monkeypatch):
    """Every block has its own stream, and another seed gives other values."""
    from openk2.model import init

    monkeypatch.setattr(init, "BLOCK_ELEMENTS", 32)
    values = torch.empty(64, 32)
    init.NormalInit(0, 1.0).fill(values, values.shape)
    assert len({tuple(row.tolist()) for row in values}) == 64
    other = torch.empty(64, 32)
    init.NormalInit(1, 1.0).fill(other, other.shape)
    assert not torch.isclose(values, other).any()
    assert 0.9 < values.std() < 1.1 and abs(values.mean()) < 0.05
    with pytest.raises(ValueError, match="outside"):
        init.NormalInit(0, 1.0).fill(torch.empty(3, 32), (4, 32), first_row=2)


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_changes_nothing_but_memory(mode):
    ids = torch.randint(0, 256, (2, 33))
    results = []
    for m in ("none", mode):
        model = openk2.build_model(_tiny(), seed=0)
        for moe in model.moe_layers():
            moe.aux_loss_alpha = 0.01
        apply_activation_checkpointing(model, m)
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss = loss + model.aux_loss()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((loss.item(), grads, model.tokens_per_expert().clone(), model.max_logits().clone()))
    (loss0, grads0, counts0, max0), (loss1, grads1, counts1, max1) = results
    assert loss0 == loss1
    assert torch.equal(counts0, counts1)  # a recomputed forward does not count its tokens twice
    assert torch.equal(max0, max1)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=0, atol=1e-7, msg=name)


def _saved_bytes(model, ids) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids)
    return sum(seen.values())


@pytest.mark.parametrize("explicit", [True, False], ids=["explicit_attention", "fused_attention"])
@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_activation_estimate_matches_what_the_model_saves(mode, explicit, monkeypatch):
    """The planner's per-token formula against saved_tensors_hooks, per layer (fp32, CPU), for
    both CPU attention paths (model/attention.py picks by size)."""
    import openk2.model.attention as attention

    if not explicit:
        monkeypatch.setattr(attention, "_EXPLICIT_ATTENTION_ELEMENTS", 0)
    sizes = dict(hidden_size=96, intermediate_size=320, moe_intermediate_size=48, q_lora_rank=80,
                 kv_lora_rank=40, qk_nope_head_dim=24, num_attention_heads=4, num_key_value_heads=4)
    tokens = 2 * 256
    measured, estimate = [], []
    for layers in (1, 3):  # one dense layer; plus two MoE layers
        config = _tiny(num_hidden_layers=layers, **sizes)
        model = openk2.build_model(config, seed=0)
        model.set_track_max_logits(False)
        apply_activation_checkpointing(model, mode)
        measured.append(_saved_bytes(model, torch.randint(0, 256, (2, 256))) / tokens)
        per_token = activation_bytes_per_token(config, mode, act=4, cpu_attention=(2, 256))
        estimate.append(per_token["layers"] + per_token["head"])  # no loss here: logits are not saved
    per_moe_layers = (measured[1] - measured[0], estimate[1] - estimate[0])
    assert estimate[0] == pytest.approx(measured[0], rel=0.2)
    assert per_moe_layers[1] == pytest.approx(per_moe_layers[0], rel=0.3)


# ---- the planner ----------------------------------------------------------------------------

def test_plan_for_the_k2_and_moonlight_recipes():
    k2 = plan_memory(load_recipe(ROOT / "recipes/kimi-k2.toml"), 256)
    memory = k2["bytes_per_gpu"]
    assert k2["parameters"] > 1.0e12 and k2["mesh"] == {"dp_shard": 256, "dp_replicate": 1, "ep": 16,
                                                         "edp_shard": 16, "edp_replicate": 1}
    # fp32 shards of 1.03T parameters over 256 GPUs, experts padded from 1.5 to 2 per rank
    assert 15 * 2**30 < memory["parameters"] < 21 * 2**30
    assert memory["gradients"] == memory["parameters"]
    assert memory["total"] == sum(v for k, v in memory.items() if k != "total")
    # The fused loss runs under FSDP too; K2's hidden size (7,168) exceeds the 4k tokens, so it
    # recomputes: one chunk of fp32 logits (the softmax in place) and their bf16 copy.
    assert memory["loss"] == chunk_rows(163840, "cuda") * 163840 * (4 + 2)
    assert memory["total"] < 80 * 2**30
    moonlight = plan_memory(load_recipe(ROOT / "recipes/moonlight.toml"), 8)
    assert 15e9 < moonlight["parameters"] < 17e9 and moonlight["bytes_per_gpu"]["total"] < 80 * 2**30
    with pytest.raises(ConfigError, match="parallel.dp_shard=256 does not divide the world size 100"):
        plan_memory(load_recipe(ROOT / "recipes/kimi-k2.toml"), 100)


def test_plan_cli_prints_the_table():
    result = subprocess.run([sys.executable, "-m", "openk2", "plan", "--recipe",
                             str(ROOT / "recipes/kimi-k2.toml"), "--gpus", "256"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for row in ("parameters", "gradients", "optimizer", "activations", "total"):
        assert row in result.stdout


# ---- multi-process parts: expert parallelism, distributed Muon, clipping ------------------------

def _parts_worker(rank: int, world: int, init_file: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import openk2.optim.muon as muon_module
    from openk2.model import Experts
    from openk2.optim import Muon
    from openk2.train.distributed import ExpertParallel, clip_grad_norm_, init_distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # Expert parallelism: same output and gradients as the whole layer on each rank's tokens.
        mesh = init_distributed(ParallelConfig(dp_shard=2, ep=2))
        config = _tiny()
        torch.manual_seed(0)
        full = Experts(config)
        for w in (full.gate_proj, full.up_proj, full.down_proj):
            torch.nn.init.normal_(w, std=0.1)
        parallel = ExpertParallel(full, mesh)
        torch.manual_seed(10 + rank)
        n = 7 + 5 * rank  # different token counts per rank
        x = torch.randn(n, config.hidden_size, requires_grad=True)
        logits = torch.randn(n, config.n_routed_experts)
        logits[:, rank * 4] += 5  # rank r sends most of its tokens to expert 4r: uneven all-to-all
        weights = torch.rand(n, 2, requires_grad=True)
        probe = torch.randn(n, config.hidden_size)
        # Top-2 routing; then every token to experts 0 and 1, so that rank 1 receives nothing.
        for experts in (logits.topk(2, dim=-1).indices, torch.tensor([[0, 1]] * n)):
            counts = torch.bincount(experts.flatten(), minlength=config.n_routed_experts)
            grads = []
            for module in (full, parallel):
                module.zero_grad()
                out = module(x, weights, experts, counts)
                (out * probe).sum().backward()
                grads.append((out.detach(), x.grad.clone(), weights.grad.clone()))
                x.grad = weights.grad = None
            for a, b in zip(*grads):
                torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
            for name in ("gate_proj", "up_proj", "down_proj"):
                whole = getattr(full, name).grad.clone()
                dist.all_reduce(whole)
                mine = whole[rank * 4 : rank * 4 + 4]  # zeros on rank 1 in the second routing
                torch.testing.assert_close(getattr(parallel, name).grad, mine, rtol=0, atol=1e-5)
        assert (parallel.global_view(parallel.down_proj, "down_proj").full_tensor().shape
                == full.down_proj.shape)

        # Distributed Muon: row-sharded (uneven, tall, wide, HSDP) and expert-sharded tensors
        # against plain Muon; each rank orthogonalises only its share of the 2-D matrices.
        line = init_device_mesh("cpu", (world,))
        hsdp = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
        g = torch.Generator().manual_seed(7)
        shapes = [(7, 5), (16, 40), (40, 16), (33, 33), (6, 10), (4, 6, 8)]
        layouts = [(line, [Shard(0)])] * 4 + [(hsdp, [Replicate(), Shard(0)]), (line, [Shard(0)])]
        fulls = [torch.randn(s, generator=g) for s in shapes]
        plain = [torch.nn.Parameter(t.clone()) for t in fulls]
        sharded = [torch.nn.Parameter(distribute_tensor(t.clone(), m, p))
                   for t, (m, p) in zip(fulls, layouts)]
        work = []
        original = muon_module.zeropower_via_newtonschulz
        def counted(X, *args, **kwargs):
            work.append(X.shape[0])
            return original(X, *args, **kwargs)

        muon_module.zeropower_via_newtonschulz = counted
        try:
            opt_plain, opt_sharded = Muon(plain, lr=0.05), Muon(sharded, lr=0.05)
            for _ in range(3):
                step_grads = [torch.randn(s, generator=g) for s in shapes]
                for p, q, grad, (m, pl) in zip(plain, sharded, step_grads, layouts):
                    p.grad, q.grad = grad.clone(), distribute_tensor(grad, m, pl)
                opt_plain.step()
                work.clear()
                opt_sharded.step()
        finally:
            muon_module.zeropower_via_newtonschulz = original
        for p, q in zip(plain, sharded):
            torch.testing.assert_close(q.full_tensor(), p.detach(), rtol=0, atol=1e-6)
        owned = torch.tensor([sum(work)])
        dist.all_reduce(owned)
        local_experts = 2  # the stacked [4, 6, 8] tensor: 2 whole matrices per rank
        assert owned.item() == 5 + world * local_experts and sum(work) < 5 + local_experts

        # Gradient clipping across meshes: the norm of the full gradients.
        model = torch.nn.Module()
        for i, (q, grad) in enumerate(zip(sharded, step_grads)):
            setattr(model, f"p{i}", q)
        expected = torch.cat([grad.flatten() for grad in step_grads]).norm().item()
        assert clip_grad_norm_(model, 1.0) == pytest.approx(expected, rel=1e-6)
        clipped = torch.cat([q.grad.full_tensor().flatten() for q in sharded]).norm().item()
        assert clipped == pytest.approx(1.0, rel=1e-5)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
def test_expert_parallel_and_distributed_muon_parts(tmp_path):
    mp.spawn(_parts_worker, args=(2, str(tmp_path / "pg")), nprocs=2, join=True)


# ---- whole runs under torchrun ----------------------------------------------------------------

def _pretrain(out: Path, corpus: Path, tokenizer: Path, *extra: str, procs: int = 1, check: bool = True):
    launcher = [sys.executable]
    if procs > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
    args = launcher + ["-m", "openk2", "pretrain", "--out", str(out), "--set", f"data.source={corpus}",
                       "--set", f"data.tokenizer={tokenizer}"]
    for item in SMALL + list(extra):
        args += [item] if item.startswith("--") else ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    if check:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A single-process reference and three 2-process layouts of the same recipe."""
    root = tmp_path_factory.mktemp("runs")
    rng = random.Random(0)
    words = "the king queen sword crown night day love war peace river stone fire storm".split()
    corpus = root / "corpus.jsonl"
    with corpus.open("w") as f:
        for _ in range(400):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))
            f.write(json.dumps({"text": text}) + "\n")
    from openk2.data.corpus import iter_texts
    from openk2.data.tokenizer import train_tokenizer

    tokenizer = root / "tokenizer"
    train_tokenizer(iter_texts(str(corpus)), 512).save(tokenizer)
    out = {"corpus": corpus, "tokenizer": tokenizer, "root": root}
    layouts = {
        "single": ([], 1),
        # one sequence per micro-batch: 32 rows < hidden size 64, so the fused loss recomputes its
        # logits in the backward (the K2 case) inside the head's FSDP unit; the others make the
        # head gradient in the forward
        "fsdp": (["parallel.dp_shard=2", "train.micro_batch_size=1"], 2),
        "ep": (["parallel.ep=2", "parallel.activation_checkpointing=selective"], 2),
        "fsdp_ep": (["parallel.dp_shard=2", "parallel.ep=2", "parallel.activation_checkpointing=full"], 2),
    }
    for name, (extra, procs) in layouts.items():
        out[name] = root / name
        _pretrain(out[name], corpus, tokenizer, *extra, procs=procs)
    return out


def _compare(run: Path, reference: Path, atol: float = 1e-5) -> None:
    ours, theirs = read_metrics(run / "metrics.jsonl"), read_metrics(reference / "metrics.jsonl")
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == [1, 2, 3, 4, 5]
    assert [set(r) for r in ours] == [set(r) for r in theirs]  # same keys as a single-process run
    for a, b in zip(ours, theirs):
        assert a["loss"] == pytest.approx(b["loss"], abs=atol)
        assert a["max_logit"] == pytest.approx(b["max_logit"], abs=atol)
        assert (a["clipped_heads"], a["tokens"], a["expert_imbalance"]) == (
            b["clipped_heads"], b["tokens"], b["expert_imbalance"])
    assert sum(r["clipped_heads"] for r in theirs) > 0  # QK-Clip did act
    final = load_file(run / "final/model.safetensors")
    expected = load_file(reference / "final/model.safetensors")
    assert final.keys() == expected.keys()
    for name in expected:  # weights, QK-clipped rows and router biases
        torch.testing.assert_close(final[name], expected[name], rtol=0, atol=atol, msg=name)
    bias = [n for n in expected if n.endswith("e_score_correction_bias")]
    assert bias and any(expected[n].abs().sum() > 0 for n in bias)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["fsdp", "ep", "fsdp_ep"])
def test_two_processes_match_one(runs, layout):
    _compare(runs[layout], runs["single"])


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_start_from_a_checkpoint_as_one(runs):
    """model.init_from under torchrun: each rank reads only its rows of the HF folder
    (distributed.load_sharded), and training goes on exactly as from one process's load."""
    folder = runs["single"] / "final"
    out = {}
    for name, extra, procs in (("one", [], 1), ("two", ["parallel.dp_shard=2", "parallel.ep=2"], 2)):
        out[name] = runs["root"] / f"init_from_{name}"
        _pretrain(out[name], runs["corpus"], runs["tokenizer"], f"model.init_from={folder}", *extra,
                  procs=procs)
    _compare(out["two"], out["one"])
    first = read_metrics(out["one"] / "metrics.jsonl")[0]["loss"]
    assert first < read_metrics(runs["single"] / "metrics.jsonl")[0]["loss"]  # it did start from the weights


@pytest.mark.distributed
@pytest.mark.slow
def test_save_on_two_resume_on_one_and_two(runs):
    import shutil

    saved = runs["fsdp_ep"]
    checkpoint = saved / "checkpoints/step_0000003"
    assert (checkpoint / ".metadata").is_file() and (checkpoint / "manifest.json").is_file()
    uninterrupted = [r["loss"] for r in read_metrics(saved / "metrics.jsonl")]
    for procs, extra in ((1, []), (2, ["parallel.activation_checkpointing=full"])):
        run = runs["root"] / f"resumed_on_{procs}"
        shutil.copytree(saved, run)
        result = _pretrain(run, runs["corpus"], runs["tokenizer"], "parallel.dp_shard=2", "parallel.ep=2",
                           *extra, "--resume", procs=procs)
        assert "(step 3)" in result.stdout
        losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl")]
        if procs == 2:
            assert losses == uninterrupted  # same layout: bit for bit
        else:
            assert losses == pytest.approx(uninterrupted, abs=1e-5)
        _compare(run, runs["single"])


@pytest.mark.distributed
@pytest.mark.slow
def test_sharded_run_exports_to_transformers(runs, tmp_path):
    transformers = pytest.importorskip("transformers")
    from openk2.train.checkpoint import export_checkpoint

    exported = export_checkpoint(runs["fsdp_ep"] / "checkpoints/step_0000003", tmp_path / "step3")
    reference = export_checkpoint(runs["single"] / "checkpoints/step_0000003", tmp_path / "reference3")
    a, b = load_file(exported / "model.safetensors"), load_file(reference / "model.safetensors")
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)
    ids = torch.randint(0, 512, (2, 24))
    for folder in (runs["fsdp_ep"] / "final", exported):
        ours = openk2.load_model(folder, dtype=torch.float32)
        theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=0, atol=1e-4)
    assert (runs["fsdp_ep"] / "final/tokenizer.json").is_file()


@pytest.mark.distributed
@pytest.mark.slow
def test_sharded_checkpoint_into_another_model_is_named(runs):
    """A sharded checkpoint that does not fit the model fails with a ConfigError naming it."""
    from openk2.optim import OptimConfig, build_optimizer
    from openk2.train.checkpoint import load_checkpoint
    from openk2.train.pretrain import config_for

    config = _recipe(*SMALL, "model.num_hidden_layers=3")
    model = openk2.build_model(config_for(config), seed=0)
    checkpoint = runs["fsdp_ep"] / "checkpoints/step_0000003"
    with pytest.raises(ConfigError, match="step_0000003 could not be loaded into this model"):
        load_checkpoint(checkpoint, model, build_optimizer(model, OptimConfig.from_dict(config["optim"])))


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_exits_nonzero_on_a_bad_mesh(runs, tmp_path):
    result = _pretrain(tmp_path / "bad", runs["corpus"], runs["tokenizer"], "parallel.dp_shard=3",
                       procs=2, check=False)
    assert result.returncode != 0
    assert "parallel.dp_shard=3 does not divide the world size 2" in result.stdout + result.stderr


@pytest.mark.distributed
@pytest.mark.slow
def test_single_process_checkpoint_resumes_on_two(runs):
    import shutil

    run = runs["root"] / "single_resumed_on_2"
    shutil.copytree(runs["single"], run)
    result = _pretrain(run, runs["corpus"], runs["tokenizer"], "parallel.dp_shard=2", "parallel.ep=2",
                       "--resume", procs=2)
    assert "(step 3)" in result.stdout
    _compare(run, runs["single"])
