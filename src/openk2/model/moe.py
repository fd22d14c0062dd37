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
                counts: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, D], weights/experts [N, K], counts [E] -> [N, D]: the routed outputs added, in
        place, into `into` (the shared expert's output: no zero fill and no separate sum), or
        into zeros."""
        K = experts.shape[1]
        order = experts.flatten().argsort(stable=True)  # (token, expert) pairs sorted by expert
        token = order // K
        xs = x.index_select(0, token)  # [N*K, D]
        gate_weight = weights.flatten()[order, None].to(x.dtype)
        y = expert_swiglu(xs, gate_weight, self.gate_proj, self.up_proj, self.down_proj, counts.tolist())
        return combine(y, token, x.shape, into)


def combine(y: torch.Tensor, token: torch.Tensor, shape: torch.Size,
            into: torch.Tensor | None) -> torch.Tensor:
    """Routed outputs y [N*K, D] summed per token (`token` [N*K]) into `into` in place, or into
    zeros of `shape`. Under autocast the shared expert's output may be in a lower precision than
    y: then the sum is taken in the wider dtype, as `shared + routed` would."""
    if into is None:
        into = y.new_zeros(shape)
    elif into.dtype != y.dtype:
        into = into.to(torch.promote_types(into.dtype, y.dtype))
    return into.index_add_(0, token, y.to(into.dtype))


def expert_swiglu(xs: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                  down: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Rows sorted by expert through their experts' SwiGLU, each scaled by its gate weight.

    xs [P, D] holds sizes[e] rows for expert e, in expert order; scale [P, 1]; gate, up
    [E, I, D], down [E, D, I] (cast to xs's dtype by the caller). Row r of expert e gives
    ((silu(x_r G_e^T) * (x_r U_e^T)) * s_r) D_e^T  -> [P, D].

    One autograd node for the whole layer: the matmuls run per expert that received rows, into
    row blocks of shared buffers, and the element-wise work runs once over all P rows. It keeps
    xs and the two [P, I] pre-activations for the backward (the activation and the scaled
    product are recomputed there); unused experts get zero gradients. Gate and up stay separate
    products on views of the weights: a concatenated [E, 2I, D] copy would hold a second copy of
    the layer's experts until the backward.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (xs, scale, gate, up, down)):
        return _ExpertSwiGLU.apply(xs, scale, gate, up, down, sizes)
    return _swiglu_forward(xs, scale, gate, up, down, _spans(sizes))[0]


def _spans(sizes: list[int]) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of every expert that received rows."""
    spans, start = [], 0
    for e, n in enumerate(sizes):
        if n:
            spans.append((e, start, start + n))
        start += n
    return spans


def _swiglu_forward(xs, scale, gate, up, down, spans):
    P, I = xs.shape[0], gate.shape[1]
    pre_gate, pre_up = xs.new_empty(P, I), xs.new_empty(P, I)
    for e, s, t in spans:
        torch.mm(xs[s:t], gate[e].T, out=pre_gate[s:t])
        torch.mm(xs[s:t], up[e].T, out=pre_up[s:t])
    h = F.silu(pre_gate).mul_(pre_up).mul_(scale)
    ys = xs.new_empty(P, down.shape[1])
    for e, s, t in spans:
        torch.mm(h[s:t], down[e].T, out=ys[s:t])
    return ys, pre_gate, pre_up


class _ExpertSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xs, scale, gate, up, down, sizes):
        ctx.spans = _spans(sizes)
        ys, pre_gate, pre_up = _swiglu_forward(xs, scale, gate, up, down, ctx.spans)
        ctx.save_for_backward(xs, scale, gate, up, down, pre_gate, pre_up)
        return ys

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_ys):
        xs, scale, gate, up, down, pre_gate, pre_up = ctx.saved_tensors
        need_x, need_scale, need_gate, need_up, need_down = ctx.needs_input_grad[:5]
        d_ys = d_ys.contiguous()
        act = F.silu(pre_gate)
        h = act * pre_up                                     # before the gate weight
        d_h = torch.empty_like(h)                            # d loss / d (h * scale)
        d_down = _weight_grad(down, need_down, ctx.spans)
        scaled = h * scale if need_down else None
        for e, s, t in ctx.spans:
            torch.mm(d_ys[s:t], down[e], out=d_h[s:t])
            if need_down:
                torch.mm(d_ys[s:t].T, scaled[s:t], out=d_down[e])
        d_scale = torch.linalg.vecdot(d_h, h).unsqueeze_(1) if need_scale else None
        d_h.mul_(scale)                                      # d loss / d h
        d_pre_gate = torch.ops.aten.silu_backward(pre_up * d_h, pre_gate)
        d_up = act.mul_(d_h)                                 # d loss / d pre_up, in act's buffer
        d_xs = torch.empty_like(xs) if need_x else None
        d_gate = _weight_grad(gate, need_gate, ctx.spans)
        d_upw = _weight_grad(up, need_up, ctx.spans)
        for e, s, t in ctx.spans:
            if need_x:
                torch.mm(d_pre_gate[s:t], gate[e], out=d_xs[s:t])
                d_xs[s:t].addmm_(d_up[s:t], up[e])
            if need_gate:
                torch.mm(d_pre_gate[s:t].T, xs[s:t], out=d_gate[e])
            if need_up:
                torch.mm(d_up[s:t].T, xs[s:t], out=d_upw[e])
        return d_xs, d_scale, d_gate, d_upw, d_down, None


def _weight_grad(weight: torch.Tensor, needed: bool, spans) -> torch.Tensor | None:
    """An [E, ...] gradient buffer: the experts with rows are written by the caller, the others
    are zero."""
    if not needed:
        return None
    grad = torch.empty_like(weight)
    for e in sorted(set(range(weight.shape[0])) - {e for e, _, _ in spans}):
        grad[e].zero_()
    return grad


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
            self.aux_loss = self.aux_loss_alpha * sequence_balance_loss(scores.view(B, T, -1),
                                                                        experts.view(B, T, -1))
        shared = self.shared_experts(flat) if self.shared_experts is not None else None
        return self.experts(flat, weights, experts, counts, into=shared).view(B, T, D)

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
