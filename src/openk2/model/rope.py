"""Rotary position embedding with YaRN, computed as HF DeepseekV3 computes it (K2_SPEC §1).

K2 uses YaRN with factor 32, beta_fast = beta_slow = 1 and mscale = mscale_all_dim = 1 over an
original 4,096-token context. Two numbers come out of the YaRN parameters besides the
frequencies: `cos_sin_scale` multiplies cos/sin (1.0 for K2, since mscale == mscale_all_dim),
and `softmax_mscale` multiplies the attention softmax scale (mscale(factor, mscale_all_dim)²).
The one non-obvious choice: DeepSeek checkpoints pair rotary dimensions as (0,1), (2,3), ...
(`rope_interleave`), and the rotated output is laid out de-interleaved, as transformers does;
queries and keys get the same permutation, so every logit is unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from openk2.config import ModelConfig


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def rope_parameters(config: ModelConfig) -> tuple[torch.Tensor, float, float]:
    """Returns (inv_freq [rope_dim/2], cos_sin_scale, softmax_mscale)."""
    dim = config.qk_rope_head_dim
    base = config.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    rs = config.rope_scaling
    if rs is None or rs.get("rope_type", rs.get("type")) in (None, "default"):
        return 1.0 / pos_freqs, 1.0, 1.0

    original = rs["original_max_position_embeddings"]
    factor = rs.get("factor")
    if factor is None:
        factor = config.max_position_embeddings / original
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    cos_sin_scale = rs.get("attention_factor")
    if cos_sin_scale is None:
        if mscale and mscale_all_dim:
            cos_sin_scale = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            cos_sin_scale = _yarn_mscale(factor)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1: keep the original frequency, 0: interpolate by `factor`
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    softmax_mscale = _yarn_mscale(factor, mscale_all_dim) ** 2 if mscale_all_dim else 1.0
    return inv_freq, float(cos_sin_scale), float(softmax_mscale)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions; no learned parameters."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", torch.empty(config.qk_rope_head_dim // 2), persistent=False)
        self.cos_sin_scale = 1.0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        inv_freq, self.cos_sin_scale, _ = rope_parameters(self.config)
        if self.inv_freq.device.type != "meta":
            with torch.no_grad():
                self.inv_freq.copy_(inv_freq)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [..., T] -> cos, sin [..., T, rope_dim/2] (float32)."""
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        return freqs.cos() * self.cos_sin_scale, freqs.sin() * self.cos_sin_scale


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x [..., T, D] by cos/sin [..., T, D/2] (broadcast over heads by the caller)."""
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
