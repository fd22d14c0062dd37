"""oneDNN's linear on CPU, where it beats MKL's GEMM (docs/LOG.md).

torch runs float32 matmuls on the CPU through MKL, which repacks the weight on every call (the
main cost of a product with a few rows) and, on the AMD EPYC of docs/BENCHMARKS.md, reaches
70-80% of what oneDNN's JIT kernels do at the LM head's shapes and 80-90% at the projections'.
oneDNN's linear (the `mkldnn::_linear_pointwise` op that torch.compile's CPU weight freezing
emits) takes the weight either plain [out, in] (a transposed view too) or reordered once by
`pack`. Used by `Linear` (the network's projections: forward and input gradient), the fused
LM-head loss and the decode weights (infer/cache.py).

Both ops are torch internals, so `AVAILABLE` is probed once, and every caller keeps the plain
torch product as its fallback.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_DTYPES = (torch.float32, torch.bfloat16)


def _probe() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:  # fixed inputs: importing this module must not move the global random generator
        w = torch.arange(24 * 16, dtype=torch.float32).reshape(24, 16).sin()
        x = torch.arange(3 * 16, dtype=torch.float32).reshape(3, 16).cos()
        plain = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        packed = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w), None,
                                                    "none", [], "")
        expected = x @ w.t()
        return all(y.shape == (3, 24) and torch.allclose(y, expected, atol=1e-4) for y in (plain, packed))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


AVAILABLE = _probe()


def accepts(*tensors: torch.Tensor) -> bool:
    """Whether oneDNN's linear can run on these tensors: CPU, one float32 or bfloat16 dtype, no
    CPU autocast (whose casts it would skip). False as well while `torch.backends.mkldnn.enabled`
    is off. The op itself has no backward: see `supports` and `Linear`."""
    if not AVAILABLE or not torch.backends.mkldnn.enabled or torch.is_autocast_enabled("cpu"):
        return False
    dtype = tensors[0].dtype
    if dtype not in _DTYPES or any(t.device.type != "cpu" or t.dtype != dtype for t in tensors):
        return False
    return dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def supports(*tensors: torch.Tensor) -> bool:
    """`accepts`, and nothing autograd would have to differentiate."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return accepts(*tensors)


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """A weight [out, in] reordered for oneDNN's linear (an opaque tensor), or None where oneDNN
    cannot take it."""
    if not supports(weight):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    except RuntimeError:
        return None


# Opaque to torch.compile: inductor cannot trace oneDNN's packed (opaque) tensors, and a compiled
# caller (benchmarks/torch_compile.py compiles the decode step) then calls it eagerly.
@torch.compiler.disable
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) for x [M, in] and a plain or packed weight. No autograd: check
    `supports` (or run without grad) first."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _Linear(torch.autograd.Function):
    """x @ W^T + b with the forward and the input gradient on oneDNN (the input gradient is a
    linear against the transposed weight, a view) and the weight gradient on torch's product,
    which is the faster of the two for that shape."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])
        need_x, need_weight, need_bias = ctx.needs_input_grad
        grad_x = linear(grad, weight.t()).view(x.shape) if need_x else None
        grad_weight = grad.t() @ x.reshape(-1, x.shape[-1]) if need_weight else None
        grad_bias = grad.sum(0) if ctx.has_bias and need_bias else None
        return grad_x, grad_weight, grad_bias


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) whose CPU products run on oneDNN where it
    takes them (`accepts`); anything else (GPUs, autocast, torch.compile) is F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tensors = (x, self.weight) if self.bias is None else (x, self.weight, self.bias)
        if torch.compiler.is_compiling() or not accepts(*tensors):
            return F.linear(x, self.weight, self.bias)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return _Linear.apply(x, self.weight, self.bias)
        return linear(x, self.weight, self.bias)
