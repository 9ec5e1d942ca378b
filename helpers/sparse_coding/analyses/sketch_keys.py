"""Order-free random keys for bottom-k samples (`analyses.mining`): a key is a hash of what it stands for (seed,
context, position, direction), not a draw from a generator stream, so the samples kept do not depend on the order or
batching in which candidates arrive."""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _mix(h: torch.Tensor, part: int | torch.Tensor) -> torch.Tensor:
    """The hash state h after one more part: a 32-bit integer mix in int64 ops (h, part mod 2^32 < 2^32 and the
    factor < 2^27, so no product overflows)."""
    h = h ^ (torch.as_tensor(part, dtype=torch.long) & _M32)
    for _ in range(2):
        h = ((h >> 16) ^ h) * 0x45D9F3B & _M32
    return (h >> 16) ^ h


def _hash(*parts: int | torch.Tensor) -> torch.Tensor:
    """A 32-bit hash of non-negative ints or int64 tensors (broadcast, each taken mod 2^32): `_mix` after each part."""
    h = torch.zeros((), dtype=torch.long)
    for p in parts:
        h = _mix(h, p)
    return h


def hash_states(*parts: int | torch.Tensor, states: tuple[torch.Tensor, ...] | None = None
                ) -> tuple[torch.Tensor, ...]:
    """The two salted hash states after `parts`, continuing `states` (an earlier call's, indexed as the caller
    likes, or only the first of them) when given: keys_of(hash_states(*b, states=hash_states(*a))) ==
    sketch_keys(*a, *b). So the parts shared by many keys (seed, context, position of a token) are hashed once, not
    once per key (the miner hashes every firing (token, direction) pair)."""
    if states is None:
        states = (_hash(1), _hash(2))
    out = []
    for h in states:
        for p in parts:
            h = _mix(h, p)
        out.append(h)
    return tuple(out)


def keys_of(states: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """float64 keys in [0, 1) from the two hash states: 53 bits, so that ties (which the sketch breaks by arrival
    order) all but never occur. The first state alone bounds the key: key in [h1 / 2^32, (h1 + 1) / 2^32)."""
    return (states[0] * 2 ** 21 + (states[1] >> 11)).double() * 2.0 ** -53


def sketch_keys(*parts: int | torch.Tensor) -> torch.Tensor:
    """float64 keys in [0, 1) hashed from the parts (broadcast): 53 bits from two salted 32-bit hashes."""
    return keys_of(hash_states(*parts))
