"""Aux-loss-free load balancing (K2_SPEC §1; DeepSeek-V3 §2.1.2; Moonlight's centred variant).

After each optimizer step, per MoE layer, from the tokens routed to each expert during the
step (summed over micro-batches by the model, and over replicas when distributed):

    b_i <- b_i + u * sign(mean_j load_j - load_i)          u = 1e-3 by default
    centred: the update minus its mean over experts, so sum_i b_i stays where it was

b is `Router.e_score_correction_bias`, used for expert selection only.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


@torch.no_grad()
def update_router_bias(moe_layers: Iterable, tokens_per_expert: torch.Tensor, rate: float,
                       centered: bool = False) -> torch.Tensor:
    """Apply the sign update to each layer's router bias; tokens_per_expert [layers, E].

    Returns the update [layers, E] that was added.
    """
    load = tokens_per_expert.float()
    delta = rate * torch.sign(load.mean(dim=-1, keepdim=True) - load)  # [L, E]
    if centered:
        delta = delta - delta.mean(dim=-1, keepdim=True)
    for moe, layer_delta in zip(moe_layers, delta):
        bias = moe.gate.e_score_correction_bias
        bias.add_(layer_delta.to(device=bias.device, dtype=bias.dtype))
    return delta


def expert_imbalance(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """max / mean load over experts, per layer ([layers]); 1 is perfect balance. A layer
    that routed no tokens reports 1."""
    load = tokens_per_expert.float()
    mean = load.mean(dim=-1)
    return torch.where(mean > 0, load.amax(dim=-1) / mean.clamp_min(1e-12), torch.ones_like(mean))
