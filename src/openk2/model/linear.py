"""oneDNN's linear on CPU, where it beats MKL's GEMM (docs/LOG.md).

torch runs float32 matmuls on the CPU through MKL, which repacks the weight on every call (the
main cost of a product with a few rows) and, on the AMD EPYC of docs/BENCHMARKS.md, reaches
70-80% of what oneDNN's JIT kernels do at the LM head's shapes. oneDNN's linear (the
`mkldnn::_linear_pointwise` op that torch.compile's CPU weight freezing emits) takes the weight
either plain [out, in] or reordered once by `pack`. Used by the fused LM-head loss (logits) and
the decode weights (infer/cache.py).

Both ops are torch internals, so `AVAILABLE` is probed once, and every caller keeps the plain
torch product as its fallback.
"""

from __future__ import annotations

import warnings

import torch

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


def fast_bf16() -> bool:
    """Whether torch's CPU bf16 products take oneDNN's path: torch asks for AVX-512 (BW, VL, DQ),
    which runs bf16 natively where the CPU also has AVX-512 BF16 or AMX and by conversion
    otherwise. Without it (an AVX2-only CPU) torch falls back to a path that ran bf16 products
    56-70x slower than float32 on an AVX2 EPYC (`python benchmarks/optimizer_step.py` prints the
    ratio)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def warn_if_slow_bf16(setting: str) -> None:
    """A warning naming `setting` (e.g. "train.dtype='bfloat16'") when it asks for bf16 matmuls
    on a CPU where torch has no fast bf16 path (`fast_bf16`)."""
    if not fast_bf16():
        warnings.warn(f"{setting} on a CPU without AVX-512, where torch multiplies bf16 through a slow "
                      "fallback (tens of times slower than float32); use 'float32' on this machine",
                      stacklevel=3)


def supports(*tensors: torch.Tensor) -> bool:
    """Whether oneDNN's linear can take these tensors: CPU, one float32 or bfloat16 dtype, and
    nothing autograd would have to differentiate (the op has no backward). False as well while
    `torch.backends.mkldnn.enabled` is off."""
    if not AVAILABLE or not torch.backends.mkldnn.enabled:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    dtype = tensors[0].dtype
    if dtype not in _DTYPES or any(t.device.type != "cpu" or t.dtype != dtype for t in tensors):
        return False
    return dtype == torch.float32 or fast_bf16()


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
