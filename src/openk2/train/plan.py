"""Memory per GPU of a recipe's model on its [parallel] mesh (`openk2 plan`; train/distributed.py).

    openk2 plan --recipe recipes/kimi-k2.toml --gpus 256

Parameters are counted on the meta device (no memory), sharded as train/distributed.py shards
them: non-expert tensors split in row blocks over dp_shard ranks (FSDP2 pads to equal
blocks), expert tensors split over ep ranks and then over edp_shard ranks. Per GPU:

  parameters   fp32 master shards                           4 B / element
  gradients    fp32 shards (FSDP reduces in fp32)           4 B
  optimizer    Muon momentum 4 B; AdamW moments 8 B (K2_SPEC §2 roles)
  fsdp working the largest FSDP unit unsharded, at its peak in the backward pass: its params
               in compute dtype, the prefetched next unit's (as large, at most), and its
               gradient in compute dtype and in fp32 for the reduction: (2a + 4) B / element
  muon         Newton–Schulz of this rank's share: its owned whole matrices (input and
               result, fp32) plus two batch buffers of at most NS_BATCH_ELEMENTS elements
  activations  one micro-batch (micro_batch_size x seq_len tokens) of saved activations: the
               per-token terms below, measured on this code (tests/test_distributed.py checks
               the estimate against saved_tensors_hooks); "full" checkpointing keeps the layer
               inputs plus one layer's activations during its recomputation
  loss         the LM head fused with the cross-entropy (train/loss.py; under FSDP inside the
               head's unit, train/distributed.py), one row chunk of float32 logits (the softmax
               runs in place) and, below fp32, its copy in the compute dtype; plus, unless the
               backward recomputes the logits (fewer tokens than the hidden size), the
               hidden-state gradient per token (a D) and the head gradient made in the forward
               (4 V D in fp32, plus a V D for its copy in a lower compute dtype)

Compute dtype: bf16 on GPUs (a = 2 B), fp32 on CPU (a = 4 B). Per token and layer, with D
hidden, q/C the q/kv LoRA ranks, H heads of N+R query/key and V value dims, K routed experts of
width I, norms computed in fp32:
  norm(w)      4w + a w            (fp32 normalised input for its backward, output the next matmul keeps)
  attention    a D + (4 + 2a) q + (4 + 2a) C + a H (2(N+R) + 3V) + 4 H
               (CPU: v padded to N+R; short CPU sequences keep a H (2N + R + 3V) + a R plus
               a H P/T of probabilities instead, P = kept_probabilities(T), about 5/8 T^2)
  SwiGLU(W)    a D + 4 a W         (input, gate, up, silu, product)
  routed       4 D + 4 E + a K (2 (D + 1) + 5 I) + 24 K   (router in fp32, the dispatched
               rows and their copy after the exchange, SwiGLU per pair, int64 indices)
  selective    norms keep their input; SwiGLU MLPs keep their input; attention keeps
               a D + 2 a q + a (2C + R) + the attention tensors
  full         a D per layer, plus one layer's full activations
"""

from __future__ import annotations

import math
from typing import Any

from openk2.config import ModelConfig
from openk2.model import build_model, decoder_layer_prefix
from openk2.model.attention import kept_probabilities, uses_explicit_attention
from openk2.optim.build import classify_parameters
from openk2.optim.muon import NS_BATCH_ELEMENTS, dtype_from_name
from openk2.train.distributed import ParallelConfig
from openk2.train.loss import chunk_rows, recomputes

GiB = 1024**3


def plan_memory(recipe: dict[str, Any], gpus: int) -> dict[str, Any]:
    """The per-GPU memory of `recipe` on `gpus` ranks (ConfigError if the mesh does not fit)."""
    from openk2.train.pretrain import config_for

    config = config_for(recipe)
    parallel = ParallelConfig.from_recipe(recipe, gpus, config.n_routed_experts)
    dp_shard, ep = (parallel.dp_shard, parallel.ep) if gpus > 1 else (1, 1)
    edp_shard = dp_shard // ep if dp_shard % ep == 0 else 1
    train = recipe["train"]
    gpu = str(train["device"]).startswith("cuda")
    act = 2 if gpu else 4
    ns_bytes = dtype_from_name(recipe["optim"]["ns_dtype"]).itemsize

    model = build_model(config, device="meta")
    muon = recipe["optim"]["name"] == "muonclip"
    shard = {"parameters": 0, "muon": 0, "adamw": 0}
    units: dict[str, int] = {}          # FSDP unit -> unsharded elements
    owned_dense = 0                      # elements of 2-D Muon matrices (spread over ranks)
    largest_class = 0                    # elements of the largest Newton–Schulz batch
    for role in classify_parameters(model, recipe["optim"]["router_gate"]):
        shape = tuple(role.param.shape)
        rest = math.prod(shape[1:])
        if role.role == "expert" and ep > 1:
            local_rows = shape[0] // ep
            per_gpu = math.ceil(local_rows / edp_shard) * rest
            unit = f"{role.name.rsplit('.', 1)[0]} (experts)"
            units[unit] = units.get(unit, 0) + (local_rows * rest if edp_shard > 1 else 0)
        else:
            per_gpu = math.ceil(shape[0] / dp_shard) * rest
            unit = _unit_of(role.name)
            units[unit] = units.get(unit, 0) + math.prod(shape)
        shard["parameters"] += per_gpu
        algorithm = role.algorithm if muon else "adamw"
        shard[algorithm] += per_gpu
        if algorithm == "muon":
            if len(shape) == 2:
                owned_dense += math.prod(shape)
            else:
                largest_class = max(largest_class, per_gpu)
    micro = min(train["micro_batch_size"], train["batch_size"] // gpus)  # per rank
    tokens = micro * train["seq_len"]
    per_token = activation_bytes_per_token(config, parallel.activation_checkpointing, act,
                                           cpu_attention=None if gpu else (micro, train["seq_len"]))
    largest_unit = max(units.values()) if units else 0
    memory = {
        "parameters": 4 * shard["parameters"],
        "gradients": 4 * shard["parameters"],
        "optimizer": 4 * shard["muon"] + 8 * shard["adamw"],
        "fsdp_working": (2 * act + 4) * largest_unit if gpus > 1 else 0,
        "muon_workspace": 8 * owned_dense // gpus
                          + 2 * ns_bytes * min(max(largest_class, 1), NS_BATCH_ELEMENTS),
        "activations": (per_token["layers"] + per_token["recompute"] + per_token["head"]) * tokens,
        "loss": loss_bytes(config, tokens, act, "cuda" if gpu else "cpu"),
    }
    memory["total"] = sum(memory.values())
    return {
        "model": recipe["model"]["init_from"] or recipe["model"]["preset"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "gpus": gpus,
        "mesh": {"dp_shard": dp_shard, "dp_replicate": gpus // dp_shard, "ep": ep,
                 "edp_shard": edp_shard if ep > 1 else None,
                 "edp_replicate": gpus // (ep * edp_shard) if ep > 1 else None},
        "activation_checkpointing": parallel.activation_checkpointing,
        "compute_dtype": "bfloat16" if gpu else "float32",
        "tokens_per_micro_batch": tokens,
        "micro_batches_per_step": train["batch_size"] // (gpus * micro),
        "bytes_per_gpu": memory,
    }


def loss_bytes(c: ModelConfig, tokens: int, act: int, device_type: str) -> int:
    """Memory of the LM head's loss for one micro-batch (module docstring); the same with and
    without FSDP (train/distributed.py runs the fused loss inside the head's FSDP unit)."""
    V, D = c.vocab_size, c.hidden_size
    cast = act if act < 4 else 0  # below float32, a copy in the compute dtype
    # one chunk at a time: its float32 logits (the softmax in place) and their cast
    chunk = min(tokens, chunk_rows(V, device_type)) * V * (4 + cast)
    if recomputes(tokens, D):
        return chunk
    return chunk + act * D * tokens + (4 + cast) * V * D


def _unit_of(name: str) -> str:
    """The FSDP unit of a parameter (train/distributed.py: one per decoder layer, the embedding,
    the LM head, and the root)."""
    layer = decoder_layer_prefix(name)
    if layer is not None:
        return layer
    return name.rsplit(".", 1)[0] if name.split(".")[-2] in ("embed_tokens", "lm_head") else "root"


def activation_bytes_per_token(c: ModelConfig, mode: str, act: int,
                               cpu_attention: tuple[int, int] | None = None) -> dict[str, float]:
    """Bytes per token (module docstring): saved by the decoder layers; live during one layer's
    recomputation ("full"); saved by the final norm and LM head; saved by the fused loss.
    cpu_attention: (sequences, seq_len) of a micro-batch on the CPU, whose attention path
    depends on them (model/attention.py); None on GPUs."""
    D, q, C, R = c.hidden_size, c.q_lora_rank or 0, c.kv_lora_rank, c.qk_rope_head_dim
    H, N, V = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim
    a = act
    if cpu_attention is not None and uses_explicit_attention("cpu", cpu_attention[0], H, cpu_attention[1]):
        T = cpu_attention[1]
        # q/k nope, q rope, v, output, o_proj input; the shared rotary key; the probabilities
        attention_tensors = a * H * (2 * N + R + 3 * V) + a * R + a * H * kept_probabilities(T) / T
    else:
        Vs = N + R if cpu_attention else V  # the CPU kernel pads v to the query/key head size
        attention_tensors = a * H * (2 * (N + R) + 2 * Vs + V) + 4 * H  # q, k, v, output, o_proj input, lse
    norm = 4 + a  # per element of a normed vector

    def swiglu(width: int) -> float:
        return a * D + 4 * a * width

    shared = c.moe_intermediate_size * c.n_shared_experts
    K = c.num_experts_per_tok
    # per (token, expert) pair: the gathered row, its gate weight, the two SwiGLU pre-activations
    routed = 4 * D + 4 * c.n_routed_experts + a * K * (D + 1 + 2 * c.moe_intermediate_size) + 24 * K
    attention = a * D + (norm + a) * q + (norm + a) * C + attention_tensors
    per_layer = []
    for i in range(c.num_hidden_layers):
        mlp = routed + (swiglu(shared) if shared else 0) if c.is_moe_layer(i) else swiglu(c.intermediate_size)
        full = 2 * norm * D + attention + mlp
        if mode == "selective":
            # Routed experts are not recomputed; a checkpointed SwiGLU MLP keeps its input.
            mlp_kept = routed + (a * D if shared else 0) if c.is_moe_layer(i) else a * D
            kept = 2 * a * D + a * D + 2 * a * q + a * (2 * C + R) + attention_tensors + mlp_kept
        elif mode == "full":
            kept = a * D
        else:
            kept = full
        per_layer.append((kept, full))
    return {
        "layers": sum(kept for kept, _ in per_layer),
        "recompute": max(full for _, full in per_layer) if mode == "full" else 0,  # one layer, in backward
        "head": norm * D,  # final norm, whose output is the LM head's input
    }


def format_plan(plan: dict[str, Any], gpu_memory_gib: float, where: str) -> str:
    m = plan["mesh"]
    experts = f" (experts FSDP-sharded over {m['edp_shard']}, replicated over {m['edp_replicate']})"
    lines = [
        f"plan: {where} ({plan['model']}, {plan['parameters'] / 1e9:.2f}B parameters) on {plan['gpus']} GPUs",
        f"mesh: dp_shard={m['dp_shard']} x dp_replicate={m['dp_replicate']}, ep={m['ep']}"
        + (experts if m["ep"] > 1 else ""),
        f"per GPU: {plan['tokens_per_micro_batch']:,} tokens per micro-batch, "
        f"{plan['micro_batches_per_step']} micro-batches per step, {plan['compute_dtype']} compute, "
        f"activation checkpointing {plan['activation_checkpointing']}",
        "",
        f"{'memory per GPU':<16}{'GiB':>10}",
    ]
    for key, value in plan["bytes_per_gpu"].items():
        if key == "total":
            lines.append("-" * 26)
        lines.append(f"{key.replace('_', ' '):<16}{value / GiB:>10.2f}")
    total = plan["bytes_per_gpu"]["total"] / GiB
    verdict = "fits" if total <= gpu_memory_gib else "does NOT fit"
    lines.append(f"\n{verdict} in {gpu_memory_gib:g} GiB per GPU "
                 "(an estimate; the CUDA allocator adds fragmentation)")
    return "\n".join(lines)
