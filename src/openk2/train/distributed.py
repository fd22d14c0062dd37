"""Scale-out under torchrun (DESIGN principle 2; K2_SPEC §2 distributed Muon, §3 infrastructure):
FSDP2, expert parallelism over all-to-all, activation checkpointing, the sharded training state.

    torchrun --nproc_per_node N -m openk2 pretrain --recipe R --out RUN

The model code knows nothing of this. `parallelize(model, mesh, activation_checkpointing)`
replaces each MoE layer's `experts` with an `ExpertParallel` module of the same call
signature, wraps module forwards in activation checkpoints, and applies `fully_shard` per
decoder block and at the root.

Mesh ([parallel] recipe keys; N = world size; every rank is a data-parallel rank that takes
train.batch_size / N sequences of each step):
  dp_shard  FSDP degree of the non-expert weights; dp_replicate = N / dp_shard (HSDP when > 1).
  ep        expert-parallel degree, carved out of the same N ranks (as torchtitan does): each
            rank holds E / ep experts of every MoE layer; routed tokens reach them by all-to-all.
  Rules, checked before any process group exists (ConfigError naming the key):
  dp_shard divides N; ep divides N and model.n_routed_experts; ep divides dp_shard or dp_shard
  divides ep. With ep <= dp_shard an EP group lies inside one FSDP shard group and the expert
  weights are FSDP-sharded over the remaining edp_shard = dp_shard / ep ranks; with ep >
  dp_shard an EP group spans whole shard groups and edp_shard = 1. Either way the expert
  weights are replicated over edp_replicate = N / (ep * edp_shard) ranks, gradients summed.
  A run without torchrun (N = 1) ignores dp_shard and ep (a note says so).

Rank layout: dense mesh (dp_replicate, dp_shard), rank = r * dp_shard + j; expert mesh
(edp_replicate, ep, edp_shard), rank = (r * ep + e) * edp_shard + s. Expert weights are stored
per rank as plain [E/ep, ...] tensors (FSDP-sharded over edp_shard when that is > 1); the
checkpoint and the final export see them as [E, ...] DTensors on the expert mesh with
placements (Replicate, Shard(0), Shard(0)) (the last dim dropped when edp_shard = 1), which is
what makes resharding work.

Gradients are summed, never averaged (FSDP's divide factor is 1): each rank's objective is its
summed token loss over the GLOBAL target count, so the sum over ranks is the single-process
gradient. gloo (CPU) supports all_to_all_single with uneven splits (checked with torch 2.13),
so the token exchange is the same call on gloo and NCCL.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from openk2.config import ConfigError
from openk2.model import MLP, Experts, MoE, build_model
from openk2.model.moe import combine, expert_swiglu
from openk2.model.hf import CheckpointReader, check_tensor_shapes
from openk2.model.init import NormalInit
from openk2.model.norm import RMSNorm
from openk2.optim.muon import is_dtensor
from openk2.train.loss import linear_cross_entropy

AC_MODES = ("none", "selective", "full")


# ---- mesh -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParallelConfig:
    """The [parallel] recipe section, checked against a world size and a model."""

    dp_shard: int = 1
    ep: int = 1
    activation_checkpointing: str = "none"

    @classmethod
    def from_recipe(cls, recipe: dict[str, Any], world_size: int, n_routed_experts: int) -> "ParallelConfig":
        """Checks every rule (module docstring); N = 1 keeps only activation checkpointing."""
        section, train = recipe["parallel"], recipe["train"]
        config = cls(section["dp_shard"], section["ep"], section["activation_checkpointing"])
        if config.activation_checkpointing not in AC_MODES:
            raise ConfigError(f"parallel.activation_checkpointing={config.activation_checkpointing!r}: "
                              f"use one of {', '.join(AC_MODES)}")
        for key in ("dp_shard", "ep"):
            if getattr(config, key) < 1:
                raise ConfigError(f"parallel.{key}={getattr(config, key)} must be a positive integer")
        dp_shard, ep = config.dp_shard, config.ep
        if ep > 1 and n_routed_experts % ep:
            raise ConfigError(f"parallel.ep={ep} does not divide model.n_routed_experts={n_routed_experts}: "
                              "every rank of an expert-parallel group holds the same number of experts")
        if dp_shard % ep and ep % dp_shard:
            raise ConfigError(f"parallel.ep={ep} and parallel.dp_shard={dp_shard}: one must divide the other "
                              "(an expert-parallel group lies inside one FSDP shard group, or spans "
                              "whole ones)")
        if world_size == 1:
            return cls(activation_checkpointing=config.activation_checkpointing)
        if world_size % dp_shard:
            raise ConfigError(f"parallel.dp_shard={dp_shard} does not divide the world size {world_size} "
                              f"(torchrun --nproc_per_node x nodes); use a divisor of {world_size}")
        if world_size % ep:
            raise ConfigError(f"parallel.ep={ep} does not divide the world size {world_size}; "
                              f"use a divisor of {world_size}")
        batch, micro = train["batch_size"], train["micro_batch_size"]
        if batch % world_size:
            raise ConfigError(f"train.batch_size={batch} (sequences per step, all ranks together) is not "
                              f"divisible by the {world_size} data-parallel ranks")
        per_rank = batch // world_size
        if per_rank % min(micro, per_rank):
            raise ConfigError(f"train.batch_size={batch} gives {per_rank} sequences per rank, not a multiple "
                              f"of train.micro_batch_size={micro}")
        return config


@dataclass
class Mesh:
    """Where this process sits: world, device and the dense and expert device meshes."""

    rank: int
    world_size: int
    device: torch.device
    dp_shard: int
    ep: int
    dense: Any                # DeviceMesh ("dp_replicate", "dp_shard")
    experts: Any | None       # DeviceMesh ("edp_replicate", "ep", "edp_shard"); None without EP

    @property
    def dp_replicate(self) -> int:
        return self.world_size // self.dp_shard

    @property
    def edp_shard(self) -> int:
        return self.dp_shard // self.ep if self.dp_shard % self.ep == 0 else 1

    def fsdp_mesh(self):
        """FSDP's mesh for non-expert weights: 1-D when there is no replication, else HSDP."""
        return self.dense["dp_shard"] if self.dp_replicate == 1 else self.dense

    def expert_fsdp_mesh(self):
        """FSDP's mesh for one EP rank's experts, or None when no other rank holds them."""
        if self.experts is None or self.world_size == self.ep:
            return None
        edp_replicate = self.experts.size(0)
        return self.experts["edp_shard"] if edp_replicate == 1 else self.experts["edp_replicate", "edp_shard"]

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(config: ParallelConfig, device: str = "cpu") -> Mesh:
    """Join the torchrun job (gloo on CPU, NCCL on CUDA) and build the meshes."""
    from torch.distributed.device_mesh import init_device_mesh

    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device_obj, backend = torch.device("cuda", local), "nccl"
    else:
        device_obj, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    world = dist.get_world_size()
    dp_shard, ep = config.dp_shard, config.ep
    dense = init_device_mesh(device_obj.type, (world // dp_shard, dp_shard),
                             mesh_dim_names=("dp_replicate", "dp_shard"))
    experts = None
    if ep > 1:
        edp_shard = dp_shard // ep if dp_shard % ep == 0 else 1
        experts = init_device_mesh(device_obj.type, (world // (ep * edp_shard), ep, edp_shard),
                                   mesh_dim_names=("edp_replicate", "ep", "edp_shard"))
    return Mesh(dist.get_rank(), world, device_obj, dp_shard, ep, dense, experts)


def close_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---- expert parallelism -------------------------------------------------------------------

def exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """all_to_all_single along dim 0: in_splits[r] rows of x go to rank r of the group, and
    out_splits[r] rows come back from it."""
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """`exchange` with its transpose as the backward (gradients travel the reverse route)."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.route = (out_splits, in_splits, group)
        return exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits, group = ctx.route
        return exchange(grad, in_splits, out_splits, group), None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


class ExpertParallel(Experts):
    """Experts [first, first + E/ep) of one MoE layer; tokens reach them by all-to-all.

    Same call as Experts: x [N, D], weights/experts [N, K], counts [E] -> [N, D]. Legend: L = E/ep
    local experts, R tokens received. The (token, expert) pairs sorted by expert are sent with
    their gate weight as an extra column (rank r receives the pairs for its experts, grouped by
    source then expert), regrouped by expert, run through the same SwiGLU as Experts, put back
    in source order and returned by the reverse all-to-all; counts are exchanged first.
    Parameters gate_proj, up_proj [L, I, D], down_proj [L, D, I]: a slice of the layer's.
    """

    def __init__(self, experts: Experts, mesh: Mesh):
        nn.Module.__init__(self)
        self.num_experts = experts.num_experts
        self.ep = mesh.ep
        self.local_experts = self.num_experts // self.ep
        ep_rank = mesh.experts.get_local_rank("ep")
        self.first = ep_rank * self.local_experts  # the layer's index of this rank's first expert
        rows = slice(self.first, self.first + self.local_experts)
        for name in ("gate_proj", "up_proj", "down_proj"):
            local = getattr(experts, name).detach()[rows].clone()  # stays on meta when built there
            setattr(self, name, nn.Parameter(local if local.is_meta else local.to(mesh.device)))
        self.group = mesh.experts.get_group("ep")
        # The [E, ...] layout: split over ep, then (FSDP) over edp_shard; replicated over edp_replicate.
        if mesh.edp_shard == 1:
            self.layout = (mesh.experts["edp_replicate", "ep"], 2)
        else:
            self.layout = (mesh.experts, 3)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                counts: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
        """As `Experts.forward`, the experts spread over the ep ranks."""
        N, D = x.shape
        K = experts.shape[1]
        order = experts.flatten().argsort(stable=True)
        token = order // K
        payload = torch.cat((x.index_select(0, token), weights.flatten()[order, None].to(x.dtype)), dim=1)
        send = counts.view(self.ep, self.local_experts)  # [ep, L] pairs this rank sends per expert
        recv = exchange(send, [1] * self.ep, [1] * self.ep, self.group)  # [ep, L] pairs it receives
        send_splits, recv_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        received = all_to_all(payload, recv_splits, send_splits, self.group)  # [R, D + 1]
        by_expert = _source_to_expert_order(recv)
        rows = received.index_select(0, by_expert)
        xs, gate_weight = rows[:, :D], rows[:, D:]
        gate_w, up_w, down_w = (w.to(x.dtype) for w in (self.gate_proj, self.up_proj, self.down_proj))
        # Every local expert's rows in one autograd node; with no rows at all it still links the
        # received rows and the weights (zero gradients) into the graph, so that this rank joins
        # the backward all-to-all.
        y = expert_swiglu(xs, gate_weight, gate_w, up_w, down_w, recv.sum(0).tolist())
        y = y.index_select(0, by_expert.argsort())  # back to (source, expert) order
        returned = all_to_all(y, send_splits, recv_splits, self.group)  # [N*K, D], sorted by expert
        return combine(returned, token, x.shape, into)

    def global_view(self, local: torch.Tensor, name: str) -> torch.Tensor:
        """A tensor laid out like parameter `name` (the parameter or its optimizer state) as the
        [E, ...] DTensor of the whole layer on the expert mesh."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        shape = (self.num_experts, *getattr(self, name).shape[1:])
        stride = tuple(math.prod(shape[d + 1:]) for d in range(len(shape)))
        local = local.to_local() if is_dtensor(local) else local
        view_mesh, dims = self.layout
        placements = [Replicate()] + [Shard(0)] * (dims - 1)
        return DTensor.from_local(local, view_mesh, placements, run_check=False, shape=shape, stride=stride)


def _source_to_expert_order(recv: torch.Tensor) -> torch.Tensor:
    """recv [ep, L] row counts of a buffer laid out by (source, expert) -> the row order that
    lays it out by (expert, source)."""
    lengths = recv.flatten()
    starts = lengths.cumsum(0) - lengths
    segments = torch.arange(lengths.numel(), device=recv.device).view(recv.shape).T.flatten()
    lengths, starts = lengths[segments], starts[segments]
    offsets = (lengths.cumsum(0) - lengths).repeat_interleave(lengths)  # of each row's segment, new layout
    return starts.repeat_interleave(lengths) + torch.arange(offsets.numel(), device=recv.device) - offsets


def apply_expert_parallel(model: nn.Module, mesh: Mesh) -> None:
    for moe in model.moe_layers():
        moe.experts = ExpertParallel(moe.experts, mesh)


# ---- FSDP2 ----------------------------------------------------------------------------------

def apply_fsdp(model: nn.Module, mesh: Mesh) -> None:
    """fully_shard per decoder block, embedding, LM head and at the root; EP experts on their own
    mesh. bf16
    parameters with fp32 gradient reduction on GPUs (the router stays fp32), fp32 on CPU."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    gpu = mesh.device.type == "cuda"
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if gpu else \
        MixedPrecisionPolicy()
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    dense, expert_mesh = mesh.fsdp_mesh(), mesh.expert_fsdp_mesh()
    for layer in model.model.layers:
        ignored: set[nn.Parameter] = set()
        if isinstance(layer.mlp, MoE):
            if isinstance(layer.mlp.experts, ExpertParallel):
                if expert_mesh is None:  # this rank's experts exist nowhere else: nothing to reduce
                    ignored = set(layer.mlp.experts.parameters())
                else:
                    fully_shard(layer.mlp.experts, mesh=expert_mesh, mp_policy=mp)
            if gpu:
                fully_shard(layer.mlp.gate, mesh=dense, mp_policy=fp32)
        fully_shard(layer, mesh=dense, mp_policy=mp, ignored_params=ignored or None)
    # Embedding and LM head are the largest tensors: their own units, gathered only when used.
    fully_shard(model.model.embed_tokens, mesh=dense, mp_policy=mp)
    fully_shard(model.lm_head, mesh=dense, mp_policy=mp)
    fully_shard(model, mesh=dense, mp_policy=mp)
    for module in model.modules():
        if isinstance(module, FSDPModule):  # sum, not average (module docstring); SUM works on gloo
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    _install_fused_loss(model)


def _install_fused_loss(model: nn.Module) -> None:
    """Give a fully_shard-ed model `model.fused_loss(tokens, targets)`: the trainer's LM head fused
    with the cross-entropy (train/loss.py), run as FSDP forwards of the root and of the head's
    unit, so the sharded head is gathered for it (and for its backward) and its gradient is
    reduce-scattered as after `lm_head(...)`. The trainer calls it whenever a model has it; the
    plain path would hold [tokens, vocab] logits (6.25 GiB per GPU in the K2 plan)."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    def head_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(hidden, head.weight, targets)

    def root_loss(root: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = root.model(tokens)
        return root.lm_head.fused_loss(hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1))

    model.lm_head.fused_loss = types.MethodType(head_loss, model.lm_head)
    register_fsdp_forward_method(model.lm_head, "fused_loss")
    model.fused_loss = types.MethodType(root_loss, model)
    register_fsdp_forward_method(model, "fused_loss")


# ---- activation checkpointing -------------------------------------------------------------

def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Recompute activations in the backward pass instead of keeping them (K2_SPEC §3).

    "selective": RMSNorms, SwiGLU MLPs (dense layers and shared experts) and the MLA
    up-projections (q_b_proj, kv_b_proj), whose outputs are wider than their inputs;
    "full": whole decoder layers. Statistics the forward accumulates (tokens per expert, the
    balance loss) are restored after a recomputation, so they count each token once.
    """
    if mode == "none":
        return
    if mode not in AC_MODES:
        raise ConfigError(f"parallel.activation_checkpointing={mode!r}: use one of {', '.join(AC_MODES)}")
    if mode == "full":
        targets = list(model.model.layers)
    else:
        targets = [m for m in model.modules() if isinstance(m, (RMSNorm, MLP))]
        for attn in model.attention_layers():
            targets.append(attn.kv_b_proj)
            if attn.config.q_lora_rank is not None:
                targets.append(attn.q_b_proj)
    for module in targets:
        module.forward = _checkpointed(module.forward, module)


def _checkpointed(forward, module: nn.Module):
    from torch.utils.checkpoint import checkpoint

    contexts = functools.partial(lambda m: (contextlib.nullcontext(), _KeepStatistics(m)), module)

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False,
                          context_fn=contexts, **kwargs)

    return run


class _KeepStatistics:
    """Around a recomputation: puts back the MoE statistics the original forward left."""

    def __init__(self, module: nn.Module):
        self.moes = [m for m in module.modules() if isinstance(m, MoE)]

    def __enter__(self):
        self.saved = [(m.tokens_per_expert.clone(), m.aux_loss) for m in self.moes]

    def __exit__(self, *exc):
        for moe, (counts, aux) in zip(self.moes, self.saved):
            moe.tokens_per_expert.copy_(counts)
            moe.aux_loss = aux
        return False


def parallelize(model: nn.Module, mesh: Mesh | None, activation_checkpointing: str = "none") -> nn.Module:
    """Expert parallelism, activation checkpointing, FSDP2, in that order (in place). A model
    built on the meta device stays there; `materialize` then gives each rank its shards."""
    if mesh is not None and mesh.ep > 1:
        apply_expert_parallel(model, mesh)
    apply_activation_checkpointing(model, activation_checkpointing)
    if mesh is not None:
        apply_fsdp(model, mesh)
    return model


# ---- initialisation of a sharded model ------------------------------------------------------

@torch.no_grad()
def materialize(model: nn.Module, seed: int, device: torch.device) -> None:
    """Allocate a meta-built, parallelised model's shards on `device` and initialise them to the
    values `build_model(config, seed=seed)` gives on one process, without any rank holding a
    whole model: `NormalInit` draws, in the model's order (`normal_init_tensors`), only the
    seeded row blocks that overlap the rows this rank holds (FSDP row blocks, its experts)."""
    model.to_empty(device=device)
    draws = NormalInit(seed, model.config.initializer_range)
    blocks = _row_blocks(model)
    for weight in model.normal_init_tensors():
        local, start, shape = blocks[id(weight)]
        draws.fill(local, shape, start)
    model.init_constants()


@torch.no_grad()
def load_sharded(model: nn.Module, directory: str | os.PathLike, device: torch.device) -> None:
    """Allocate a meta-built, parallelised model's shards on `device` and fill them from an HF
    checkpoint folder (what `load_model` reads), each rank reading only the rows it holds
    (`CheckpointReader`); bad folders fail as `load_model` fails, naming the tensor."""
    config = model.config
    reader = CheckpointReader(directory, config)
    expected = {name: tuple(t.shape) for name, t in build_model(config, device="meta").state_dict().items()}
    check_tensor_shapes(directory, {name: reader.shape(name) for name in reader.sources}, expected)
    model.to_empty(device=device)
    blocks = _row_blocks(model)
    for name, tensor in model.state_dict(keep_vars=True).items():
        local, start, _ = blocks[id(tensor)]
        if local.shape[0]:
            local.copy_(reader.read(name, start, start + local.shape[0]))
    model.reset_buffers()


def _row_blocks(model: nn.Module) -> dict[int, tuple[torch.Tensor, int, tuple[int, ...]]]:
    """id(tensor) -> (the local tensor this rank holds, its first row in the whole tensor, the
    whole tensor's shape) for every parameter and persistent buffer of a parallelised model:
    FSDP's row blocks of DTensors, and an expert-parallel rank's experts of the [E, ...] stack."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    owners = {id(p): m for m in model.modules() if isinstance(m, ExpertParallel)
              for p in (m.gate_proj, m.up_proj, m.down_proj)}
    blocks = {}
    for tensor in model.state_dict(keep_vars=True).values():
        local, start, shape = tensor, 0, tuple(tensor.shape)
        if is_dtensor(tensor):
            local_shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh,
                                                                        tensor.placements)
            if any(offset[1:]) or tuple(local_shape[1:]) != shape[1:]:
                raise NotImplementedError(f"{tensor.placements}: shards beyond dim 0")
            local, start = tensor.to_local(), offset[0]
        owner = owners.get(id(tensor))
        if owner is not None:  # this rank's experts of the layer's [E, ...] stack
            start += owner.first
            shape = (owner.num_experts, *shape[1:])
        blocks[id(tensor)] = (local, start, shape)
    return blocks


# ---- gradients --------------------------------------------------------------------------------

@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> float:
    """Scale every gradient so that the global L2 norm is at most max_norm; returns the norm
    before clipping. Works across meshes (dense, expert, plain EP-local tensors): each rank adds
    its local squares divided by the number of ranks that hold the same values."""
    total = torch.zeros((), dtype=torch.float64)
    grads = []
    for p in model.parameters():
        if p.grad is None:
            continue
        grad = p.grad
        copies = 1
        if is_dtensor(grad):
            copies = math.prod(grad.device_mesh.size(d) for d, pl in enumerate(grad.placements)
                               if pl.is_replicate())
            grad = grad.to_local()
        grads.append(grad)
        total += grad.double().pow(2).sum().cpu() / copies
    if dist.is_initialized():
        total = total.to(grads[0].device if grads else "cpu")
        dist.all_reduce(total)
    norm = float(total.sqrt())
    coefficient = max_norm / (norm + 1e-6)
    if coefficient < 1 and grads:
        torch._foreach_mul_(grads, coefficient)
    return norm


# ---- the training state, globally laid out -------------------------------------------------

def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() with every tensor at its global shape: FSDP DTensors as they are,
    expert-parallel weights as [E, ...] DTensors on the expert mesh."""
    state = model.state_dict()
    for prefix, module in model.named_modules():
        if isinstance(module, ExpertParallel):
            for name in ("gate_proj", "up_proj", "down_proj"):
                state[f"{prefix}.{name}"] = module.global_view(state[f"{prefix}.{name}"], name)
    return state


def _expert_views(model: nn.Module) -> dict[int, Any]:
    """id(parameter) -> a function giving any tensor laid out like it its global view."""
    views = {}
    for module in model.modules():
        if isinstance(module, ExpertParallel):
            for name in ("gate_proj", "up_proj", "down_proj"):
                views[id(getattr(module, name))] = functools.partial(module.global_view, name=name)
    return views


def training_state(model: nn.Module, optimizer: Any) -> dict[str, torch.Tensor]:
    """The flat, globally laid out state a distributed checkpoint holds: "model.<name>",
    "optim.<muon|adamw>.<param name>.<key>" and "optim.steps"/"optim.skipped_steps". Optimizer
    state that does not exist yet is created (zeros), so the dict can be loaded into."""
    state = {f"model.{k}": v for k, v in model_state(model).items()}
    names = {id(p): n for n, p in model.named_parameters()}
    views = _expert_views(model)
    for kind, opt in (("muon", optimizer.muon), ("adamw", optimizer.adamw)):
        if opt is None:
            continue
        for group in opt.param_groups:
            for p in group["params"]:
                if not opt.state[p]:
                    _init_state(kind, group, p, opt.state[p])
                view = views.get(id(p), lambda t: t)
                for key, value in opt.state[p].items():
                    state[f"optim.{kind}.{names[id(p)]}.{key}"] = view(value) if value.ndim else value
    state["optim.steps"] = torch.tensor(optimizer.steps)
    state["optim.skipped_steps"] = torch.tensor(optimizer.skipped_steps)
    return state


def _init_state(kind: str, group: dict, p: torch.Tensor, state: dict) -> None:
    """The state torch's Muon/AdamW create on their first step (see their _init_group)."""
    if kind == "muon":
        state["momentum_buffer"] = torch.zeros_like(p)
        return
    on_device = group.get("fused") or group.get("capturable")
    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
    state["exp_avg"] = torch.zeros_like(p)
    state["exp_avg_sq"] = torch.zeros_like(p)
    if group.get("amsgrad"):
        state["max_exp_avg_sq"] = torch.zeros_like(p)


def apply_training_state(state: dict[str, torch.Tensor], optimizer: Any) -> None:
    """After loading into `training_state(...)`'s tensors (in place): the scalars."""
    optimizer.steps = int(state["optim.steps"])
    optimizer.skipped_steps = int(state["optim.skipped_steps"])


def copy_full_into(state: dict[str, torch.Tensor], full: dict[str, torch.Tensor]) -> None:
    """Fill a globally laid out state from full tensors (a single-process checkpoint): each
    rank copies the block its shard covers."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    missing = [k for k in state if k not in full]
    if missing:
        raise KeyError(f"checkpoint has no {missing[0]!r} ({len(missing)} missing)")
    for key, target in state.items():
        source = full[key]
        if is_dtensor(target):
            shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh,
                                                                  target.placements)
            source = source[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
            target = target.to_local()
        target.copy_(source.to(device=target.device, dtype=target.dtype))


def full_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor at full size on CPU) for every tensor of model_state(), one at a time,
    yielded on rank 0 only. Each gather is collective: every rank must run the iteration to its
    end (the other ranks get nothing), so rank 0 never holds more than one whole tensor."""
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    for name, tensor in model_state(model).items():
        full = tensor.full_tensor() if is_dtensor(tensor) else tensor
        if rank0:
            yield name, full.detach().cpu()
        del full
