"""Order-free random keys for bottom-k samples (`analyses.mining`): a key is a hash of what it stands for (seed,
context, position, direction), not a draw from a generator stream, so the samples kept do not depend on the order or
batching in which candidates arrive."""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _hash(*parts: int | torch.Tensor) -> torch.Tensor:
    """A 32-bit hash of non-negative ints or int64 tensors (broadcast, each taken mod 2^32): a 32-bit integer mix
    after each part, in int64 ops (x < 2^32 and the factor < 2^27, so no product overflows)."""
    h = torch.zeros((), dtype=torch.long)
    for p in parts:
        h = h ^ (torch.as_tensor(p, dtype=torch.long) & _M32)
        for _ in range(2):
            h = ((h >> 16) ^ h) * 0x45D9F3B & _M32
        h = (h >> 16) ^ h
    return h


def sketch_keys(*parts: int | torch.Tensor) -> torch.Tensor:
    """float64 keys in [0, 1) hashed from the parts (broadcast): 53 bits from two salted 32-bit hashes, so that ties
    (which the sketch breaks by arrival order) all but never occur."""
    return (_hash(1, *parts) * 2 ** 21 + (_hash(2, *parts) >> 11)).double() * 2.0 ** -53
