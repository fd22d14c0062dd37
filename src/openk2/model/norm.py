"""RMSNorm (eps 1e-6 in K2), computed in float32 and cast back, as DeepSeek-V3 does.

    y = w * x * r,   r = 1 / sqrt(mean(x^2) + eps)   (per row)

For float32 input the forward and backward are written out by hand (`_RMSNormFloat32`):
the composite expression makes autograd record six element-wise nodes whose backward passes
read and write [N, D] tensors about twice as often as needed. Written out, the forward is one
reduction (a vector norm) and two products, and the backward is

    dw = sum_rows(g * xhat),   dx = r * (g * w - xhat * mean(g * w * xhat)),   xhat = x * r

with mean(g * w * xhat) a matrix-vector product of the already formed g * xhat with w. Other
dtypes (bf16 under autocast) take the composite expression.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return _RMSNormFloat32.apply(x, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class _RMSNormFloat32(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        dim = x.shape[-1]
        r = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(dim).add_(eps).rsqrt_()
        xhat = x * r
        ctx.save_for_backward(xhat, r, weight)
        return xhat * weight

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        xhat, r, weight = ctx.saved_tensors
        g_xhat = g * xhat
        dw = g_xhat.reshape(-1, g_xhat.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        dx = None
        if ctx.needs_input_grad[0]:
            mean = torch.matmul(g_xhat, weight).unsqueeze_(-1).div_(xhat.shape[-1])  # mean(g w xhat) per row
            dx = torch.addcmul(g * weight, xhat, mean, value=-1).mul_(r)
        return dx, dw, None
