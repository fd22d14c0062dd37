"""Next-token cross-entropy fused with the LM head, computed in row chunks.

loss = sum_i [logsumexp(h_i W^T) - (h_i W^T)[y_i]] over rows whose target is not ignored.

The gradient of a summed cross-entropy with respect to the logits is softmax - onehot, known
as soon as the forward has the logits, so the forward computes it chunk by chunk and turns it
into the gradients of the hidden states and of the head right away. The full [tokens, vocab]
logits never exist (K2's vocabulary is 163,840: 2.7 GB of float32 logits per 4k-token
sequence), and each chunk's elementwise passes stay in cache. Without grad (evaluation) only
the loss is computed.
"""

from __future__ import annotations

import torch

IGNORE = -100


def _chunk_rows(vocab: int) -> int:
    """Rows per chunk: about 16 MiB of float32 logits (big enough for efficient matmuls)."""
    return max(128, (1 << 22) // max(vocab, 1))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows = _chunk_rows(weight.shape[0])
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start : start + rows]
            t = targets[start : start + rows]
            logits = (h @ weight.T).float()  # [n, V]
            valid = t != IGNORE
            safe = t.clamp(min=0)
            picked = logits.gather(1, safe[:, None]).squeeze(1)
            top = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(top).exp_()  # unnormalised softmax, in place: one exp pass
            norm = probs.sum(dim=-1, keepdim=True)
            total += ((top.squeeze(1) + norm.log().squeeze(1) - picked) * valid).sum()
            probs.mul_(valid[:, None] / norm)  # softmax, zero on ignored rows
            probs.scatter_add_(1, safe[:, None], -valid[:, None].to(probs.dtype))
            probs = probs.to(h.dtype) if h.dtype != torch.float32 else probs
            grad_hidden[start : start + rows] = probs @ weight.to(probs.dtype)
            grad_weight.addmm_(probs.T.float(), h.float())
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output.to(grad_hidden.dtype), grad_weight * grad_output.to(grad_weight.dtype), None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of logits hidden @ weight.T against targets (IGNORE = -100 skipped).

    hidden [N, D], weight [V, D], targets [N] -> scalar float32.
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets)
    rows = _chunk_rows(weight.shape[0])
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], rows):
        logits = (hidden[start : start + rows] @ weight.T).float()
        t = targets[start : start + rows]
        valid = t != IGNORE
        picked = logits.gather(1, t.clamp(min=0)[:, None]).squeeze(1)
        total += ((torch.logsumexp(logits, dim=-1) - picked) * valid).sum()
    return total
