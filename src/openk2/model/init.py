"""Random initial values that any rank can draw for any rows alone.

Every matrix is drawn from Normal(0, std) in blocks of whole rows (along dim 0: a matrix's
output rows, a stacked expert tensor's experts) of about `BLOCK_ELEMENTS` values, each block
from its own CPU generator. Block k of the model (counted over the tensors in draw order) uses
seed (base + k) mod 2^32, where base mixes the run's seed (torch's CPU generator keeps only 32
bits of a seed, so distinct consecutive seeds are what keeps every block's stream distinct).

The values depend only on the shapes, their order and the seed: not on the device, the
dtype, or how a tensor is split over ranks. A rank holding rows r0..r1 of a tensor draws only
the blocks that overlap them, so initialising a sharded K2 costs each rank about its share of
the draws instead of the whole model's.
"""

from __future__ import annotations

import math

import torch

BLOCK_ELEMENTS = 1 << 20  # values per independently seeded block (4 MB of float32)
_MASK64 = (1 << 64) - 1


def _mix(seed: int) -> int:
    """splitmix64's finaliser: nearby seeds land far apart in the 32-bit seed space."""
    x = (seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class NormalInit:
    """Draws a model's Normal(0, std) tensors in order: call `fill` once per tensor, in the
    model's draw order, with the rows this process holds (all of them on one process)."""

    def __init__(self, seed: int, std: float):
        self.base = _mix(seed)
        self.std = std
        self.block = 0  # index of the next tensor's first block, over the whole model

    def fill(self, out: torch.Tensor, shape: tuple[int, ...] | torch.Size, first_row: int = 0) -> None:
        """Fill `out` with rows first_row.. of the next tensor, whose whole shape is `shape`
        (out [rows held, *shape[1:]], any device and floating dtype), then move on to the
        following tensor."""
        shape = tuple(shape)
        rows = shape[0]
        per_block = max(1, BLOCK_ELEMENTS // max(math.prod(shape[1:]), 1))  # rows per block
        end = first_row + out.shape[0]
        if not 0 <= first_row <= end <= rows:
            raise ValueError(f"rows {first_row}..{end} are outside a tensor of shape {shape}")
        in_place = out.device.type == "cpu" and out.dtype == torch.float32 and out.is_contiguous()
        blocks = range(first_row // per_block, -(-end // per_block)) if end > first_row else ()
        for b in blocks:
            r0, r1 = b * per_block, min(rows, (b + 1) * per_block)
            generator = torch.Generator().manual_seed((self.base + self.block + b) & 0xFFFFFFFF)
            if in_place and first_row <= r0 and r1 <= end:
                out[r0 - first_row : r1 - first_row].normal_(0.0, self.std, generator=generator)
                continue
            values = torch.empty((r1 - r0, *shape[1:])).normal_(0.0, self.std, generator=generator)
            a, z = max(r0, first_row), min(r1, end)
            out[a - first_row : z - first_row].copy_(values[a - r0 : z - r0])
        self.block += -(-rows // per_block)
