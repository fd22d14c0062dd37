"""Multi-head Latent Attention (DeepSeek-V2/V3 MLA, as K2 uses it; K2_SPEC §1).

Shapes: B batch, T tokens, H heads, N = qk_nope_head_dim, R = qk_rope_head_dim,
V = v_head_dim, C = kv_lora_rank.

    q   = q_b(norm(q_a(x)))            [B, T, H, N + R]   (or q_proj(x) without q_lora)
    c   = norm(kv_a(x)[:C])            [B, T, C]          the cached latent
    k_R = rope(kv_a(x)[C:])            [B, T, R]          one rotary key shared by all heads
    k_N, v = split(kv_b(c))            [B, T, H, N], [B, T, H, V]

Besides the output, the module records per head the largest pre-softmax logit it has
seen since `max_logits` was last reset (rotary part and softmax scale included): the
statistic QK-Clip needs. `qk_clip_row_scales` is the interface through which QK-Clip
rescales a head's weights, so no caller has to know the row layout of q_b/kv_b.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from openk2.config import ModelConfig
from openk2.model.norm import RMSNorm
from openk2.model.rope import apply_rotary, rope_parameters


_MAX_LOGIT_BLOCK = 1 << 24  # elements of one logit block in the max-logit statistic
# Largest B * H * T * T for which CPU attention keeps its probabilities for the backward
# instead of running the flash kernel (docs/LOG.md): the square is 64 MiB in float32, of which
# the row blocks keep about 5/8 per layer.
_EXPLICIT_ATTENTION_ELEMENTS = 1 << 24


def _causal_bias(T: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[T, T]: 0 where key j <= query i, -inf above the diagonal (added inside the matmul)."""
    positions = torch.arange(T, device=device)
    return torch.zeros(T, T, device=device, dtype=dtype).masked_fill_(
        positions[None, :] > positions[:, None], float("-inf"))


def uses_explicit_attention(device_type: str, batch: int, heads: int, seq_len: int) -> bool:
    """Whether a layer's attention takes `_ExplicitMLAttention` (CPU, short sequences) rather
    than PyTorch's fused kernel."""
    return device_type == "cpu" and batch * heads * seq_len * seq_len <= _EXPLICIT_ATTENTION_ELEMENTS


def kept_probabilities(seq_len: int) -> int:
    """Attention probabilities `_ExplicitMLAttention` keeps per sequence and head (its row blocks
    skip the keys above the diagonal)."""
    return sum((end - start) * end for start, end in _row_blocks(seq_len))


def _row_blocks(T: int) -> list[tuple[int, int]]:
    """Up to four blocks of query rows (at least 64 each), so causal attention can skip the keys
    above the diagonal: with four blocks its matmuls do 10/16 of the square's work."""
    n = max(1, min(4, T // 64))
    bounds = [round(T * i / n) for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


class _ExplicitMLAttention(torch.autograd.Function):
    """Causal MLA attention that keeps its probabilities, for short sequences on the CPU.

    For sequences this short, PyTorch's flash kernel on the CPU (which also needs v padded to the
    q/k head size) plus a second pass for the max-logit statistic cost more than batched matmuls
    that keep the probabilities for the backward. Blocks of query rows skip the keys above the
    diagonal. Working on MLA's parts directly also saves concatenating q and k: the rotary key,
    shared by all heads, is one [B, T, R] matrix against the heads' rotary queries [B, H*r, R].
    Returns the output [B, H, T, V] and the per-head max of the scaled logits (float32, not
    differentiated).
    """

    @staticmethod
    def forward(ctx, q_nope, q_rope, k_nope, k_rope, v, scale: float):
        B, H, T, N = q_nope.shape
        R, V = q_rope.shape[-1], v.shape[-1]
        qn, kn = q_nope.reshape(B * H, T, N), k_nope.reshape(B * H, T, N)
        kr, vf = k_rope.reshape(B, T, R), v.reshape(B * H, T, V)
        bias = _causal_bias(T, qn.dtype, qn.device)
        probs, rope_queries, outs, maxima = [], [], [], []
        for start, end in _row_blocks(T):
            rows = H * (end - start)
            qr = q_rope[:, :, start:end].reshape(B, rows, R)
            logits = torch.baddbmm(bias[start:end, :end], qn[:, start:end], kn[:, :end].transpose(1, 2),
                                   alpha=scale)
            logits.view(B, rows, end).baddbmm_(qr, kr[:, :end].transpose(1, 2), alpha=scale)
            maxima.append(logits.view(B, H, -1).amax(dim=(0, 2)))
            p = torch.softmax(logits, dim=-1, out=logits)  # in place: no second block buffer
            outs.append(torch.bmm(p, vf[:, :end]))
            probs.append(p)
            rope_queries.append(qr)
        out = torch.cat(outs, dim=1)
        ctx.save_for_backward(qn, kn, kr, vf, out, *rope_queries, *probs)
        ctx.scale, ctx.shape = scale, (B, H, T)
        head_max = torch.stack(maxima).amax(dim=0).float()
        ctx.mark_non_differentiable(head_max)
        return out.view(B, H, T, V), head_max

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_max):
        qn, kn, kr, vf, out, *saved = ctx.saved_tensors
        (B, H, T), scale = ctx.shape, ctx.scale
        blocks = _row_blocks(T)
        rope_queries, probs = saved[: len(blocks)], saved[len(blocks):]
        grad_out = grad_out.reshape(out.shape)
        delta = (grad_out * out).sum(-1, keepdim=True)  # rowsum(dO * O), the softmax backward's shift
        grad_v, grad_kn, grad_kr = torch.zeros_like(vf), torch.zeros_like(kn), torch.zeros_like(kr)
        grad_qn, grad_qr = [], []
        for (start, end), p, qr in zip(blocks, probs, rope_queries):
            rows = H * (end - start)
            go = grad_out[:, start:end]
            grad_v[:, :end] += torch.bmm(p.transpose(1, 2), go)  # (bmm into a slice would loop per matrix)
            # softmax backward in place: dS = P * (dP - delta); the scale is applied at the end
            grad_logits = torch.bmm(go, vf[:, :end].transpose(1, 2)).sub_(delta[:, start:end]).mul_(p)
            grad_qn.append(torch.bmm(grad_logits, kn[:, :end]))
            grad_kn[:, :end] += torch.bmm(grad_logits.transpose(1, 2), qn[:, start:end])
            per_batch = grad_logits.view(B, rows, end)
            grad_qr.append(torch.bmm(per_batch, kr[:, :end]).view(B, H, end - start, -1))
            grad_kr[:, :end] += torch.bmm(per_batch.transpose(1, 2), qr)
        return (torch.cat(grad_qn, dim=1).mul_(scale).view(B, H, T, -1),
                torch.cat(grad_qr, dim=2).mul_(scale),
                grad_kn.mul_(scale).view(B, H, T, -1), grad_kr.mul_(scale).view(B, 1, T, -1),
                grad_v.view(B, H, T, -1), None)


class MLAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        self.config = c
        self.layer_idx = layer_idx
        self.num_heads = c.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.kv_lora_rank = c.kv_lora_rank
        qk_dim = self.nope_dim + self.rope_dim
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, self.num_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank)
            self.q_b_proj = nn.Linear(c.q_lora_rank, self.num_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + self.rope_dim,
                                            bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, c.hidden_size, bias=c.attention_bias)
        _, _, softmax_mscale = rope_parameters(c)
        self.softmax_scale = qk_dim**-0.5 * softmax_mscale
        self.track_max_logits = True
        self.register_buffer("max_logits", torch.zeros(self.num_heads), persistent=False)

    # ---- projections, shared with the inference engine's compressed-cache path -----------
    @property
    def query_proj(self) -> nn.Linear:
        """The projection whose rows hold each head's q_nope and q_rope (q_b_proj or q_proj)."""
        return self.q_proj if self.config.q_lora_rank is None else self.q_b_proj

    def project_query(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> q_nope [B, H, T, N], q_rope [B, H, T, R] (rope not yet applied)."""
        B, T, _ = x.shape
        if self.config.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.num_heads, self.nope_dim + self.rope_dim).transpose(1, 2)
        return q.split([self.nope_dim, self.rope_dim], dim=-1)

    def compress_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> latent c [B, T, C] (normed), k_rope [B, T, R] (rope not yet applied)."""
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(latent), k_rope

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Causal self-attention over x [B, T, D]; cos/sin [B or 1, T, R/2]."""
        B, T, _ = x.shape
        interleave = self.config.rope_interleave
        q_nope, q_rope = self.project_query(x)
        latent, k_rope = self.compress_kv(x)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        q_rope = apply_rotary(q_rope, cos, sin, interleave)
        k_rope = apply_rotary(k_rope[:, None], cos, sin, interleave)  # [B, 1, T, R]
        kv = self.kv_b_proj(latent).view(B, T, self.num_heads, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        if uses_explicit_attention(x.device.type, B, self.num_heads, T):
            out, head_max = _ExplicitMLAttention.apply(q_nope, q_rope, k_nope, k_rope, v, self.softmax_scale)
            if self.track_max_logits:
                torch.maximum(self.max_logits, head_max, out=self.max_logits)
        else:
            out = self._fused_attention(q_nope, q_rope, k_nope, k_rope, v)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.v_dim))

    def _fused_attention(self, q_nope, q_rope, k_nope, k_rope, v) -> torch.Tensor:
        """PyTorch's fused attention (flash on CPU, any backend on GPU); the statistic separately."""
        q = torch.cat((q_nope, q_rope), dim=-1)  # [B, H, T, N+R]
        k = torch.cat((k_nope, k_rope.expand(-1, self.num_heads, -1, -1)), dim=-1)
        if self.track_max_logits:
            self._record_max_logits(q, k)
        pad = q.shape[-1] - self.v_dim
        if pad > 0 and q.device.type == "cpu":
            # PyTorch's fused CPU kernel needs equal q/k and v head sizes; padding v is cheaper
            # than the unfused fallback it would otherwise take.
            return F.scaled_dot_product_attention(q, k, F.pad(v, (0, pad)), is_causal=True,
                                                  scale=self.softmax_scale)[..., : self.v_dim]
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)

    @torch.no_grad()
    def _record_max_logits(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """max over batch and causal (i >= j) pairs of q_i . k_j * scale, per head."""
        B, H, T, D = q.shape
        # Blocks of whole sequences, or of query rows of one sequence, bound the logit buffer.
        seqs = max(1, min(B, _MAX_LOGIT_BLOCK // (H * T * T)))
        rows = T if seqs > 1 else max(1, min(T, _MAX_LOGIT_BLOCK // (H * T)))
        future = _causal_bias(T, q.dtype, q.device)
        head_max = torch.full((H,), float("-inf"), device=q.device)
        for b in range(0, B, seqs):
            n = min(seqs, B - b)
            for start in range(0, T, rows):
                end = min(T, start + rows)
                qb = q[b : b + n, :, start:end].reshape(n * H, end - start, D)
                kb = k[b : b + n].reshape(n * H, T, D)
                logits = torch.baddbmm(future[start:end], qb, kb.transpose(-1, -2))
                head_max = torch.maximum(head_max,
                                         logits.view(n, H, -1).float().amax(dim=(0, 2)) * self.softmax_scale)
        torch.maximum(self.max_logits, head_max, out=self.max_logits)

    def reset_max_logits(self) -> None:
        self.max_logits.zero_()

    # ---- QK-Clip interface ---------------------------------------------------------------
    def qk_clip_row_scales(self, gamma: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """Per-row factors that multiply every logit of head h by gamma[h] (K2_SPEC §2).

        Returns (weight, row_scale [out_features]) pairs: for the query projection, each
        head's nope rows get sqrt(gamma) and its rope rows gamma; for kv_b_proj, each head's
        k-nope rows get sqrt(gamma) and its v rows 1. The shared rotary key (kv_a_proj) is
        untouched, so its rows need no entry.
        """
        gamma = gamma.float()
        root = gamma.sqrt()[:, None]
        H = self.num_heads
        q_rows = torch.cat((root.expand(H, self.nope_dim), gamma[:, None].expand(H, self.rope_dim)), dim=1)
        kv_rows = torch.cat((root.expand(H, self.nope_dim),
                             torch.ones(H, self.v_dim, device=gamma.device)), dim=1)
        return [(self.query_proj.weight, q_rows.reshape(-1)), (self.kv_b_proj.weight, kv_rows.reshape(-1))]
