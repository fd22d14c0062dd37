"""Fine-grained sparse MoE with a shared expert and the DeepSeek-V3 "noaux_tc" router (K2_SPEC §1).

Legend: N tokens, D hidden, E routed experts, K experts per token, I expert width.

    s = sigmoid(x W_g^T)                         [N, E]   router scores (float32)
    top-k of (s + b), b = e_score_correction_bias          bias used for selection only
    g = s[top-k] / sum(s[top-k]) * routed_scaling_factor
    y = shared(x) + sum_k g_k E_k(x)

Routed experts are stored as stacked 3-D weights (gate_proj, up_proj [E, I, D],
down_proj [E, D, I]); gate and up stay separate matrices as in the released checkpoint.
Dispatch sorts the N*K (token, expert) pairs by expert and runs one matmul per expert
that received tokens. Per forward the layer adds its tokens-per-expert counts to the
`tokens_per_expert` buffer, which the aux-loss-free bias update reads and resets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from openk2.config import ModelConfig


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Sigmoid router with the selection-only correction bias and optional group-limited routing."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        # Kept in float32 whatever the model dtype, as the released checkpoint stores them.
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> weights [N, K], experts [N, K], scores [N, E]."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores.detach() + self.e_score_correction_bias
        if self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [N, G]
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = choice.masked_fill(~group_mask.repeat_interleave(self.num_experts // self.n_group, 1),
                                        float("-inf"))
        experts = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, experts)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, experts, scores


class Experts(nn.Module):
    """E SwiGLU experts as stacked weights; runs only the experts that received tokens."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        E, D, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts = E
        self.gate_proj = nn.Parameter(torch.empty(E, I, D))
        self.up_proj = nn.Parameter(torch.empty(E, I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                counts: torch.Tensor) -> torch.Tensor:
        """x [N, D], weights/experts [N, K], counts [E] -> [N, D]."""
        K = experts.shape[1]
        order = experts.flatten().argsort(stable=True)  # (token, expert) pairs sorted by expert
        token = order // K
        xs = x.index_select(0, token)  # [N*K, D]
        gate_weight = weights.flatten()[order, None].to(x.dtype)
        sizes = counts.tolist()
        # unbind once: indexing the stacked weights per expert would make the backward build a
        # full-size zero gradient for every expert (O(E^2) memory traffic); unbind's is one stack.
        gates, ups, downs = self.gate_proj.unbind(0), self.up_proj.unbind(0), self.down_proj.unbind(0)
        outputs = []
        for e, (chunk, g) in enumerate(zip(xs.split(sizes), gate_weight.split(sizes))):
            if chunk.shape[0] == 0:
                continue
            h = F.silu(chunk @ gates[e].T) * (chunk @ ups[e].T)
            outputs.append((h * g) @ downs[e].T)
        y = torch.cat(outputs) if outputs else xs.new_zeros(0, x.shape[1])
        return y.new_zeros(x.shape).index_add_(0, token, y)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts > 0 else None
        )
        # Sequence-wise balance loss weight (DeepSeek-V3 "seq_aux"); 0 turns it off.
        self.aux_loss_alpha = 0.0
        self.aux_loss: torch.Tensor | None = None
        # Integer counts stay exact at any scale and are left alone by dtype casts.
        self.register_buffer("tokens_per_expert", torch.zeros(config.n_routed_experts, dtype=torch.long),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        weights, experts, scores = self.gate(flat)
        counts = torch.bincount(experts.flatten(), minlength=self.experts.num_experts)
        with torch.no_grad():
            self.tokens_per_expert += counts
        if self.aux_loss_alpha > 0 and self.training:
            self.aux_loss = self.aux_loss_alpha * sequence_balance_loss(scores.view(B, T, -1), experts.view(B, T, -1))
        out = self.experts(flat, weights, experts, counts)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(B, T, D)

    def reset_tokens_per_expert(self) -> None:
        self.tokens_per_expert.zero_()


def sequence_balance_loss(scores: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss, averaged over sequences.

    scores [B, T, E] (sigmoid), experts [B, T, K]:  sum_i f_i * P_i with
    f_i = E / (K T) * #tokens routed to i, P_i = mean_t of s_{t,i} / sum_j s_{t,j}.
    """
    B, T, E = scores.shape
    K = experts.shape[-1]
    hits = torch.zeros(B, E, device=scores.device).scatter_add_(
        1, experts.reshape(B, -1), torch.ones(B, T * K, device=scores.device))
    f = hits * E / (K * T)
    p = (scores / scores.sum(-1, keepdim=True)).mean(1)
    return (f * p).sum(-1).mean()
