"""The attention logits of an MLAttention module written out term by term, as a reference."""

import torch

from openk2.model.rope import apply_rotary


@torch.no_grad()
def causal_logits(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """[B, H, T, T] scaled pre-softmax logits (q_nope.k_nope + q_rope.k_rope), -inf above the diagonal."""
    B, T, _ = x.shape
    interleave = attn.config.rope_interleave
    q_nope, q_rope = attn.project_query(x)
    latent, k_rope = attn.compress_kv(x)
    q_rope = apply_rotary(q_rope, cos[:, None], sin[:, None], interleave)
    k_rope = apply_rotary(k_rope[:, None], cos[:, None], sin[:, None], interleave)
    kv = attn.kv_b_proj(latent).view(B, T, attn.num_heads, attn.nope_dim + attn.v_dim).transpose(1, 2)
    k_nope = kv[..., : attn.nope_dim]
    logits = q_nope @ k_nope.transpose(-1, -2) + q_rope @ k_rope.transpose(-1, -2)
    logits = logits.float() * attn.softmax_scale
    return logits.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
