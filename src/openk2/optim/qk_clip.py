"""QK-Clip (K2_SPEC §2, step 2 of Algorithm 1): cap each head's attention logits at tau.

After the optimizer step, every head h whose largest pre-softmax logit S_max^h in this
step's forward passes exceeded tau gets gamma = tau / S_max^h, and its weights are rescaled
so that every logit of that head, on the same input, becomes exactly gamma times what it was:

    q_b_proj  nope rows of h  *= sqrt(gamma)     rope rows of h *= gamma
    kv_b_proj k-nope rows of h *= sqrt(gamma)    v rows untouched
    kv_a_proj_with_mqa (the shared rotary key), q_a_proj, norms: untouched

The row layout is the attention module's business: `MLAttention.qk_clip_row_scales(gamma)`
returns (weight, row_scale) pairs, and this file only multiplies rows. A weight that is a
DTensor (FSDP2 shards dim 0; tensor parallelism may shard either dim) is scaled shard by
shard with the matching slice of the row-scale vector, so no gather is needed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from openk2.optim.muon import is_dtensor

try:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover - torch built without distributed
    compute_local_shape_and_global_offset = None


@torch.no_grad()
def qk_clip(attention_layers: Iterable, max_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Rescale the heads whose max logit exceeds tau (K2_SPEC §2, QK-Clip).

    attention_layers: the model's MLAttention modules in order; max_logits [layers, heads]:
    S_max per head over all of this step's forward passes (all micro-batches and, when
    distributed, all replicas). Returns the bool mask [layers, heads] of clipped heads.
    """
    clipped = max_logits > tau
    if tau <= 0:
        return torch.zeros_like(clipped)
    gamma = torch.where(clipped, tau / max_logits, torch.ones_like(max_logits)).float()  # [L, H]
    for attn, layer_gamma, any_clipped in zip(attention_layers, gamma, clipped.any(dim=1).tolist()):
        if any_clipped:
            for weight, row_scale in attn.qk_clip_row_scales(layer_gamma):
                scale_rows_(weight, row_scale)
    return clipped


def scale_rows_(weight: torch.Tensor, row_scale: torch.Tensor) -> None:
    """weight[r, :] *= row_scale[r], in place; weight may be a DTensor sharded on any dim.

    A factor of exactly 1 leaves a row bitwise unchanged. Low-precision weights are scaled
    in float32 and rounded once.
    """
    local = weight.to_local() if is_dtensor(weight) else weight
    if is_dtensor(weight):
        # The rows this rank holds: offset and length along dim 0 of the global tensor.
        shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh,
                                                              weight.placements)
        row_scale = row_scale[offset[0] : offset[0] + shape[0]]
    scale = row_scale.to(local.device)[:, None]  # [rows, 1]
    if local.dtype in (torch.float32, torch.float64):
        local.mul_(scale.to(local.dtype))
    else:
        local.copy_(local.float() * scale)
