"""The windows `mining_stream.Stream` stores for what entered its tables, as compiled kernels (numba; see
`mining_kernels`, whose switch they follow): each distinct (context, direction) once (`first_of`), read from a
batch's picks context by context (`PickColumns`). tests/analyses/test_mining_kernels.py checks them against
np.unique and the dense codes."""

from __future__ import annotations

import torch

from ..dictionaries import jit

numba = jit.numba
if numba is not None:
    import numpy as np
    from numba import njit

    @njit(cache=jit.CACHE, nogil=True)
    def _first_of(key, table, first, inverse):
        """Distinct keys in order of first appearance: first[u] the index of the u-th, inverse[m] which one key[m]
        is; table (all -1, one slot per possible key) is left all -1 again. Returns how many."""
        U = 0
        for m in range(key.shape[0]):
            u = table[key[m]]
            if u < 0:
                u = table[key[m]] = U
                first[U] = m
                U += 1
            inverse[m] = u
        for u in range(U):
            table[key[first[u]]] = -1
        return U

    @njit(cache=jit.CACHE, nogil=True)
    def _pick_columns(values, latents, n, b, f, out):
        """out[m, t] = the value picked for direction f[m] at position t of context b[m] ([B, T, w] picks, each
        latent at most once per row among the nonzero values), 0 where it was not: the requests grouped by
        context, each context's picks read once, a direction -> request table answering every pick."""
        B, T, w = values.shape
        M = b.shape[0]
        starts = np.zeros(B + 1, np.int64)
        for m in range(M):
            starts[b[m] + 1] += 1
        for c in range(B):
            starts[c + 1] += starts[c]
        order, fill = np.empty(M, np.int64), starts[:-1].copy()
        for m in range(M):
            order[fill[b[m]]] = m
            fill[b[m]] += 1
        table = np.full(n, -1, np.int64)
        out[:] = 0
        for c in range(B):
            if starts[c] == starts[c + 1]:
                continue
            for e in range(starts[c], starts[c + 1]):  # the first request of a direction answers for all
                m = order[e]
                if table[f[m]] < 0:
                    table[f[m]] = m
            vals, lats = values[c], latents[c]
            for t in range(T):
                for q in range(w):
                    r = table[lats[t, q]]
                    if r >= 0 and vals[t, q] != 0:
                        out[r, t] = vals[t, q]
            for e in range(starts[c], starts[c + 1]):
                m = order[e]
                first = table[f[m]]
                if first != m:
                    out[m] = out[first]
            for e in range(starts[c], starts[c + 1]):
                table[f[order[e]]] = -1


def first_of(key: torch.Tensor, size: int, buffers: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of each distinct key's first appearance [U], which distinct key each is [M]) for int64 keys in
    [0, size): `np.unique`'s return_index and return_inverse, in order of appearance, without its sort."""
    table = buffers.get("first_of")
    if table is None or len(table) < size:
        table = buffers["first_of"] = np.full(size, -1, np.int64)
    first, inverse = torch.empty(len(key), dtype=torch.long), torch.empty(len(key), dtype=torch.long)
    U = _first_of(key.contiguous().numpy(), table, first.numpy(), inverse.numpy())
    return first[:U], inverse


class PickColumns:
    """A batch's codes from its picks (values, latents [B, T, w]): `columns(b, f)` is [m, T] direction f[i]'s codes
    over context b[i] (0 where it does not fire), each requested context's picks read once."""

    def __init__(self, values: torch.Tensor, latents: torch.Tensor, n: int):
        self.values, self.latents, self.n = values.contiguous(), latents.contiguous(), n

    def columns(self, b: torch.Tensor, f: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[m, T] (into `out`, contiguous, when given)."""
        out = torch.empty(len(b), self.values.shape[1]) if out is None else out
        _pick_columns(self.values.numpy(), self.latents.numpy(), self.n, b.contiguous().numpy(),
                      f.contiguous().numpy(), out.numpy())
        return out
