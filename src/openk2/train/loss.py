"""Next-token cross-entropy fused with the LM head, computed in row chunks.

loss = sum_i [logsumexp(h_i W^T) - (h_i W^T)[y_i]] over rows whose target is not ignored.

The full [tokens, vocab] logits never exist (K2's vocabulary is 163,840: 2.7 GB of float32
logits per 4k-token sequence); each chunk's elementwise passes stay in cache. Two ways to get
the gradients, chosen per call by which holds less memory:

- in the forward (tokens >= hidden size, e.g. every CPU run): the gradient of a summed
  cross-entropy with respect to the logits, softmax - onehot, is known as soon as the forward
  has a chunk's logits, so the forward turns it into the hidden-state and head gradients right
  away and the backward only scales them. Three head matmuls, no recomputation; holds a [V, D]
  head gradient from the forward to the backward.
- recomputed in the backward (hidden size > tokens, e.g. K2's 7,168 against a 4,096-token
  micro-batch, where that [V, D] gradient would outweigh the logits themselves): the forward
  keeps one log-sum-exp per row, and the backward recomputes each chunk's logits. Four head
  matmuls; holds nothing vocabulary-sized between forward and backward.

Without grad (evaluation) only the loss is computed.
"""

from __future__ import annotations

import torch

from openk2.model.linear import linear
from openk2.model.linear import supports as onednn_supports

IGNORE = -100


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


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor):
    """float32 logits of one chunk, which rows count, their clamped targets and target logits.
    (Called outside autograd only: in the autograd functions below, or without grad.)"""
    # oneDNN's GEMM is ~1.4x MKL's at this shape on CPU (docs/LOG.md); the gradient
    # products stay on torch.mm, where oneDNN was no faster inside the loss (docs/LOG.md).
    logits = (linear(h, weight) if onednn_supports(h, weight) else h @ weight.T).float()  # [n, V]
    valid = t != IGNORE
    safe = t.clamp(min=0)
    return logits, valid, safe, logits.gather(1, safe[:, None]).squeeze(1)


def _softmax_minus_onehot(probs: torch.Tensor, norm: torch.Tensor, valid: torch.Tensor,
                          safe: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """d loss / d logits of a chunk, in place: probs holds exp(logits - shift), norm its row sum."""
    probs.mul_(valid[:, None] * scale / norm)  # softmax, zero on ignored rows
    probs.scatter_add_(1, safe[:, None], -(valid[:, None] * scale).to(probs.dtype))
    return probs


def _head_grads(d_logits: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, grad_hidden: torch.Tensor,
                grad_weight: torch.Tensor, rows: slice) -> None:
    """Chunk gradient of the logits -> rows of the hidden-state gradient, summed into the head's."""
    d_logits = d_logits.to(h.dtype) if h.dtype != torch.float32 else d_logits
    grad_hidden[rows] = d_logits @ weight.to(d_logits.dtype)
    if rows.start == 0:  # the first chunk writes the head gradient, the others add to it
        torch.mm(d_logits.T.float(), h.float(), out=grad_weight)
    else:
        grad_weight.addmm_(d_logits.T.float(), h.float())


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
        for start in range(0, hidden.shape[0], rows):
            chunk = slice(start, start + rows)
            logits, valid, safe, picked = _chunk_logits(hidden[chunk], weight, targets[chunk])
            top = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(top).exp_()  # unnormalised softmax, in place: one exp pass
            norm = probs.sum(dim=-1, keepdim=True)
            total += ((top.squeeze(1) + norm.log().squeeze(1) - picked) * valid).sum()
            _head_grads(_softmax_minus_onehot(probs, norm, valid, safe), hidden[chunk], weight,
                        grad_hidden, grad_weight, chunk)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        ctx.scaled = False
        return total

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
        return (grad_hidden.mul_(grad_output.to(grad_hidden.dtype)),
                grad_weight.mul_(grad_output.to(grad_weight.dtype)), None)


class _GradientsRecomputed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        total = _summed_loss(hidden, weight, targets, lse)
        ctx.save_for_backward(hidden, weight, targets, lse)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        rows = chunk_rows(weight.shape[0], weight.device.type)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = _head_gradient_buffer(hidden, weight)
        for start in range(0, hidden.shape[0], rows):
            chunk = slice(start, start + rows)
            logits, valid, safe, _ = _chunk_logits(hidden[chunk], weight, targets[chunk])
            probs = logits.sub_(lse[chunk, None]).exp_()  # already normalised
            d_logits = _softmax_minus_onehot(probs, probs.new_ones(()), valid, safe, grad_output.float())
            _head_grads(d_logits, hidden[chunk], weight, grad_hidden, grad_weight, chunk)
        return grad_hidden, grad_weight.to(weight.dtype), None


def _summed_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 lse: torch.Tensor | None = None) -> torch.Tensor:
    """The loss alone, chunk by chunk; fills `lse` with each row's log-sum-exp when given."""
    rows = chunk_rows(weight.shape[0], weight.device.type)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], rows):
        chunk = slice(start, start + rows)
        logits, valid, _, picked = _chunk_logits(hidden[chunk], weight, targets[chunk])
        row_lse = torch.logsumexp(logits, dim=-1)
        if lse is not None:
            lse[chunk] = row_lse
        total += ((row_lse - picked) * valid).sum()
    return total


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
