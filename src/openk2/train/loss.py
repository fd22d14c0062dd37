"""Next-token cross-entropy fused with the LM head, computed in row chunks.

loss = sum_i [logsumexp(h_i W^T) - (h_i W^T)[y_i]] over rows whose target is not ignored.

The full [tokens, vocab] logits never exist (K2's vocabulary is 163,840: 2.7 GB of float32
logits per 4k-token sequence); each chunk's softmax runs in place in its logits' buffer, and
the loss is read off the target's probability. Two ways to get the gradients, chosen per call by
which holds less memory:

- in the forward (tokens >= hidden size, e.g. every CPU run): the gradient of a summed
  cross-entropy with respect to the logits, softmax - onehot, is known as soon as the forward
  has a chunk's logits, so the forward turns it into the hidden-state and head gradients right
  away and the backward only scales them. Three head matmuls, no recomputation; holds a [V, D]
  head gradient from the forward to the backward.
- recomputed in the backward (hidden size > tokens, e.g. K2's 7,168 against a 4,096-token
  micro-batch, where that [V, D] gradient would outweigh the logits themselves): the backward
  recomputes each chunk's logits and softmax. Four head matmuls; holds nothing between forward
  and backward but the inputs.

Without grad (evaluation) only the loss is computed.
"""

from __future__ import annotations

import torch

from openk2.model.linear import linear
from openk2.model.linear import supports as onednn_supports

IGNORE = -100
_SMALLEST = torch.finfo(torch.float32).tiny  # the smallest normal float32


def chunk_rows(vocab: int, device_type: str) -> int:
    """Rows per chunk. On accelerators about 16 MiB of float32 logits (at least 128 rows). On the
    CPU 512 rows, up to 64 MiB of logits (at least 128 rows): its GEMMs need that many rows to run
    near peak (the small preset's loss, forward + backward: 1.49 s at 128 rows, 1.36 s at 384-1,024;
    docs/LOG.md), while its element-wise passes gain nothing from smaller chunks."""
    if device_type == "cpu":
        return max(128, min(512, (1 << 24) // max(vocab, 1)))
    return max(128, (1 << 22) // max(vocab, 1))


def recomputes(rows: int, hidden_size: int) -> bool:
    """Whether a call over `rows` rows recomputes the logits in the backward: when the [V, D]
    head gradient the other way holds would outweigh the [rows, V] logits."""
    return hidden_size > rows


def _logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """float32 logits h @ weight.T of a chunk. (Called outside autograd only: in the autograd
    functions below, or without grad.)"""
    # oneDNN's GEMM is ~1.4x MKL's at this shape on CPU (docs/LOG.md); the gradient
    # products stay on torch.mm, where oneDNN was no faster inside the loss (docs/LOG.md).
    return (linear(h, weight) if onednn_supports(h, weight) else h @ weight.T).float()  # [n, V]


def _chunk_softmax(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor):
    """A chunk's softmax over the vocabulary, which rows count, their clamped targets, each row's
    loss -log p[target] (zero for ignored rows) and the rows whose target probability underflowed.

    The softmax runs in place in the logits' buffer: one pass per row, which stays in cache,
    instead of max, shift, exp, sum and scale each streaming the whole chunk (docs/LOG.md). The
    loss is then read off the target's probability, exact while that is a normal float32
    (p >= 1.2e-38, a per-token loss below ~87); rows below are flagged in `lost` and get their
    exact loss from `_exact_loss`."""
    probs = _logits(h, weight)
    torch.softmax(probs, dim=-1, out=probs)
    valid = t != IGNORE
    safe = t.clamp(min=0)
    p = probs.gather(1, safe[:, None]).squeeze(1)
    lost = valid & (p < _SMALLEST)
    return probs, valid, safe, torch.where(valid & ~lost, -p.log(), 0.0), lost


def _exact_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                lost: list[torch.Tensor]) -> torch.Tensor | float:
    """Summed loss of the rows flagged in `lost` (one mask per chunk), by log-sum-exp of their
    recomputed logits: only a diverging model has them, so one check per call, not per chunk."""
    if not lost:
        return 0.0
    rows = torch.cat(lost).nonzero().squeeze(1)
    if rows.numel() == 0:
        return 0.0
    logits = _logits(hidden[rows], weight)
    return (logits.logsumexp(dim=-1) - logits.gather(1, targets[rows, None]).squeeze(1)).sum()


def _head_grads(probs: torch.Tensor, safe: torch.Tensor, row_scale: torch.Tensor, h: torch.Tensor,
                weight: torch.Tensor, grad_hidden: torch.Tensor, grad_weight: torch.Tensor,
                rows: slice) -> None:
    """A chunk's softmax -> its rows of the hidden-state gradient, and its share of the head's.

    d loss / d logits is (softmax - onehot) * row_scale (zero for ignored rows; the incoming
    gradient where the backward recomputes); the row scale is applied on the [n, D] side (to the
    hidden-state gradient and to h), so the [n, V] chunk takes no pass beyond the one-hot. The
    head gradient takes the float32 chunk; the hidden-state gradient a copy in h's dtype."""
    d_logits = probs.scatter_add_(1, safe[:, None], probs.new_full((probs.shape[0], 1), -1.0))
    d_cast = d_logits.to(h.dtype)
    scale = row_scale[:, None]
    out = grad_hidden[rows]
    torch.mm(d_cast, weight.to(h.dtype), out=out)
    out.mul_(scale)  # in float32 even where out is bf16
    scaled_h = h.float() * scale
    if rows.start == 0:  # the first chunk writes the head gradient, the others add to it
        torch.mm(d_logits.T, scaled_h, out=grad_weight)
    else:
        grad_weight.addmm_(d_logits.T, scaled_h)


def _head_gradient_buffer(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """float32 [V, D] for the head gradient: written by the first chunk (zero without rows)."""
    make = torch.empty if hidden.shape[0] else torch.zeros
    return make(weight.shape, dtype=torch.float32, device=weight.device)


class _GradientsInForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows = chunk_rows(weight.shape[0], weight.device.type)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = _head_gradient_buffer(hidden, weight)
        total = hidden.new_zeros((), dtype=torch.float32)
        lost = []
        for start in range(0, hidden.shape[0], rows):
            chunk = slice(start, start + rows)
            probs, valid, safe, row_loss, chunk_lost = _chunk_softmax(hidden[chunk], weight, targets[chunk])
            total += row_loss.sum()
            lost.append(chunk_lost)
            _head_grads(probs, safe, valid.float(), hidden[chunk], weight, grad_hidden, grad_weight, chunk)
            del probs  # one chunk alive at a time: freed before the next chunk's logits exist
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        ctx.scaled = False
        return total + _exact_loss(hidden, weight, targets, lost)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        # The gradients made in the forward serve one backward and are scaled in place: a product
        # would allocate a second [V, D] head gradient (and, on the CPU, page-fault it in).
        if ctx.scaled:
            raise RuntimeError("linear_cross_entropy: a second backward through the same loss; its "
                               "gradients are made in the forward for one backward. Recompute the loss, "
                               "or pass recompute=True to make them in each backward.")
        ctx.scaled = True
        grad_hidden, grad_weight = ctx.saved_tensors
        # (the float32 scalar multiplies in float32 even where the gradients are bf16)
        return grad_hidden.mul_(grad_output), grad_weight.mul_(grad_output), None


class _GradientsRecomputed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(hidden, weight, targets)
        return _summed_loss(hidden, weight, targets)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        hidden, weight, targets = ctx.saved_tensors
        rows = chunk_rows(weight.shape[0], weight.device.type)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = _head_gradient_buffer(hidden, weight)
        for start in range(0, hidden.shape[0], rows):
            chunk = slice(start, start + rows)
            probs, valid, safe, _, _ = _chunk_softmax(hidden[chunk], weight, targets[chunk])
            _head_grads(probs, safe, valid * grad_output.float(), hidden[chunk], weight, grad_hidden,
                        grad_weight, chunk)
            del probs  # one chunk alive at a time
        return grad_hidden, grad_weight.to(weight.dtype), None


def _summed_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss alone, chunk by chunk."""
    rows = chunk_rows(weight.shape[0], weight.device.type)
    total = hidden.new_zeros((), dtype=torch.float32)
    lost = []
    for start in range(0, hidden.shape[0], rows):
        chunk = slice(start, start + rows)
        _, _, _, row_loss, chunk_lost = _chunk_softmax(hidden[chunk], weight, targets[chunk])
        total += row_loss.sum()
        lost.append(chunk_lost)
    return total + _exact_loss(hidden, weight, targets, lost)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         recompute: bool | None = None) -> torch.Tensor:
    """Summed cross-entropy of logits hidden @ weight.T against targets (IGNORE = -100 skipped).

    hidden [N, D], weight [V, D], targets [N] -> scalar float32. `recompute` picks how the
    gradients are made (module docstring); None chooses by memory (`recomputes`).
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        if recompute is None:
            recompute = recomputes(hidden.shape[0], hidden.shape[1])
        return (_GradientsRecomputed if recompute else _GradientsInForward).apply(hidden, weight, targets)
    return _summed_loss(hidden, weight, targets)
